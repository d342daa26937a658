"""The released PyTorch ``.pth`` files of DINOv2, MAE and MoCo v3 as parameters of
``jprompt.models.vit.VisionTransformer``, read without torch (``torch_checkpoint``).

All three save a timm-style ViT (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``); per family:

- ``dinov2`` (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``, a bare state dict): LayerScale
  ``blocks.{i}.ls{1,2}.gamma``, ``register_tokens`` (the ``_reg4`` files), SwiGLU
  ``mlp.{w12, w3}`` for ViT-g/14; ``mask_token`` (iBOT's, unused at inference) is dropped.
- ``mae`` (``mae_pretrain_vit_base.pth``: ``{"model": state dict}``): the encoder; its
  ``pos_embed`` is the fixed sin-cos table with a zero CLS slot.
- ``mocov3`` (``vit-b-300ep.pth.tar`` or ``linear-vit-b-300ep.pth.tar``, the file VPT loads:
  ``{"state_dict": ...}`` with ``module.base_encoder.`` or ``module.`` prefixes): the base
  encoder; the momentum encoder, the predictor and the ``head`` (projection MLP or linear
  classifier) are dropped, as MoCo v3's ``main_lincls.py`` does.

Position embeddings are resampled once at load time to the run's grid (``image_size //
patch``), with the method the family's own code applies at every forward (so the outputs are
the same): DINOv2 ``interpolate_pos_encoding`` (bicubic; without registers with its 0.1 offset
in the scale factor and no antialiasing, with registers to the exact size with antialiasing,
as its hub entries set), MAE's ``interpolate_pos_embed`` (bicubic to the size, no
antialiasing; also used for MoCo v3, whose code has none). The CLS slot is kept.
"""

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from jprompt.errors import InputError, MissingFileError
from jprompt.models import torch_checkpoint, torch_interpolate, vit_checkpoint
from jprompt.models.vit import VisionTransformer

FAMILIES = ("dinov2", "mae", "mocov3")
FAMILY_TITLES = {"dinov2": "DINOv2", "mae": "MAE", "mocov3": "MoCo v3"}
DINOV2_OFFSET = 0.1  # DINOv2's interpolate_offset without registers (0 with registers)

# Entries of the released files that the image encoder does not use.
_UNUSED_PREFIXES = {
    "dinov2": ("mask_token",),
    "mae": ("mask_token", "decoder", "head."),
    "mocov3": ("head.",),
}


def load(path, family: str, model: VisionTransformer, *, image_size: int) -> dict:
    """Parameters for ``model`` (without a head) at ``image_size`` from the ``family``'s ``.pth``
    file at ``path``; an ``InputError`` names the file and the first missing key or the
    unexpected ones (e.g. a file of another family)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown checkpoint family {family!r}; valid choices: {FAMILIES}")
    path = _existing(path, family)
    state = _state_dict(torch_checkpoint.load(path), path, family)
    params = _convert(dict(state), path, family, model)
    side = image_size // model.patch_size
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    params["Transformer"]["posembed_input"]["pos_embedding"] = resample_posemb(
        posemb, side, family, registers=model.num_registers
    )
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    want = {key: leaf.shape for key, leaf in vit_checkpoint.flatten(expected).items()}
    for key, value in vit_checkpoint.flatten(params).items():
        if value.shape != want[key]:
            raise InputError(
                f"{path} does not fit the model: {key} is {value.shape} in the file but "
                f"{want[key]} in the model; is it the {FAMILY_TITLES[family]} file of this size?"
            )
    return params


def resample_posemb(posemb: np.ndarray, side: int, family: str, *, registers: int) -> np.ndarray:
    """The (1, 1 + M*M, D) position embedding for a ``side`` x ``side`` patch grid, resampled as
    the ``family``'s code does (see the module docstring); unchanged when M == side."""
    grid = posemb[0, 1:]
    old = round(np.sqrt(grid.shape[0]))
    if old * old != grid.shape[0]:
        raise InputError(f"position embedding grid of {grid.shape[0]} tokens is not square")
    if old == side:
        return posemb
    logging.info("Resampling the position embedding grid %dx%d -> %dx%d", old, old, side, side)
    grid = grid.reshape(old, old, -1)
    if family == "dinov2" and not registers:
        factor = (side + DINOV2_OFFSET) / old
        grid = torch_interpolate.interpolate(grid, scale_factor=(factor, factor))
    else:
        antialias = family == "dinov2"
        grid = torch_interpolate.interpolate(grid, (side, side), antialias=antialias)
    return np.concatenate([posemb[:, :1], grid.reshape(1, side * side, -1)], axis=1)


def _existing(path, family: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if not epath.Path(path).exists():
        raise MissingFileError(
            f"there is no {FAMILY_TITLES[family]} checkpoint {path}: download the released .pth "
            "file (docs/backbones.md) and set --config.backbone.checkpoint to it"
        )
    return path


def _state_dict(obj, path: str, family: str) -> Mapping:
    """The encoder's ``{name: array}``: unwrapped from MAE's ``model`` or MoCo's
    ``state_dict`` entry, with MoCo v3's ``module.[base_encoder.]`` prefixes removed."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(f"{path} holds no state dict of a {FAMILY_TITLES[family]} ViT")
    if any(key.startswith("module.") for key in obj):
        base = "module.base_encoder."
        prefix = base if any(key.startswith(base) for key in obj) else "module."
        obj = {key[len(prefix) :]: value for key, value in obj.items() if key.startswith(prefix)}
    return {key: value for key, value in obj.items() if isinstance(value, np.ndarray)}


class _Keys:
    """Takes entries out of a state dict, naming the file and key when one is missing."""

    def __init__(self, state: dict, path: str, family: str):
        self.state, self.path, self.family = state, path, family

    def pop(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise InputError(
                f"{self.path} has no {key!r}, which a {FAMILY_TITLES[self.family]} checkpoint "
                f"has{_looks_like(self.state, self.family)}"
            )
        return self.state.pop(key)

    def linear(self, prefix: str) -> dict:
        """A ``torch.nn.Linear`` (out, in) as a flax Dense (in, out)."""
        return {"kernel": self.pop(f"{prefix}.weight").T, "bias": self.pop(f"{prefix}.bias")}

    def layernorm(self, prefix: str) -> dict:
        return {"scale": self.pop(f"{prefix}.weight"), "bias": self.pop(f"{prefix}.bias")}


def _looks_like(state: Mapping, family: str) -> str:
    """A hint when the file is of another family or another kind of model."""
    keys = list(state)
    if family == "dinov2" and "blocks.0.ls1.gamma" in state and "register_tokens" not in state:
        return ": it has no register tokens; use the dinov2_* backbone without _reg"
    if any(key.endswith(".ls1.gamma") for key in keys) and family != "dinov2":
        return ": it looks like a DINOv2 file (LayerScale); use a dinov2_* backbone"
    if family == "dinov2" and "blocks.0.norm1.weight" in state:
        return ": it has no LayerScale, so it is no DINOv2 file (MAE or MoCo v3? use mae_b16 or "
        "mocov3_b16)"
    if family == "mae" and "fc_norm.weight" in state:
        return ": it is a fine-tuned MAE file (fc_norm instead of norm); use mae_pretrain_*.pth"
    return f" (its first keys: {keys[:4]})"


def _convert(state: dict, path: str, family: str, model: VisionTransformer) -> dict:
    keys = _Keys(state, path, family)
    kernel = keys.pop("patch_embed.proj.weight")  # (D, 3, P, P) -> (P, P, 3, D)
    params = {
        "embedding": {
            "kernel": kernel.transpose(2, 3, 1, 0),
            "bias": keys.pop("patch_embed.proj.bias"),
        },
        "cls": keys.pop("cls_token"),
    }
    if model.num_registers:
        params["registers"] = keys.pop("register_tokens")
    encoder = {"posembed_input": {"pos_embedding": keys.pop("pos_embed")}}
    for i in range(model.depth):
        encoder[f"encoderblock_{i}"] = _block(keys, f"blocks.{i}", model)
    encoder["encoder_norm"] = keys.layernorm("norm")
    params["Transformer"] = encoder

    left = [k for k in state if not k.startswith(_UNUSED_PREFIXES[family])]
    if left:
        hint = (
            ": it has register tokens; use a dinov2_*_reg backbone"
            if "register_tokens" in left
            else _looks_like(state, family)
        )
        more = " ..." if len(left) > 6 else ""
        raise InputError(
            f"{path} has entries a {FAMILY_TITLES[family]} {model.depth}-block ViT does not "
            f"use: {left[:6]}{more}{hint}"
        )
    return params


def _block(keys: _Keys, prefix: str, model: VisionTransformer) -> dict:
    width, heads = model.hidden_size, model.num_heads
    qkv = keys.pop(f"{prefix}.attn.qkv.weight").reshape(3, heads, width // heads, width)
    qkv_bias = keys.pop(f"{prefix}.attn.qkv.bias").reshape(3, heads, width // heads)
    attention = {
        name: {"kernel": qkv[j].transpose(2, 0, 1), "bias": qkv_bias[j]}
        for j, name in enumerate(("query", "key", "value"))
    }
    out = keys.linear(f"{prefix}.attn.proj")
    attention["out"] = {"kernel": out["kernel"].reshape(heads, -1, width), "bias": out["bias"]}
    names = ("w12", "w3") if model.ffn == "swiglu" else ("fc1", "fc2")
    block = {
        "LayerNorm_0": keys.layernorm(f"{prefix}.norm1"),
        "MultiHeadDotProductAttention_0": attention,
        "LayerNorm_1": keys.layernorm(f"{prefix}.norm2"),
        "MlpBlock_0": {
            f"Dense_{j}": keys.linear(f"{prefix}.mlp.{name}") for j, name in enumerate(names)
        },
    }
    if model.layerscale:
        for j in range(2):
            block[f"LayerScale_{j}"] = {"scale": keys.pop(f"{prefix}.ls{j + 1}.gamma")}
    return block
