"""Backbones by name: ``build`` makes the ``jprompt.models.backbone.Backbone`` named in a config
and its parameters, read from a checkpoint (vit_jax / big_vision ``.npz``, converted CLIP files,
the released DINOv2, MAE and MoCo v3 ``.pth`` files) or drawn at random, with the pixel
normalization those checkpoints were trained with.
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict

from jprompt.errors import InputError
from jprompt.models import (
    clip,
    clip_checkpoint,
    siglip,
    siglip_checkpoint,
    siglip_tokenizer,
    torch_vit_checkpoint,
    vit,
    vit_checkpoint,
)
from jprompt.models.backbone import Backbone, TextEncoder


@dataclasses.dataclass(frozen=True)
class TorchViT:
    """A ViT released as a PyTorch ``.pth`` file (``torch_vit_checkpoint``): its family, its
    size and the name of the released file (``file``, downloadable from ``url``)."""

    family: str  # one of torch_vit_checkpoint.FAMILIES
    patch_size: int
    hidden_size: int
    depth: int
    mlp_dim: int  # the MLP's hidden width (SwiGLU: of each half)
    num_heads: int
    file: str = ""
    url: str = ""
    num_registers: int = 0
    ffn: str = "mlp"

    @property
    def layerscale(self) -> bool:
        return self.family == "dinov2"


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"
# DINOv2's hub entries (dinov2/hub/backbones.py): ViT-S/B/L/g at patch 14, registers 0 or 4;
# ViT-g/14 ("vit_giant2") is 1536 wide with SwiGLU (hidden (int(4 * 1536 * 2/3) + 7) // 8 * 8).
_DINOV2_SIZES = {
    "s": (384, 12, 1536, 6, "mlp"),
    "b": (768, 12, 3072, 12, "mlp"),
    "l": (1024, 24, 4096, 16, "mlp"),
    "g": (1536, 40, 4096, 24, "swiglu"),
}


def _dinov2(size: str, registers: int) -> TorchViT:
    hidden, depth, mlp, heads, ffn = _DINOV2_SIZES[size]
    stem = f"dinov2_vit{size}14"
    file = f"{stem}{f'_reg{registers}' if registers else ''}_pretrain.pth"
    return TorchViT(
        "dinov2", 14, hidden, depth, mlp, heads, file, f"{_DINOV2_URL}{stem}/{file}", registers, ffn
    )


# Tiny members of each family (random weights) for tests and offline demos only.
TORCH_VITS: dict[str, TorchViT] = {
    **{f"dinov2_{size}14": _dinov2(size, 0) for size in _DINOV2_SIZES},
    **{f"dinov2_{size}14_reg": _dinov2(size, 4) for size in _DINOV2_SIZES},
    "dinov2_tiny4_reg": TorchViT("dinov2", 4, 32, 2, 128, 2, num_registers=4),
    "mae_b16": TorchViT(
        "mae",
        16,
        768,
        12,
        3072,
        12,
        "mae_pretrain_vit_base.pth",
        "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
    ),
    "mae_tiny4": TorchViT("mae", 4, 32, 2, 128, 2),
    # VPT loads MoCo v3's linear-probe file; its backbone is the pretrained base encoder.
    "mocov3_b16": TorchViT(
        "mocov3",
        16,
        768,
        12,
        3072,
        12,
        "linear-vit-b-300ep.pth.tar",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar",
    ),
    "mocov3_tiny4": TorchViT("mocov3", 4, 32, 2, 128, 2),
}
# Where ``config_lib`` expects each released file (``~/jprompt_models/<file>``).
TORCH_VIT_FILES = {name: spec.file for name, spec in TORCH_VITS.items() if spec.file}

NAMES = vit.NAMES + clip.NAMES + tuple(TORCH_VITS) + siglip.NAMES
# Where ``config_lib`` expects each released SigLIP file (``~/jprompt_models/<file>``).
SIGLIP_FILES = {name: spec.file for name, spec in siglip.VARIANTS.items() if spec.file}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# vit_jax and big_vision checkpoints expect pixels in [-1, 1]; CLIP its own mean/std scaling;
# DINOv2, MAE and MoCo v3 ImageNet's mean/std (their transforms' Normalize).
VIT_NORMALIZATION = "minus_one_to_one"
CLIP_NORMALIZATION = "clip"
TORCH_VIT_NORMALIZATION = "imagenet"
# All three train with PyTorch's exact nn.GELU and LayerNorm(eps=1e-6).
TORCH_VIT_ACTIVATION = "gelu_exact"


def default_pool(name: str) -> str:
    """MAE's ``global_pool`` for ``mae_*`` (VPT's MAE runs, and SPT's after them, pool so);
    the CLS token for every other backbone."""
    spec = TORCH_VITS.get(name)
    return "global_pool" if spec is not None and spec.family == "mae" else "tok"


def default_config(name: str, **overrides) -> ConfigDict:
    """``config.backbone`` for ``build``: the backbone ``name`` with default options (random init
    without a ``checkpoint``); ``overrides`` replace any of them."""
    config = ConfigDict(
        dict(
            name=name,
            checkpoint="",
            pool=default_pool(name),  # tok | gap | global_pool (jprompt.models.vit.POOLS)
            dropout_rate=0.0,
            representation_size=0,  # 0 = none; 768 etc. for the original IN-21k ViT files
            # the MLP's, as the checkpoint was trained: "" = the family's (vit_*: gelu_tanh as
            # vit_jax / big_vision; clip_*: quick_gelu, both towers; dinov2_*, mae_*, mocov3_*:
            # gelu_exact) | gelu_tanh | gelu_exact (PyTorch-trained weights: timm, DINOv2, MAE;
            # VPT's code) | quick_gelu. DINOv2's SwiGLU (dinov2_g14*) uses none of them.
            activation="",
            compute_dtype="float32",  # float32 | bfloat16 (matmuls and activations)
            param_dtype="float32",  # float32 | bfloat16: storage of the frozen weights
            remat=False,  # recompute each block in the backward: less memory, ~1 more forward
            # heads_major | xla | cudnn (jax.nn.dot_product_attention's fused GPU kernel)
            attention="heads_major",
        )
    )
    if name in siglip.NAMES:
        # The SentencePiece model of the text tower (zero-shot head only): big_vision's c4_en
        # for the English WebLI models (gs://t5-data/vocabs/cc_en.32000/sentencepiece.model).
        config.tokenizer = "~/jprompt_models/sentencepiece.model"
    config.update(overrides)
    return config


def activation(config: ConfigDict) -> str:
    """``config.activation``, with "" resolved to the default of the backbone's family."""
    if config.activation:
        return config.activation
    if config.name in TORCH_VITS:
        return TORCH_VIT_ACTIVATION
    return clip.ACTIVATION if config.name in clip.NAMES else vit.DEFAULT_ACTIVATION


def build(
    config: ConfigDict,
    *,
    image_size: int,
    rng: jax.Array,
    source_head: bool = False,
    text: bool = False,
) -> tuple[Backbone, dict]:
    """The backbone named by ``config.name`` and its parameters.

    ``source_head``: keep the checkpoint's own classifier as ``Backbone.source_head``, for a
    label mapping (a vit_jax / big_vision ViT file with its head only). ``text``: a SigLIP
    backbone also loads its text tower and the SentencePiece model ``config.tokenizer``
    (``Backbone.text``, for a zero-shot head); CLIP always has its own.

    ``config.checkpoint``: an ``.npz`` in vit_jax or big_vision naming (local or ``gs://``), or
    for ``TORCH_VITS`` the family's released ``.pth`` file; the position embedding is resampled
    to ``image_size`` and any head is dropped. Empty: random initialisation from ``rng`` (for
    tests and from-scratch training).

    Speed and memory: ``config.compute_dtype`` is the module's compute dtype,
    ``config.param_dtype`` the dtype the returned (frozen) parameters are stored in, and
    ``config.remat`` rematerialises every encoder block in the backward pass, and
    ``config.attention`` picks how self-attention is computed (``vit.ATTENTIONS``).
    ``config.activation`` is the MLP activation (see ``activation``); with CLIP, both towers'.
    """
    if config.name not in NAMES:
        raise ValueError(f"unknown backbone {config.name!r}; valid choices: {list(NAMES)}")
    for field in ("compute_dtype", "param_dtype"):
        if config[field] not in DTYPES:
            raise ValueError(
                f"unknown backbone.{field} {config[field]!r}; valid choices: {list(DTYPES)}"
            )
    if config.attention not in vit.ATTENTIONS:
        raise ValueError(
            f"unknown backbone.attention {config.attention!r}; valid choices: {vit.ATTENTIONS}"
        )
    if activation(config) not in vit.ACTIVATIONS:
        raise ValueError(
            f"unknown backbone.activation {config.activation!r}; valid choices: "
            f"{['', *vit.ACTIVATIONS]} ('' = the backbone family's default)"
        )
    if source_head and (config.name not in vit.NAMES or not config.checkpoint):
        raise InputError(
            f"a label mapping reads the classifier of a ViT checkpoint file; {config.name} "
            f"{'has none' if config.checkpoint else 'is built without a checkpoint'}: use "
            "head=linear (or head=zeroshot on CLIP)"
        )
    if config.name in clip.NAMES:
        backbone, params = _build_clip(config, image_size=image_size, rng=rng)
    elif config.name in TORCH_VITS:
        backbone, params = _build_torch_vit(config, image_size=image_size, rng=rng)
    elif config.name in siglip.NAMES:
        backbone, params = _build_siglip(config, image_size=image_size, rng=rng, text=text)
    else:
        backbone, params = _build_vit(
            config, image_size=image_size, rng=rng, source_head=source_head
        )
    return backbone, jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params)


def _module_options(config: ConfigDict) -> dict:
    return dict(
        dtype=DTYPES[config.compute_dtype],
        remat=config.remat,
        attention=config.attention,
        activation=activation(config),
    )


def _build_vit(config: ConfigDict, *, image_size: int, rng: jax.Array, source_head: bool):
    module = vit.create(
        config.name,
        num_classes=0,
        pool=config.pool,
        dropout_rate=config.dropout_rate,
        representation_size=config.representation_size or None,
        **_module_options(config),
    )
    _check_image_size(config.name, image_size, module.patch_size)
    backbone = Backbone(config.name, module, image_size, VIT_NORMALIZATION)
    if source_head:
        logging.info("Loading %s weights and head from %s", config.name, config.checkpoint)
        params, head = vit_checkpoint.load_pretrained_with_head(
            config.checkpoint, module, image_size=image_size
        )
        backbone = dataclasses.replace(backbone, source_head=head)
    elif config.checkpoint:
        logging.info("Loading %s weights from %s", config.name, config.checkpoint)
        params = vit_checkpoint.load_pretrained(config.checkpoint, module, image_size=image_size)
    if config.checkpoint:
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    else:
        logging.warning(
            "No checkpoint given: %s starts from a RANDOM initialisation, which only makes "
            "sense for training from scratch (set backbone.checkpoint to a .npz file)",
            config.name,
        )
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = jax.jit(module.init)(rng, dummy)["params"]
    return backbone, params


def native_image_size(name: str) -> int:
    """The image size ``name``'s released weights were trained at: 224, or a SigLIP file's."""
    return siglip.VARIANTS[name].image_size if name in siglip.VARIANTS else 224


def _build_siglip(config: ConfigDict, *, image_size: int, rng: jax.Array, text: bool):
    """A SigLIP image tower (no CLS, MAP-pooled) from big_vision's .npz, or random weights;
    with ``text`` its text tower too. The zero-shot head is ``exp(t) * cos`` (``t`` as CLIP's
    logit scale): SigLIP's bias ``b`` shifts every class's logit alike, so it changes neither
    the softmax nor the prediction and is left out."""
    if config.pool not in ("tok", "map") or config.representation_size:
        raise InputError(
            f"{config.name} pools with its MAP head and has no representation layer: leave "
            "backbone.pool and backbone.representation_size at their defaults (got "
            f"{config.pool!r}, {config.representation_size})"
        )
    module = siglip.image_tower(
        config.name, dropout_rate=config.dropout_rate, **_module_options(config)
    )
    # No _check_image_size: big_vision's VALID patch convolution drops the remainder, as the
    # patch embedding does (So400m/14 at 384 px).
    backbone = Backbone(config.name, module, image_size, siglip.NORMALIZATION)
    text_module = siglip.text_tower(config.name) if text else None
    if config.checkpoint:
        logging.info("Loading %s weights from %s", config.name, config.checkpoint)
        if not text:
            params = siglip_checkpoint.load(config.checkpoint, module, image_size=image_size)
            return backbone, params
        params, text_params, t, _ = siglip_checkpoint.load_towers(
            config.checkpoint, module, text_module, image_size=image_size
        )
    else:
        file = siglip.VARIANTS[config.name].file
        logging.warning(
            "No checkpoint given: %s starts from a RANDOM initialisation; set "
            "backbone.checkpoint to %s",
            config.name,
            siglip.STORAGE + file if file else "(none: a tiny test backbone)",
        )
        image_rng, text_rng = jax.random.split(rng)
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = jax.jit(module.init)(image_rng, dummy)["params"]
        if not text:
            return backbone, params
        ids = jnp.zeros((1, siglip.TEXT_VARIANTS[config.name].context_length), jnp.int32)
        text_params, t = jax.jit(text_module.init)(text_rng, ids)["params"], 0.0
    tokenizer = siglip_tokenizer.Tokenizer(
        config.tokenizer, siglip.TEXT_VARIANTS[config.name].context_length
    )
    encoder = TextEncoder(text_module, text_params, t, tokenizer=tokenizer)
    return dataclasses.replace(backbone, text=encoder), params


def torch_vit_module(name: str, **overrides) -> vit.VisionTransformer:
    """The ``VisionTransformer`` of ``TORCH_VITS[name]`` without a head: a CLS token whatever
    the pool, LayerNorm eps 1e-6, exact GELU; ``overrides`` replace any module field."""
    spec = TORCH_VITS[name]
    fields = dict(
        num_classes=0,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        depth=spec.depth,
        mlp_dim=spec.mlp_dim,
        num_heads=spec.num_heads,
        class_token=True,
        num_registers=spec.num_registers,
        layerscale=spec.layerscale,
        ffn=spec.ffn,
        layernorm_epsilon=1e-6,
        activation=TORCH_VIT_ACTIVATION,
    )
    return vit.VisionTransformer(**{**fields, **overrides})


def _build_torch_vit(config: ConfigDict, *, image_size: int, rng: jax.Array):
    """DINOv2, MAE or MoCo v3 from its released ``.pth`` file (or random weights)."""
    if config.representation_size:
        raise ValueError(
            f"{config.name} has no representation layer: leave backbone.representation_size=0 "
            f"(got {config.representation_size})"
        )
    spec = TORCH_VITS[config.name]
    module = torch_vit_module(
        config.name, pool=config.pool, dropout_rate=config.dropout_rate, **_module_options(config)
    )
    _check_image_size(config.name, image_size, module.patch_size)
    backbone = Backbone(config.name, module, image_size, TORCH_VIT_NORMALIZATION)
    if config.checkpoint:
        logging.info("Loading %s weights from %s", config.name, config.checkpoint)
        params = torch_vit_checkpoint.load(
            config.checkpoint, spec.family, module, image_size=image_size
        )
    else:
        logging.warning(
            "No checkpoint given: %s starts from a RANDOM initialisation; set "
            "backbone.checkpoint to the released file %s",
            config.name,
            spec.url or "(none: a tiny test backbone)",
        )
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = jax.jit(module.init)(rng, dummy)["params"]
    return backbone, params


def _check_image_size(name: str, image_size: int, patch_size: int):
    if image_size % patch_size:
        raise ValueError(
            f"image size {image_size} is not a multiple of {name}'s patch size {patch_size}"
        )


def _build_clip(config: ConfigDict, *, image_size: int, rng: jax.Array):
    """A CLIP image tower as the backbone, with its text tower alongside."""
    if config.pool != "tok" or config.representation_size:
        raise ValueError(
            f"{config.name} pools its class token and has no representation layer: leave "
            f"backbone.pool='tok' and backbone.representation_size=0 (got "
            f"{config.pool!r}, {config.representation_size})"
        )
    module = clip.image_tower(
        config.name, dropout_rate=config.dropout_rate, **_module_options(config)
    )
    _check_image_size(config.name, image_size, module.patch_size)
    if config.checkpoint:
        logging.info("Loading %s weights from %s", config.name, config.checkpoint)
        params = clip_checkpoint.load(config.checkpoint, config.name, image_size=image_size)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    else:
        logging.warning(
            "No checkpoint given: %s starts from a RANDOM initialisation (its zero-shot head "
            "is meaningless); convert a released CLIP file with python -m "
            "jprompt.tools.convert_clip and set backbone.checkpoint",
            config.name,
        )
        params = clip.init_params(config.name, rng, image_size=image_size)
    text_tower = clip.text_tower(config.name, activation=activation(config))
    text = TextEncoder(text_tower, params["text"], float(params["logit_scale"]))
    backbone = Backbone(config.name, module, image_size, CLIP_NORMALIZATION, text=text)
    return backbone, params["image"]
