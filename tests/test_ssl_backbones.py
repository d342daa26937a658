"""DINOv2, MAE and MoCo v3 from their released ``.pth`` layouts: numerical parity with PyTorch.

Each test builds the reference PyTorch model of a tiny member of the family with random
weights (transformers' ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``ViTMAEModel`` and, for
MoCo v3's timm ViT, ``ViTModel``: the same computation), renames its state dict to the official
repositories' keys (the inverse of transformers' ``convert_dinov2_to_hf.py`` and
``convert_vit_mae_to_pytorch.py``: query, key and value stacked into ``attn.qkv``, SwiGLU's gate
and up projections into ``mlp.w12``), wraps it as
the released files are (a bare state dict; MAE's ``{"model"}``; MoCo v3's ``{"state_dict"}``
with ``module.base_encoder.`` keys next to the momentum encoder's), ``torch.save``s it and loads
it through ``backbones.build``. The whole encoded sequence (after the final LayerNorm) is
compared at float32 tolerance. They skip without torch or transformers.

DINOv2's checkpoint holds a 6x6 position grid and runs at 4x4: the reference gets the
embedding DINOv2's ``interpolate_pos_encoding`` computes, i.e. ``F.interpolate`` with the hub
models' arguments (offset 0.1 in the scale factor without registers; the size with antialiasing
with registers), since transformers' ``Dinov2Model`` resizes without the offset.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt.errors import InputError
from jprompt.models import backbones, torch_vit_checkpoint

IMAGE = 16  # 4x4 patches of 4 pixels
CHECKPOINT_GRID = 6  # DINOv2's files hold a larger grid (37x37) than the run's
BATCH = 2


def _perturbed(model, torch):
    """Random weights everywhere: LayerNorm and LayerScale leave 1 and biases leave 0."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _official_names(hf_state) -> dict:
    """transformers' Dinov2 / ViT / ViTMAE keys -> the official (timm-style) ones, as numpy."""
    layer = r"^(?:encoder\.)?layers?\.(\d+)\."
    renames = [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (layer + r"(?:norm1|layernorm_before)\.", r"blocks.\1.norm1."),
        (layer + r"(?:norm2|layernorm_after)\.", r"blocks.\1.norm2."),
        (layer + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (layer + r"layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (layer + r"mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
        (layer + r"mlp\.down_proj\.", r"blocks.\1.mlp.w3."),
        (r"^layernorm\.", "norm."),
    ]
    state = {}
    for key, value in hf_state.items():
        value = value.detach().numpy()
        if key.startswith("pooler."):  # transformers' own head, no part of the encoder
            continue
        # Stacked in the official files: attn.qkv = [q; k; v], SwiGLU's mlp.w12 = [gate; up].
        stacked = re.match(layer + r"(attention|mlp)\.([qkv]|gate|up)_proj\.(\w+)$", key)
        if stacked:
            name = "attn.qkv" if stacked[2] == "attention" else "mlp.w12"
            state.setdefault(f"blocks.{stacked[1]}.{name}.{stacked[4]}", {})[stacked[3]] = value
            continue
        for pattern, replacement in renames:
            if re.match(pattern, key):
                state[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise AssertionError(f"no official name for {key}")
    for key, value in state.items():
        if isinstance(value, dict):
            order = "qkv" if ".attn." in key else ("gate", "up")
            state[key] = np.concatenate([value[part] for part in order])
    return state


def _save(tmp_path, obj, torch, name="model.pth"):
    def to_torch(value):
        if isinstance(value, dict):
            return {key: to_torch(item) for key, item in value.items()}
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        return value

    path = tmp_path / name
    torch.save(to_torch(obj), path)
    return str(path)


def _jprompt(name, checkpoint, images_nchw, **config):
    """jprompt's encoded sequence and pooled features for the NCHW ``images``."""
    config = backbones.default_config(name, checkpoint=checkpoint, **config)
    backbone, params = backbones.build(config, image_size=IMAGE, rng=jax.random.key(0))
    features, out = backbone.features(params, images_nchw.transpose(0, 2, 3, 1))
    return backbone, np.asarray(features), np.asarray(out["encoded"])


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _dinov2_reference(registers: int, swiglu: bool):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = backbones.TORCH_VITS["dinov2_tiny4_reg"]
    kwargs = dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        image_size=IMAGE,
        patch_size=spec.patch_size,
        use_swiglu_ffn=swiglu,
    )
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    return torch, _perturbed(model, torch)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_matches_reference_with_resampled_position_embedding(tmp_path, registers):
    # Without registers the FFN is the SwiGLU of ViT-g/14, so both of DINOv2's MLPs are covered.
    torch, model = _dinov2_reference(registers, swiglu=not registers)
    functional = torch.nn.functional
    state = _official_names(model.state_dict())
    width, side = state["cls_token"].shape[-1], IMAGE // 4
    # The file's larger grid, and what DINOv2's interpolate_pos_encoding makes of it.
    grid = np.random.default_rng(1).normal(size=(1, width, CHECKPOINT_GRID, CHECKPOINT_GRID))
    grid = torch.from_numpy(grid.astype(np.float32))
    if registers:  # dinov2_vit*14_reg: interpolate_offset=0, interpolate_antialias=True
        resized = functional.interpolate(grid, size=(side, side), mode="bicubic", antialias=True)
    else:  # interpolate_offset=0.1: the scale factor is (side + 0.1) / M
        factor = (side + 0.1) / CHECKPOINT_GRID
        resized = functional.interpolate(grid, scale_factor=(factor, factor), mode="bicubic")
    cls_slot = torch.from_numpy(state["pos_embed"][:, :1])
    flat = lambda g: g.flatten(2).transpose(1, 2)  # noqa: E731  (1, D, h, w) -> (1, h*w, D)
    state["pos_embed"] = torch.cat([cls_slot, flat(grid)], dim=1).numpy()
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(torch.cat([cls_slot, flat(resized)], dim=1))

    images = np.random.default_rng(2).normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).last_hidden_state.numpy()
    checkpoint = _save(tmp_path, state, torch)
    if registers:
        backbone, features, encoded = _jprompt("dinov2_tiny4_reg", checkpoint, images)
        assert backbone.normalization == "imagenet"
    else:
        # The registry's tiny DINOv2 has registers; this one is built as ViT-g/14 is.
        spec = backbones.TORCH_VITS["dinov2_tiny4_reg"]
        module = backbones.torch_vit_module("dinov2_tiny4_reg", num_registers=0, ffn="swiglu")
        hidden = (int(4 * spec.hidden_size * 2 / 3) + 7) // 8 * 8  # SwiGLUFFNFused's width
        module = module.clone(mlp_dim=hidden)
        params = torch_vit_checkpoint.load(checkpoint, "dinov2", module, image_size=IMAGE)
        features, out = module.apply({"params": params}, images.transpose(0, 2, 3, 1))
        features, encoded = np.asarray(features), np.asarray(out["encoded"])
    _close(encoded, want)
    _close(features, want[:, 0])  # pool="tok": the normed CLS token, as DINOv2's forward


def _vit_config(config_class, spec, **extra):
    """A transformers ViT config of ``spec``'s shape at ``IMAGE`` px (eps 1e-6, as released)."""
    return config_class(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.mlp_dim,
        image_size=IMAGE,
        patch_size=spec.patch_size,
        layer_norm_eps=1e-6,
        **extra,
    )


def test_mae_matches_reference_and_pools_patches(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = backbones.TORCH_VITS["mae_tiny4"]
    config = _vit_config(transformers.ViTMAEConfig, spec, mask_ratio=0.0)
    model = _perturbed(transformers.ViTMAEModel(config), torch)
    state = _official_names(model.state_dict())
    state["decoder_embed.weight"] = np.zeros((8, spec.hidden_size), np.float32)  # dropped
    checkpoint = _save(tmp_path, {"model": state}, torch)

    images = np.random.default_rng(3).normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    patches = (IMAGE // spec.patch_size) ** 2
    noise = torch.arange(patches, dtype=torch.float32).expand(BATCH, patches)  # keeps the order
    with torch.no_grad():
        out = model(torch.from_numpy(images), noise=noise, output_hidden_states=True)
    want = out.last_hidden_state.numpy()
    _, features, encoded = _jprompt("mae_tiny4", checkpoint, images, pool="tok")
    _close(encoded, want)
    _close(features, want[:, 0])
    _, gap, _ = _jprompt("mae_tiny4", checkpoint, images, pool="gap")
    _close(gap, want[:, 1:].mean(axis=1))  # the normed patch tokens' mean, without the CLS
    # MAE's global_pool (the default): the last block's tokens after the CLS, BEFORE the
    # pretrained norm, averaged, then a LayerNorm at its init (eps 1e-6).
    mean = out.hidden_states[-1].numpy()[:, 1:].mean(axis=1)
    centred = mean - mean.mean(axis=-1, keepdims=True)
    want_global = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-6)
    _, global_pool, _ = _jprompt("mae_tiny4", checkpoint, images)
    _close(global_pool, want_global)


def test_maes_global_pool_averages_the_prompts_too():
    """VPT's MAE: ``x[:, 1:].mean(1)`` reads the prompt tokens with the patches."""
    from jprompt import methods

    backbone, params = backbones.build(
        backbones.default_config("mae_tiny4"), image_size=IMAGE, rng=jax.random.key(0)
    )
    vpt = methods.build("vpt", backbone=backbone, num_classes=3, num_tokens=2)
    trained, frozen = vpt.init(jax.random.key(1), params)
    images = jax.random.normal(jax.random.key(2), (BATCH, IMAGE, IMAGE, 3))
    (features, _), state = backbone.module.apply(
        {"params": params},
        images,
        prompt_tokens=jnp.broadcast_to(trained["params"]["prompter"]["tokens"], (BATCH, 2, 32)),
        capture_intermediates=True,
    )
    # The last block's full output (its first call; the second computes the pooled rows).
    last = state["intermediates"]["Transformer"]["encoderblock_1"]["__call__"][0]
    mean = np.asarray(last)[:, 1:].mean(axis=1)  # 2 prompts and 16 patches
    centred = mean - mean.mean(axis=-1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-6)
    _close(np.asarray(features), want)
    _close(np.asarray(vpt.apply(trained, frozen, images)[1]["features"]), want)


def test_mocov3_matches_reference_from_training_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = backbones.TORCH_VITS["mocov3_tiny4"]
    config = _vit_config(transformers.ViTConfig, spec)
    model = _perturbed(transformers.ViTModel(config), torch)
    state = _official_names(model.state_dict())
    # MoCo v3's main_moco.py file: both encoders, the predictor, the projection head.
    wrapped = {f"module.base_encoder.{key}": value for key, value in state.items()}
    wrapped.update({f"module.momentum_encoder.{key}": -value for key, value in state.items()})
    wrapped["module.base_encoder.head.0.weight"] = np.ones((8, spec.hidden_size), np.float32)
    wrapped["module.predictor.0.weight"] = np.ones((8, 8), np.float32)
    checkpoint = _save(tmp_path, {"epoch": 300, "arch": "vit_base", "state_dict": wrapped}, torch)

    images = np.random.default_rng(4).normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).last_hidden_state.numpy()
    _, features, encoded = _jprompt("mocov3_tiny4", checkpoint, images)
    _close(encoded, want)
    _close(features, want[:, 0])


def test_wrong_family_and_missing_key_name_the_file_and_the_key(tmp_path):
    torch, model = _dinov2_reference(registers=4, swiglu=False)
    state = _official_names(model.state_dict())
    dinov2 = _save(tmp_path, state, torch, "dinov2.pth")
    with pytest.raises(InputError, match=r"dinov2\.pth has entries .*use a dinov2_\*_reg"):
        _jprompt("mae_tiny4", dinov2, np.zeros((1, 3, IMAGE, IMAGE), np.float32))
    del state["blocks.1.ls2.gamma"]
    broken = _save(tmp_path, state, torch, "broken.pth")
    with pytest.raises(InputError, match=r"broken\.pth has no 'blocks\.1\.ls2\.gamma'"):
        _jprompt("dinov2_tiny4_reg", broken, np.zeros((1, 3, IMAGE, IMAGE), np.float32))


# Every method on each family's layout: DINOv2's registers (prompts after CLS and registers,
# PGN's at the end), MAE's global pool (prompts and patches), MoCo v3's CLS, and SigLIP's MAP
# head without CLS.
LAYOUT_METHODS = {
    "siglip_tiny4": ("vp", "vpt", "vpt_deep", "pgn", "e2vpt"),
    "dinov2_tiny4_reg": ("vp", "vpt", "vpt_deep", "vfpt", "pgn", "adavipro", "lor_vp", "evp"),
    "mae_tiny4": ("vpt", "vpt_deep", "pgn", "lor_vp"),
    "mocov3_tiny4": ("vpt_deep", "pgn"),
}
OPTIONS = {
    "vpt_deep": ("vpt", {"deep": True, "num_tokens": 2}),
    "vpt": ("vpt", {"num_tokens": 2}),
    "vfpt": ("vfpt", {"deep": True, "num_tokens": 2}),
    "pgn": ("pgn", {"num_tokens": 2, "library_size": 8}),
    "evp": ("evp", {"prompt_size": 2}),
    "vp": ("vp", {"prompt_size": 2}),
    "adavipro": ("adavipro", {"prompt_size": 2, "region_size": 4}),
    "lor_vp": ("lor_vp", {}),
    "e2vpt": ("e2vpt", {"num_tokens": 2, "kv_tokens": 2}),
}


@pytest.mark.parametrize(
    "backbone_name,method_name", [(b, m) for b, names in LAYOUT_METHODS.items() for m in names]
)
def test_every_method_trains_on_each_layout(backbone_name, method_name):
    from jprompt import methods

    config = backbones.default_config(backbone_name, checkpoint="")
    backbone, params = backbones.build(config, image_size=IMAGE, rng=jax.random.key(0))
    name, options = OPTIONS[method_name]
    # A random head (VPT's init), so that the loss depends on the features at step 0.
    method = methods.build(name, backbone=backbone, num_classes=3, head_init="vpt", **options)
    trained, frozen = method.init(jax.random.key(1), params)
    images = jax.random.normal(jax.random.key(2), (BATCH, IMAGE, IMAGE, 3))

    def loss(params):
        logits, _ = method.apply(
            {**trained, "params": params}, frozen, images, rng=jax.random.key(3), train=True
        )
        return jax.nn.logsumexp(logits, axis=-1).mean() - logits[:, 0].mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(trained["params"])
    assert np.isfinite(value)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves)
    # The prompt itself learns, not only the head.
    prompt = {k: v for k, v in grads.items() if k != "head"}
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(prompt))


def test_a_deployable_pgn_refuses_register_tokens():
    from jprompt import methods

    config = backbones.default_config("dinov2_tiny4_reg", checkpoint="")
    backbone, _ = backbones.build(config, image_size=IMAGE, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"not verified on backbones with register tokens"):
        methods.build("pgn", backbone=backbone, num_classes=3, deployable=True)
