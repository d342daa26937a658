"""Backbones by name: ``build`` makes the ``jprompt.models.backbone.Backbone`` named in a config
and its parameters, read from a checkpoint (vit_jax / big_vision ``.npz``, converted CLIP files)
or drawn at random, with the pixel normalization those checkpoints were trained with.
"""

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict

from jprompt.models import clip, clip_checkpoint, vit, vit_checkpoint
from jprompt.models.backbone import Backbone, TextEncoder

NAMES = vit.NAMES + clip.NAMES
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# vit_jax and big_vision checkpoints expect pixels in [-1, 1]; CLIP its own mean/std scaling.
VIT_NORMALIZATION = "minus_one_to_one"
CLIP_NORMALIZATION = "clip"


def default_config(name: str, **overrides) -> ConfigDict:
    """``config.backbone`` for ``build``: the backbone ``name`` with default options (random init
    without a ``checkpoint``); ``overrides`` replace any of them."""
    config = ConfigDict(
        dict(
            name=name,
            checkpoint="",
            pool="tok",
            dropout_rate=0.0,
            representation_size=0,  # 0 = none; 768 etc. for the original IN-21k ViT files
            # the MLP's, as the checkpoint was trained: "" = the family's (vit_*: gelu_tanh as
            # vit_jax / big_vision; clip_*: quick_gelu, both towers) | gelu_tanh | gelu_exact
            # (PyTorch-trained weights: timm, DINOv2, MAE; VPT's code) | quick_gelu
            activation="",
            compute_dtype="float32",  # float32 | bfloat16 (matmuls and activations)
            param_dtype="float32",  # float32 | bfloat16: storage of the frozen weights
            remat=False,  # recompute each block in the backward: less memory, ~1 more forward
            # heads_major | xla | cudnn (jax.nn.dot_product_attention's fused GPU kernel)
            attention="heads_major",
        )
    )
    config.update(overrides)
    return config


def activation(config: ConfigDict) -> str:
    """``config.activation``, with "" resolved to the default of the backbone's family."""
    if config.activation:
        return config.activation
    return clip.ACTIVATION if config.name in clip.NAMES else vit.DEFAULT_ACTIVATION


def build(config: ConfigDict, *, image_size: int, rng: jax.Array) -> tuple[Backbone, dict]:
    """The backbone named by ``config.name`` and its parameters.

    ``config.checkpoint``: an ``.npz`` in vit_jax or big_vision naming (local or ``gs://``); the
    position embedding is resampled to ``image_size`` and any head is dropped. Empty: random
    initialisation from ``rng`` (for tests and from-scratch training).

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
    if config.name in clip.NAMES:
        backbone, params = _build_clip(config, image_size=image_size, rng=rng)
    else:
        backbone, params = _build_vit(config, image_size=image_size, rng=rng)
    return backbone, jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params)


def _module_options(config: ConfigDict) -> dict:
    return dict(
        dtype=DTYPES[config.compute_dtype],
        remat=config.remat,
        attention=config.attention,
        activation=activation(config),
    )


def _build_vit(config: ConfigDict, *, image_size: int, rng: jax.Array):
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
    if config.checkpoint:
        logging.info("Loading %s weights from %s", config.name, config.checkpoint)
        params = vit_checkpoint.load_pretrained(config.checkpoint, module, image_size=image_size)
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
