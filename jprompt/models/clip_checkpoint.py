"""CLIP weights from the files users have (OpenAI, open_clip, Hugging Face), without torch.

``load(path, name, image_size=...)`` returns the parameter tree of ``jprompt.models.clip``
(``{"image", "text", "logit_scale"}``) as float32 numpy arrays. Files are read by suffix:

- ``.pt`` / ``.pth`` / ``.bin`` (anything else too): ``torch.save`` zip archives through
  ``torch_checkpoint``, which never runs code from the file. A plain state dict (Hugging Face's
  ``pytorch_model.bin``, open_clip's ``open_clip_pytorch_model.bin``), open_clip's training
  checkpoints (``{"epoch", "state_dict", ...}``, keys prefixed ``module.`` under DDP), and
  OpenAI's released TorchScript archives (``ViT-B-32.pt``), walked into a state dict.
- ``.safetensors`` (``save_pretrained``, open_clip on the Hub): parsed by the ``safetensors``
  package. Its numpy API cannot return bfloat16 (numpy has no such type), so the package's parser
  hands over raw bytes and the arrays are built here, bfloat16 through the ``ml_dtypes`` type
  that JAX exports. float16 and bfloat16 become float32 exactly.
- ``.npz``: our own tree, flattened with "/"-joined keys, as ``convert_file`` writes it.

The naming is detected from the keys: "openai" (OpenAI's ``clip`` and open_clip: ``visual.*``,
``transformer.resblocks.*``, query/key/value stacked in ``attn.in_proj_*``), "hf" (transformers'
``CLIPModel``: ``vision_model.*``, ``text_model.*``, separate ``q/k/v_proj``) or "jprompt" (ours).
Buffers and bookkeeping (``position_ids``, ``attn_mask``, the ``input_resolution``,
``context_length`` and ``vocab_size`` scalars of OpenAI's TorchScript) are dropped; any other key
no rule knows is kept under its own name, so the fit check reports it as unexpected.

Layouts: a torch ``Linear`` weight is (out, in) and a Flax kernel (in, out); the patch conv is
(W, 3, P, P) in torch and (P, P, 3, W) in Flax; a position embedding gains a leading batch axis.
Attention kernels are split into heads, (W, H, W/H), with H taken from the configured backbone:
the split is a plain reshape and the file does not record H.

Before anything is reshaped to the model, the file's dimensions (widths, depths, patch size,
embedding size) are matched against ``jprompt.models.clip.VARIANTS``, so a file that is another
variant than the configured one fails with an error naming what it is. The weights cannot tell
the MLP activation: jprompt's towers default to quick_gelu, as OpenAI's models (and open_clip's
``*-quickgelu`` ones) were trained with; open_clip models trained with GELU load, and need
``backbone.activation="gelu_exact"``.
"""

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from absl import logging
from etils import epath

from jprompt.errors import InputError, MissingFileError
from jprompt.models import clip, torch_checkpoint, vit_checkpoint

NAMINGS = ("openai", "hf", "jprompt")
# Leaf names of buffers and scalars that are no weights of the model.
_IGNORED = frozenset(
    {"position_ids", "attn_mask", "input_resolution", "context_length", "vocab_size"}
)


def _conv_kernel(weight):
    return weight.transpose(2, 3, 1, 0)  # torch (W, 3, P, P) -> Flax (P, P, 3, W)


def _batch_axis(posemb):
    return posemb[None]  # (T, W) -> (1, T, W)


def _class_token(embedding):
    return embedding.reshape(1, 1, -1)  # (W,) -> (1, 1, W)


# How a torch module's tensors become ours: {torch leaf: (our leaf, transform)}. np.asarray keeps
# the array; np.transpose turns torch's (out, in) Linear weight into Flax's (in, out) kernel.
_Leaves = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]
_NORM: _Leaves = {"weight": ("scale", np.asarray), "bias": ("bias", np.asarray)}
_LINEAR: _Leaves = {"weight": ("kernel", np.transpose), "bias": ("bias", np.asarray)}
_CONV: _Leaves = {"weight": ("kernel", _conv_kernel)}
_EMBEDDING: _Leaves = {"weight": ("embedding", np.asarray)}
_POSEMB: _Leaves = {"weight": ("pos_embedding", _batch_axis)}


@dataclasses.dataclass(frozen=True)
class _Naming:
    """Where a naming's modules go in our tree.

    ``modules`` maps a module path (a key without its last component; "" for top-level tensors)
    to our path and its leaf table. ``block`` matches the module path of a transformer block's
    submodule, with groups ``tower`` (looked up in ``towers``), ``index`` and ``module`` (looked
    up in ``block_modules``, relative to ``<tower>/Transformer/encoderblock_<index>``).
    """

    modules: dict[str, tuple[str, _Leaves]]
    block: re.Pattern
    towers: dict[str, str]
    block_modules: dict[str, tuple[str, _Leaves]]


_ATTENTION = "MultiHeadDotProductAttention_0"
_OPENAI = _Naming(
    modules={
        "": (
            "",
            {
                "positional_embedding": (
                    "text/Transformer/posembed_input/pos_embedding",
                    _batch_axis,
                ),
                "text_projection": ("text/text_projection/kernel", np.asarray),  # x @ it: (in, out)
                "logit_scale": ("logit_scale", np.asarray),
            },
        ),
        "visual": (
            "image",
            {
                "class_embedding": ("cls", _class_token),
                "positional_embedding": ("Transformer/posembed_input/pos_embedding", _batch_axis),
                "proj": ("proj/kernel", np.asarray),  # x @ proj: already (in, out)
            },
        ),
        "visual.conv1": ("image/embedding", _CONV),
        "visual.ln_pre": ("image/Transformer/pre_norm", _NORM),
        "visual.ln_post": ("image/Transformer/encoder_norm", _NORM),
        "token_embedding": ("text/token_embedding", _EMBEDDING),
        "ln_final": ("text/Transformer/encoder_norm", _NORM),
    },
    block=re.compile(r"(?P<tower>visual\.|)transformer\.resblocks\.(?P<index>\d+)\.(?P<module>.+)"),
    towers={"visual.": "image", "": "text"},
    block_modules={
        "ln_1": ("LayerNorm_0", _NORM),
        "attn.q_proj": (f"{_ATTENTION}/query", _LINEAR),  # split from in_proj by _split_in_proj
        "attn.k_proj": (f"{_ATTENTION}/key", _LINEAR),
        "attn.v_proj": (f"{_ATTENTION}/value", _LINEAR),
        "attn.out_proj": (f"{_ATTENTION}/out", _LINEAR),
        "ln_2": ("LayerNorm_1", _NORM),
        "mlp.c_fc": ("MlpBlock_0/Dense_0", _LINEAR),
        "mlp.c_proj": ("MlpBlock_0/Dense_1", _LINEAR),
    },
)
_HF = _Naming(
    modules={
        "": ("", {"logit_scale": ("logit_scale", np.asarray)}),
        "vision_model.embeddings": ("image", {"class_embedding": ("cls", _class_token)}),
        "vision_model.embeddings.patch_embedding": ("image/embedding", _CONV),
        "vision_model.embeddings.position_embedding": ("image/Transformer/posembed_input", _POSEMB),
        "vision_model.pre_layrnorm": ("image/Transformer/pre_norm", _NORM),  # sic
        "vision_model.post_layernorm": ("image/Transformer/encoder_norm", _NORM),
        "visual_projection": ("image/proj", _LINEAR),
        "text_model.embeddings.token_embedding": ("text/token_embedding", _EMBEDDING),
        "text_model.embeddings.position_embedding": ("text/Transformer/posembed_input", _POSEMB),
        "text_model.final_layer_norm": ("text/Transformer/encoder_norm", _NORM),
        "text_projection": ("text/text_projection", _LINEAR),
    },
    block=re.compile(
        r"(?P<tower>vision|text)_model\.encoder\.layers\.(?P<index>\d+)\.(?P<module>.+)"
    ),
    towers={"vision": "image", "text": "text"},
    block_modules={
        "layer_norm1": ("LayerNorm_0", _NORM),
        "self_attn.q_proj": (f"{_ATTENTION}/query", _LINEAR),
        "self_attn.k_proj": (f"{_ATTENTION}/key", _LINEAR),
        "self_attn.v_proj": (f"{_ATTENTION}/value", _LINEAR),
        "self_attn.out_proj": (f"{_ATTENTION}/out", _LINEAR),
        "layer_norm2": ("LayerNorm_1", _NORM),
        "mlp.fc1": ("MlpBlock_0/Dense_0", _LINEAR),
        "mlp.fc2": ("MlpBlock_0/Dense_1", _LINEAR),
    },
)


class ConvertedFile(NamedTuple):
    """What ``convert_file`` found and wrote."""

    naming: str
    name: str
    image_size: int
    num_params: int


def load(path, name: str, *, image_size: int) -> dict:
    """The parameters of CLIP ``name`` (in ``clip.NAMES``) at ``image_size`` from ``path``.

    Reads any supported file, converts it, checks that it is CLIP ``name``, resamples the image
    position embedding (bilinearly, as ``vit_checkpoint.resample_posemb``) when ``image_size``
    gives another patch grid than the file's, and checks every key and shape against the model:
    a ValueError names whatever is missing, unexpected or mismatched. Returns a nested dict of
    float32 numpy arrays, ``{"image", "text", "logit_scale"}``.
    """
    path = os.path.expanduser(path)
    if not epath.Path(path).exists():
        raise MissingFileError(
            f"no CLIP weights at {path}: download the released file once and convert it, e.g. "
            f"python -m jprompt.tools.convert_clip --input=ViT-B-32.pt --output={path} "
            f"(or set backbone.checkpoint to an existing file)"
        )
    naming, params = convert(read_state_dict(path))
    params = _fit(params, name, image_size, f"{path} ({naming} naming)")
    logging.info("Loaded %s at image size %d from %s (%s naming)", name, image_size, path, naming)
    return params


def convert_file(src, dst, name: str | None = None) -> ConvertedFile:
    """Converts ``src`` (any supported file) into our ``.npz`` at ``dst``, at its own resolution.

    ``name`` defaults to the variant detected from the weights; given, it must agree with them.
    ``~`` in either path means the home directory; ``dst``'s directory is created.
    """
    src, dst = os.path.expanduser(src), epath.Path(os.path.expanduser(dst))
    naming, params = convert(read_state_dict(src))
    found = architecture(params)
    name = name or infer_name(params)
    if name is None:
        raise ValueError(
            f"cannot tell which of {list(clip.NAMES)} {src} holds"
            + (f" ({found})" if found else " (it lacks keys the variant is read from)")
            + "; pass the name to see what does not fit"
        )
    image_size = found.image_size if found else clip.variant(name).image_size
    params = _fit(params, name, image_size, f"{src} ({naming} naming)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    vit_checkpoint.save_npz(dst, params)
    return ConvertedFile(naming, name, image_size, vit_checkpoint.count_params(params))


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The flat ``{key: array}`` stored at ``path`` (local or ``gs://``), chosen by suffix."""
    suffix = epath.Path(path).suffix
    if suffix == ".npz":
        return vit_checkpoint.read_npz(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_torch(path) -> dict[str, np.ndarray]:
    obj = torch_checkpoint.load(path)
    if isinstance(obj, torch_checkpoint.ScriptObject):  # OpenAI's released TorchScript files
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # open_clip's training checkpoints
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {
        str(key).removeprefix("module."): value  # DDP's wrapper
        for key, value in obj.items()
        if isinstance(value, np.ndarray)
    }


# safetensors dtype names -> numpy dtypes (the format is little-endian).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _read_safetensors(path) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.deserialize(epath.Path(path).read_bytes())
    except safetensors.SafetensorError as error:
        raise InputError(f"{path} is not a readable safetensors file: {error}") from None
    state = {}
    for key, tensor in tensors:
        dtype = _SAFETENSORS_DTYPES.get(tensor["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {tensor['dtype']}")
        array = np.frombuffer(tensor["data"], dtype).reshape(tensor["shape"])
        state[key] = array.astype(np.float32) if dtype == jnp.bfloat16 else array
    return state


def detect_naming(keys) -> str:
    """Which of ``NAMINGS`` a state dict's keys follow; ValueError when none."""
    keys = list(keys)
    if any(key.startswith(("image/", "text/")) for key in keys):
        return "jprompt"
    if any(key.startswith("visual.layer1.") for key in keys):
        raise ValueError("CLIP with a ResNet image tower (RN50, ...) is not supported; use a ViT")
    if any(key.startswith("visual.") for key in keys):
        return "openai"
    if any(key.startswith(("vision_model.", "text_model.")) for key in keys):
        return "hf"
    raise ValueError(
        "unknown naming: expected OpenAI/open_clip keys (visual.conv1.weight, ...), Hugging Face "
        f"keys (vision_model.embeddings..., text_model...) or jprompt's; found {sorted(keys)[:8]}"
    )


def convert(state: Mapping[str, np.ndarray]) -> tuple[str, dict]:
    """A flat state dict in any supported naming -> (its naming, our nested tree).

    Attention weights stay unsplit, (W, W) and (W,), until ``load`` reshapes them to the
    configured number of heads.
    """
    naming = detect_naming(state)
    if naming == "jprompt":
        return naming, vit_checkpoint.unflatten(state)
    if naming == "openai":
        rules, state = _OPENAI, _split_in_proj(state)
    else:
        rules = _HF
    flat = dict(
        _rename(key, value, rules)
        for key, value in state.items()
        if key.rpartition(".")[2] not in _IGNORED
    )
    return naming, vit_checkpoint.unflatten(flat)


def _split_in_proj(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI's ``attn.in_proj_{weight,bias}`` stack query, key and value on the first axis (as
    transformers' own conversion script splits them); renamed as ``attn.{q,k,v}_proj.*``."""
    split = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("in_proj_weight", "in_proj_bias"):
            for part, array in zip("qkv", np.split(value, 3), strict=True):
                split[f"{module}.{part}_proj.{leaf.removeprefix('in_proj_')}"] = array
        else:
            split[key] = value
    return split


def _rename(key: str, value: np.ndarray, rules: _Naming) -> tuple[str, np.ndarray]:
    module, _, leaf = key.rpartition(".")
    modules, prefix = rules.modules, ""
    block = rules.block.fullmatch(module)
    if block:
        modules, module = rules.block_modules, block["module"]
        prefix = f"{rules.towers[block['tower']]}/Transformer/encoderblock_{block['index']}"
    target, leaves = modules.get(module, ("", {}))
    if leaf not in leaves:
        return key, value  # no CLIP weight: the fit check reports it under its own name
    name, transform = leaves[leaf]
    return "/".join(part for part in (prefix, target, name) if part), transform(value)


def architecture(params: Mapping) -> clip.Variant | None:
    """The dimensions of a converted tree, ``image_size`` from its position embedding grid; None
    when a key they are read from is missing."""
    try:
        image, text = params["image"], params["text"]
        patch, _, _, image_width = np.shape(image["embedding"]["kernel"])
        positions = np.shape(image["Transformer"]["posembed_input"]["pos_embedding"])[1]
        return clip.Variant(
            embed_dim=np.shape(image["proj"]["kernel"])[-1],
            image_size=patch * math.isqrt(positions - 1),
            patch_size=patch,
            image_width=image_width,
            image_depth=_depth(image),
            text_width=np.shape(text["token_embedding"]["embedding"])[-1],
            text_depth=_depth(text),
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _depth(tower: Mapping) -> int:
    return sum(name.startswith("encoderblock_") for name in tower["Transformer"])


def infer_name(params: Mapping) -> str | None:
    """Which of ``clip.NAMES`` a converted tree is (at any image size), None if none or unknown."""
    found = architecture(params)
    for name in clip.NAMES:
        variant = clip.variant(name)
        if found and dataclasses.replace(found, image_size=variant.image_size) == variant:
            return name
    return None


def _fit(params: dict, name: str, image_size: int, source) -> dict:
    """Checks the variant, splits heads, resamples the position embedding, checks every key.

    ``source`` names the file in errors.
    """
    clip.variant(name)  # a clear error for unknown names
    params = jax.tree.map(lambda x: np.asarray(x, np.float32, order="C"), params)
    found = architecture(params)
    if found is not None:
        detected = infer_name(params)
        if detected != name:
            what = f"CLIP {detected}" if detected else "a CLIP of no known variant"
            raise ValueError(
                f"{source} holds {what} ({found}), not the configured {name}; known "
                f"variants: {list(clip.NAMES)}"
            )
    expected = jax.eval_shape(
        functools.partial(clip.init_params, name, image_size=image_size), jax.random.key(0)
    )
    params = _split_heads(params, expected)
    if found is not None:  # then the position embedding is there: the grid was read from it
        side = image_size // found.patch_size
        posembed = params["image"]["Transformer"]["posembed_input"]
        if posembed["pos_embedding"].shape[1] != 1 + side * side:
            posembed["pos_embedding"] = vit_checkpoint.resample_posemb(
                posembed["pos_embedding"], (side, side), has_cls=True
            )
    vit_checkpoint.check_fits(params, expected, source)
    return params


def _split_heads(params: dict, expected: Mapping) -> dict:
    """Reshapes attention weights to the model's (W, H, W/H), (H, W/H) and (H, W/H, W).

    torch keeps each projection as one (in, out) matrix; splitting W = H * W/H into heads is a
    reshape, and reshaping a file already split (ours) to the model's H is the same linear map.
    """
    want = {key: leaf.shape for key, leaf in vit_checkpoint.flatten(expected).items()}
    flat = vit_checkpoint.flatten(params)
    for key, value in flat.items():
        shape = want.get(key)
        if f"/{_ATTENTION}/" in key and shape and value.size == math.prod(shape):
            flat[key] = value.reshape(shape)
    return vit_checkpoint.unflatten(flat)
