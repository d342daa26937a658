"""CLIP weights from OpenAI, open_clip and Hugging Face files: numerical parity with PyTorch.

The parity tests build PyTorch reference models of ``clip_tiny4``'s shapes with random weights,
save them in the released formats, load them through ``clip_checkpoint.load`` and compare image
features, text features and logits with the reference's. They skip when torch or the reference
package is missing:

- Hugging Face: ``transformers.CLIPModel`` (``save_pretrained``'s safetensors and a
  ``torch.save``d ``pytorch_model.bin``).
- OpenAI: the ``clip/model.py`` of the ``openai-clip`` package, loaded by path because importing
  the package needs torchvision (and pkg_resources). Its ``CLIP`` is saved as a state dict in
  float16, as OpenAI released its weights, and as a traced TorchScript archive, the format of the
  released ``ViT-B-32.pt``.
- OpenAI naming without that package: the Hugging Face model's weights renamed with the inverse
  of the relations in transformers' ``convert_clip_original_pytorch_to_hf.py`` (query, key and
  value stacked into ``in_proj``; ``proj`` and ``text_projection`` are the transposed projection
  weights), saved as an open_clip training checkpoint (``{"state_dict"}``, ``module.`` keys).

The text features are pooled at the end-of-text token: OpenAI and jprompt take the largest id of
each row, transformers (with CLIP's eos id 49407) its first eos. The token ids below (a start
token 49406, ids below it, one 49407, zero padding) make all of them pick the same position.
"""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jprompt.models import clip, clip_checkpoint, vit_checkpoint

NAME = "clip_tiny4"
TINY = clip.variant(NAME)
HEADS = 2  # clip_tiny4's heads in both towers
START, END = 49406, 49407
END_POSITIONS = (5, 30, 76)
# float32 reference vs float32 JAX on CPU; the largest deviations seen are below 1e-6
# (features) and 2.1e-6 (logits, which are scaled by exp(logit_scale) ~ 14).
FEATURE_TOL = dict(atol=2e-5, rtol=1e-5)
LOGIT_TOL = dict(atol=2e-4, rtol=1e-5)


def token_ids(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(END_POSITIONS), clip.CONTEXT_LENGTH), np.int64)
    for row, end in enumerate(END_POSITIONS):
        ids[row, 0] = START
        ids[row, 1:end] = rng.integers(1, START, end - 1)
        ids[row, end] = END
    # Where transformers looks (its first eos) and where OpenAI and jprompt look (argmax) agree.
    np.testing.assert_array_equal(ids.argmax(-1), (ids == END).argmax(-1))
    return ids


def images(seed=0) -> np.ndarray:
    """(B, 3, H, W), torch's layout."""
    return np.random.default_rng(seed).normal(size=(2, 3, TINY.image_size, TINY.image_size))


def jax_outputs(params, pixels, ids) -> dict[str, np.ndarray]:
    image_features, _ = clip.image_tower(NAME).apply(
        {"params": params["image"]}, jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32)
    )
    text_features = clip.text_tower(NAME).apply({"params": params["text"]}, jnp.asarray(ids))
    logits = clip.logits(image_features, text_features, params["logit_scale"])
    return {"image": image_features, "text": text_features, "logits": logits}


def assert_parity(params, reference: dict[str, np.ndarray], pixels, ids, label: str):
    ours = jax_outputs(params, pixels, ids)
    for quantity, tol in (("image", FEATURE_TOL), ("text", FEATURE_TOL), ("logits", LOGIT_TOL)):
        got, want = np.asarray(ours[quantity]), reference[quantity]
        print(f"{label} {quantity}: max |jax - torch| = {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, err_msg=f"{label} {quantity}", **tol)


def randomize(module, torch, seed: int):
    """Every parameter random (norm scales near 1), so that each one shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name or "ln_" in name
            param.copy_(1 + 0.1 * noise if is_norm and name.endswith("weight") else 0.1 * noise)
        module.logit_scale.fill_(np.log(1 / 0.07))


# OpenAI block module -> Hugging Face block module, same weight and bias.
BLOCK_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def features(output):
    """transformers >= 5 returns the projected features as ``pooler_output`` of a ModelOutput."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output


def assert_same(got, want):
    np.testing.assert_array_equal(got, want, strict=True)  # strict: shapes and dtypes too


def random_tree(seed=0) -> dict:
    """Random float32 parameters of clip_tiny4's tree, from numpy (no XLA compilation)."""
    abstract = jax.eval_shape(lambda rng: clip.init_params(NAME, rng), jax.random.key(0))
    rng = np.random.default_rng(seed)
    flat = {
        key: (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        for key, leaf in vit_checkpoint.flatten(abstract).items()
    }
    return vit_checkpoint.unflatten(flat)


# --- Hugging Face ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random tiny ``CLIPModel``, its files and its outputs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        vision_config=dict(
            hidden_size=TINY.image_width,
            num_hidden_layers=TINY.image_depth,
            num_attention_heads=HEADS,
            intermediate_size=4 * TINY.image_width,
            patch_size=TINY.patch_size,
            image_size=TINY.image_size,
            hidden_act="quick_gelu",
            layer_norm_eps=clip.LAYERNORM_EPS,
        ),
        text_config=dict(
            hidden_size=TINY.text_width,
            num_hidden_layers=TINY.text_depth,
            num_attention_heads=HEADS,
            intermediate_size=4 * TINY.text_width,
            max_position_embeddings=clip.CONTEXT_LENGTH,
            vocab_size=clip.VOCAB_SIZE,
            hidden_act="quick_gelu",
            layer_norm_eps=clip.LAYERNORM_EPS,
            bos_token_id=START,
            eos_token_id=END,
            pad_token_id=0,
        ),
        projection_dim=TINY.embed_dim,
    )
    model = transformers.CLIPModel(config).eval()
    randomize(model, torch, seed=1)
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")

    pixels, ids = images(), token_ids()
    with torch.no_grad():
        pixel_values = torch.tensor(pixels, dtype=torch.float32)
        input_ids = torch.tensor(ids)
        reference = {
            "image": features(model.get_image_features(pixel_values=pixel_values)).numpy(),
            "text": features(model.get_text_features(input_ids=input_ids)).numpy(),
            "logits": model(
                input_ids=input_ids, pixel_values=pixel_values
            ).logits_per_image.numpy(),
        }
    return dict(model=model, dir=directory, reference=reference, pixels=pixels, ids=ids)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_parity(hf, filename):
    params = clip_checkpoint.load(hf["dir"] / filename, NAME, image_size=TINY.image_size)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    assert_parity(params, hf["reference"], hf["pixels"], hf["ids"], f"hf {filename}")


def test_openai_naming_from_hugging_face_relations(hf, tmp_path):
    torch = pytest.importorskip("torch")
    hf_state = hf["model"].state_dict()
    embeddings = "vision_model.embeddings"
    openai = {
        "logit_scale": hf_state["logit_scale"],
        "visual.conv1.weight": hf_state[f"{embeddings}.patch_embedding.weight"],
        "visual.class_embedding": hf_state[f"{embeddings}.class_embedding"],
        "visual.positional_embedding": hf_state[f"{embeddings}.position_embedding.weight"],
        "visual.proj": hf_state["visual_projection.weight"].T,
        "token_embedding.weight": hf_state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf_state["text_model.embeddings.position_embedding.weight"],
        "text_projection": hf_state["text_projection.weight"].T,
    }
    # Modules whose weight and bias are the same tensors in both namings.
    same = {
        "visual.ln_pre": "vision_model.pre_layrnorm",
        "visual.ln_post": "vision_model.post_layernorm",
        "ln_final": "text_model.final_layer_norm",
    }
    blocks = [
        *(
            (f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
            for i in range(TINY.image_depth)
        ),
        *(
            (f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
            for i in range(TINY.text_depth)
        ),
    ]
    for block, hf_block in blocks:
        same |= {f"{block}.{a}": f"{hf_block}.{b}" for a, b in BLOCK_MODULES.items()}
        for leaf in ("weight", "bias"):
            qkv = [hf_state[f"{hf_block}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            openai[f"{block}.attn.in_proj_{leaf}"] = torch.cat(qkv)
    for module, hf_module in same.items():
        for leaf in ("weight", "bias"):
            openai[f"{module}.{leaf}"] = hf_state[f"{hf_module}.{leaf}"]
    assert len(openai) == len(hf_state) - 4 * len(blocks)  # 6 q/k/v tensors -> 2 in_proj

    path = tmp_path / "epoch_1.pt"  # as open_clip's training writes it, under DDP
    wrapped = {f"module.{key}": value.contiguous() for key, value in openai.items()}
    torch.save({"epoch": 1, "name": "tiny", "state_dict": wrapped}, path)
    params = clip_checkpoint.load(path, NAME, image_size=TINY.image_size)
    assert_parity(params, hf["reference"], hf["pixels"], hf["ids"], "openai naming from hf")


def test_half_precision_safetensors_become_float32(hf, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    halves = [torch.float16, torch.bfloat16]
    state = {
        key: value.to(halves[i % 2]).contiguous()
        for i, (key, value) in enumerate(hf["model"].state_dict().items())
    }
    safetensors_torch.save_file(state, tmp_path / "half.safetensors")
    read = clip_checkpoint.read_state_dict(tmp_path / "half.safetensors")
    assert read.keys() == state.keys()
    for key, value in state.items():  # bfloat16 is the top half of a float32: exact
        np.testing.assert_array_equal(read[key].astype(np.float32), value.float().numpy(), key)
    params = clip_checkpoint.load(tmp_path / "half.safetensors", NAME, image_size=TINY.image_size)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


def test_hugging_face_file_that_does_not_fit(hf, tmp_path):
    with pytest.raises(ValueError, match=r"hf naming\) holds CLIP clip_tiny4 .*not the configured"):
        clip_checkpoint.load(hf["dir"] / "model.safetensors", "clip_b32", image_size=224)
    state = clip_checkpoint.read_state_dict(hf["dir"] / "model.safetensors")
    state["vision_model.extra.weight"] = np.zeros(3, np.float32)
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    safetensors.numpy.save_file(state, tmp_path / "edited.safetensors")
    with pytest.raises(ValueError, match="hf naming") as error:
        clip_checkpoint.load(tmp_path / "edited.safetensors", NAME, image_size=TINY.image_size)
    message = str(error.value)
    assert "missing keys: ['text/Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias']" in message
    assert "unexpected keys: ['vision_model.extra.weight']" in message


# --- OpenAI's reference implementation ------------------------------------------------------


def openai_model_module():
    """OpenAI's ``clip/model.py``, loaded alone: ``import clip`` needs torchvision."""
    spec = importlib.util.find_spec("clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's reference is missing: pip install openai-clip")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_openai_parity(tmp_path):
    torch = pytest.importorskip("torch")
    reference = openai_model_module()
    model = reference.CLIP(
        embed_dim=TINY.embed_dim,
        image_resolution=TINY.image_size,
        vision_layers=TINY.image_depth,
        vision_width=TINY.image_width,
        vision_patch_size=TINY.patch_size,
        context_length=clip.CONTEXT_LENGTH,
        vocab_size=clip.VOCAB_SIZE,
        transformer_width=TINY.text_width,
        transformer_heads=HEADS,
        transformer_layers=TINY.text_depth,
    )
    # OpenAI derives the image heads as width // 64, one for this 64-wide tower; clip_tiny4 has
    # two. The attention's parameters do not depend on the head count, only its computation.
    for block in model.visual.transformer.resblocks:
        block.attn = torch.nn.MultiheadAttention(TINY.image_width, HEADS)
    randomize(model, torch, seed=2)
    with torch.no_grad():  # OpenAI released float16 weights: make them representable in it
        for param in model.parameters():
            param.copy_(param.half().float())
    model.eval()

    pixels, ids = images(seed=3), token_ids(seed=3)
    pixel_values, input_ids = torch.tensor(pixels, dtype=torch.float32), torch.tensor(ids)
    with torch.no_grad():
        want = {
            "image": model.encode_image(pixel_values).numpy(),
            "text": model.encode_text(input_ids).numpy(),
            "logits": model(pixel_values, input_ids)[0].numpy(),
        }
        traced = torch.jit.trace(model, (pixel_values, input_ids))
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "state_dict.pt")

    for filename in ("ViT-tiny.pt", "state_dict.pt"):
        params = clip_checkpoint.load(tmp_path / filename, NAME, image_size=TINY.image_size)
        assert_parity(params, want, pixels, ids, f"openai {filename}")


# --- Without torch ---------------------------------------------------------------------------


def test_npz_round_trip_and_resampled_position_embedding(tmp_path):
    params = random_tree()
    vit_checkpoint.save_npz(tmp_path / "tiny.npz", params)
    loaded = clip_checkpoint.load(tmp_path / "tiny.npz", NAME, image_size=TINY.image_size)
    jax.tree.map(assert_same, loaded, params)

    bigger = clip_checkpoint.load(tmp_path / "tiny.npz", NAME, image_size=2 * TINY.image_size)
    posemb = params["image"]["Transformer"]["posembed_input"]["pos_embedding"]
    side = 2 * TINY.image_size // TINY.patch_size
    np.testing.assert_array_equal(
        bigger["image"]["Transformer"]["posembed_input"]["pos_embedding"],
        vit_checkpoint.resample_posemb(posemb, (side, side), has_cls=True),
    )


def test_missing_and_unexpected_keys_are_named(tmp_path):
    flat = vit_checkpoint.flatten(random_tree())
    del flat["image/Transformer/encoderblock_1/LayerNorm_1/scale"]
    flat["text/extra"] = np.zeros(2, np.float32)
    np.savez(tmp_path / "edited.npz", **flat)
    with pytest.raises(ValueError) as error:
        clip_checkpoint.load(tmp_path / "edited.npz", NAME, image_size=TINY.image_size)
    message = str(error.value)
    assert "missing keys: ['image/Transformer/encoderblock_1/LayerNorm_1/scale']" in message
    assert "unexpected keys: ['text/extra']" in message


def test_wrong_or_unknown_variant_or_naming_fail_clearly(tmp_path):
    params = random_tree()
    vit_checkpoint.save_npz(tmp_path / "tiny.npz", params)
    with pytest.raises(
        ValueError, match=r"holds CLIP clip_tiny4 \(.*\), not the configured clip_b16"
    ):
        clip_checkpoint.load(tmp_path / "tiny.npz", "clip_b16", image_size=224)
    params["text"]["Transformer"].pop("encoderblock_1")  # a 1-layer text tower: no known variant
    vit_checkpoint.save_npz(tmp_path / "shallow.npz", params)
    with pytest.raises(ValueError, match=r"a CLIP of no known variant \(.*text_depth=1\)"):
        clip_checkpoint.load(tmp_path / "shallow.npz", NAME, image_size=TINY.image_size)

    safetensors.numpy.save_file(
        {"encoder.weight": np.zeros(2, np.float32)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(ValueError, match=r"unknown naming.*\['encoder.weight'\]"):
        clip_checkpoint.load(tmp_path / "x.safetensors", NAME, image_size=TINY.image_size)
    with pytest.raises(ValueError, match="unknown CLIP backbone 'clip_b99'"):
        clip_checkpoint.load(tmp_path / "shallow.npz", "clip_b99", image_size=224)


def test_clip_b32_parameter_count():
    """OpenAI's ViT-B/32 has 151,277,313 parameters (its notebook "Interacting with CLIP" prints
    ``Model parameters: 151,277,313``; open_clip's model profile lists 87.85M for the image tower
    and 151.28M in all). Ours: the same tensors, so the same count."""
    abstract = jax.eval_shape(lambda rng: clip.init_params("clip_b32", rng), jax.random.key(0))
    assert vit_checkpoint.count_params(abstract["image"]) == 87_849_216
    assert vit_checkpoint.count_params(abstract) == 151_277_313


def test_convert_cli_round_trip(hf, tmp_path):
    output = tmp_path / "tiny.npz"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jprompt.tools.convert_clip",
            f"--input={hf['dir'] / 'model.safetensors'}",
            f"--output={output}",
            f"--name={NAME}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "naming: hf" in result.stdout
    assert f"variant: {NAME} at image size {TINY.image_size}" in result.stdout
    count = vit_checkpoint.count_params(random_tree())
    assert f"parameters: {count:,}" in result.stdout
    converted = clip_checkpoint.load(output, NAME, image_size=TINY.image_size)
    direct = clip_checkpoint.load(hf["dir"] / "model.safetensors", NAME, image_size=TINY.image_size)
    jax.tree.map(assert_same, converted, direct)
