"""Import and export of ViT weights as ``.npz`` files, in vit_jax or big_vision naming.

``load_npz`` reads a file (local or ``gs://``, through ``etils.epath``) and returns the nested
parameter tree of ``jprompt.models.vit.VisionTransformer``, i.e. vit_jax's Linen naming. The
naming of the file is detected from its keys:

- vit_jax, Linen form: ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}``, ``Transformer/posembed_input/pos_embedding``. Returned as is.
- vit_jax, pre-Linen form (the published ViT and AugReg files): the submodules of a block are
  numbered by one counter (``LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3``). Renumbered per module type, which is what flax's ``convert_pre_linen`` does.
- big_vision: the position embedding is top-level ``pos_embedding`` and has no CLS slot, because
  big_vision adds it to the patches before prepending the CLS token. vit_jax adds it after, so
  the converted embedding gets a zero row for the CLS slot: the CLS token then receives exactly
  what it received in big_vision (nothing), and outputs are unchanged. Blocks are either unrolled
  (``Transformer/encoderblock_{i}``) or scanned (``Transformer/encoderblock`` with a leading
  depth axis on every array), which is split into per-layer blocks.
  Multihead attention pooling (``MAPHead_0``) has no counterpart here and is rejected.

Keys prefixed with ``params/`` (whole train-state files) are reduced to the parameters. A file
that is missing, unreachable (``gs://`` offline) or no ``.npz`` fails with an ``InputError`` that
names it and says how to get a good one.
"""

import collections
import math
import os
import re
import zipfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from absl import logging
from etils import epath

from jprompt.errors import InputError, MissingFileError
from jprompt.models.vit import VisionTransformer

_NUMBERED = re.compile(r"(.+)_(\d+)")
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files
NPZ = ".npz (the zip of named arrays numpy.savez writes)"


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays (or of ``jax.ShapeDtypeStruct``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def load_npz(path) -> dict:
    """The parameter tree stored in the ``.npz`` at ``path``, in vit_jax Linen naming."""
    return convert(read_npz(existing(path)))


def read_npz(path) -> dict[str, np.ndarray]:
    """The flat ``{key: array}`` of the ``.npz`` at ``path``; an InputError names the file when it
    is no ``.npz`` (numpy's own errors suggest unpickling it, which no checkpoint needs)."""
    flat = None
    try:
        with epath.Path(path).open("rb") as f:
            if f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
                f.seek(0)
                with np.load(f, allow_pickle=False) as data:
                    flat = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read {path} as a {NPZ}: {error}") from None
    if flat is None:
        raise InputError(f"{path} is not a {NPZ}: it is another format or a truncated download")
    not_arrays = sorted(key for key, value in flat.items() if not isinstance(value, np.ndarray))
    if not_arrays:  # numpy returns a zip entry that is no .npy as raw bytes
        raise InputError(
            f"{path} is a zip archive but not a {NPZ}: its entries {not_arrays[:3]} are no arrays"
        )
    return flat


def existing(path) -> str:
    """``path`` with ``~`` expanded, once it is known to exist; a MissingFileError says how to get
    it otherwise."""
    path = os.path.expanduser(os.fspath(path))
    try:
        exists = epath.Path(path).exists()
    except Exception as error:  # gs:// offline: each storage backend raises its own error types
        reason = " ".join(str(error).splitlines()[:1])
        raise MissingFileError(
            f"cannot reach the ViT checkpoint {path} ({type(error).__name__}: {reason}): "
            + _how_to_fetch(path)
        ) from None
    if not exists:
        raise MissingFileError(
            f"there is no ViT checkpoint {path}: set --config.backbone.checkpoint to an existing "
            f"{NPZ} in vit_jax or big_vision naming"
        )
    return path


def _how_to_fetch(path: str) -> str:
    if not path.startswith("gs://"):
        return "set --config.backbone.checkpoint to a readable copy"
    local = f"~/jprompt_models/{path.rsplit('/', 1)[-1]}"
    url = "https://storage.googleapis.com/" + path.removeprefix("gs://")
    return (
        f"fetch it once with gsutil cp {path} {local} (or download {url}) and set "
        f"--config.backbone.checkpoint={local}"
    )


def save_npz(path, params: Mapping) -> None:
    """Writes ``params`` as a flat ``.npz`` with "/"-joined keys (vit_jax Linen naming)."""
    flat = {key: np.asarray(value) for key, value in flatten(params).items()}
    with epath.Path(path).open("wb") as f:
        np.savez(f, **flat)


def convert(flat: Mapping[str, np.ndarray]) -> dict:
    """A flat ``{"a/b": array}`` checkpoint in any supported naming -> nested vit_jax Linen tree."""
    if any(key.startswith("params/") for key in flat):
        flat = {key[len("params/") :]: v for key, v in flat.items() if key.startswith("params/")}
    tree = unflatten(flat)

    if "MAPHead_0" in tree or "probe" in tree:
        raise ValueError(
            "checkpoint uses multihead attention pooling (big_vision pool_type='map'), which "
            "jprompt's ViT does not support; use a 'tok' or 'gap' checkpoint"
        )
    encoder = tree.setdefault("Transformer", {})

    if "encoderblock" in encoder:
        logging.info("Checkpoint has scanned encoder blocks (big_vision); splitting them")
        encoder.update(_unstack_blocks(encoder.pop("encoderblock")))

    for name in list(encoder):
        if name.startswith("encoderblock_"):
            encoder[name] = _renumber(encoder[name])

    if "pos_embedding" in tree:
        logging.info("Checkpoint uses big_vision naming: moving pos_embedding into Transformer")
        posemb = tree.pop("pos_embedding")
        if "cls" in tree:  # big_vision adds no position embedding to the CLS token: zero is exact
            posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
        encoder["posembed_input"] = {"pos_embedding": posemb}
    return tree


def _unstack_blocks(stacked: Mapping) -> dict:
    """``{leaf: (depth, ...)}`` of a scanned block -> ``{"encoderblock_{i}": {leaf: (...)}}``."""
    flat = flatten(stacked)
    depths = {value.shape[0] for value in flat.values()}
    if len(depths) != 1:
        raise ValueError(f"scanned encoder blocks disagree on their depth axis: {sorted(depths)}")
    depth = depths.pop()
    return {
        f"encoderblock_{i}": unflatten({key: value[i] for key, value in flat.items()})
        for i in range(depth)
    }


def _renumber(block: Mapping) -> dict:
    """Pre-Linen numbering (one counter for all submodules) -> one counter per module type.

    ``{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`` becomes
    ``{LayerNorm_0, LayerNorm_1, MultiHeadDotProductAttention_0, MlpBlock_0}``; names already in
    Linen form are unchanged. Applied recursively, as flax's ``convert_pre_linen`` does.
    """
    by_type = collections.defaultdict(list)
    renamed = {}
    for name, value in block.items():
        match = _NUMBERED.fullmatch(name)
        if match:
            by_type[match[1]].append((int(match[2]), value))
        else:
            renamed[name] = value
    for kind, numbered in by_type.items():
        for new_index, (_, value) in enumerate(sorted(numbered, key=lambda item: item[0])):
            renamed[f"{kind}_{new_index}"] = value
    return {k: _renumber(v) if isinstance(v, Mapping) else v for k, v in renamed.items()}


def resample_posemb(posemb, new_grid: tuple[int, int], has_cls: bool) -> np.ndarray:
    """Bilinearly resizes the (square) patch grid of a ``(1, [1 +] N, D)`` position embedding.

    As vit_jax does for fine-tuning at a new resolution: ``scipy.ndimage.zoom`` with
    ``order=1`` on the (g, g, D) grid. The CLS slot, if any, is kept unchanged.
    """
    posemb = np.asarray(posemb)
    cls_slot, grid = (posemb[:, :1], posemb[0, 1:]) if has_cls else (posemb[:, :0], posemb[0])
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise ValueError(f"position embedding grid of {grid.shape[0]} tokens is not square")
    new_h, new_w = new_grid
    logging.info("Resampling position embedding grid %dx%d -> %dx%d", side, side, new_h, new_w)
    grid = grid.reshape(side, side, -1)
    grid = scipy.ndimage.zoom(grid, (new_h / side, new_w / side, 1), order=1)
    grid = grid.reshape(1, new_h * new_w, -1)
    return np.concatenate([cls_slot, grid], axis=1)


def load_pretrained(path, model: VisionTransformer, *, image_size: int) -> dict:
    """Parameters for ``model`` at ``image_size`` from the ``.npz`` at ``path``.

    After ``load_npz``: the position embedding is resampled when the file's grid differs from
    ``image_size // patch_size``; with ``model.num_classes == 0`` the file's ``head`` is dropped,
    and a head of another size (or none in the file) is replaced by vit_jax's fresh init (zero
    kernel, bias ``model.head_bias_init``); ``pre_logits`` is kept when the model has a
    ``representation_size`` and dropped otherwise (vit_jax's "drop-head" variant). The result is
    then checked against the model: any missing key, unexpected key or shape mismatch raises a
    ValueError naming all of them. Returns a nested dict of float32 numpy arrays.
    """
    return _fit(load_npz(path), model, image_size, path)


def load_pretrained_with_head(
    path, model: VisionTransformer, *, image_size: int
) -> tuple[dict, dict]:
    """``load_pretrained``'s parameters and the file's own classifier, ``{"kernel": (F, S),
    "bias": (S,)}`` in float32, for a label mapping on the model's features (``F`` =
    ``model.feature_dim``). An InputError says why the file's head cannot be used: it has none,
    or it reads a ``pre_logits`` layer the model lacks, or features of another width."""
    params = load_npz(path)
    head = params.pop("head", None)
    if head is None or set(head) != {"kernel", "bias"}:
        raise InputError(
            f"{path} has no classification head (head/kernel, head/bias), which a label mapping "
            "reads: use a checkpoint with its head or head.name='linear'"
        )
    if "pre_logits" in params and model.representation_size is None:
        width = np.shape(params["pre_logits"]["kernel"])[-1]
        raise InputError(
            f"the head of {path} reads its pre_logits layer, which the model drops: set "
            f"backbone.representation_size={width}"
        )
    if np.shape(head["kernel"])[0] != model.feature_dim:
        raise InputError(
            f"the head of {path} reads {np.shape(head['kernel'])[0]} features but the model "
            f"gives {model.feature_dim}"
        )
    source = {name: np.asarray(value, np.float32) for name, value in head.items()}
    return _fit(params, model, image_size, path), source


def _fit(params: dict, model: VisionTransformer, image_size: int, path) -> dict:
    """``params`` (``load_npz``'s) adapted to ``model`` at ``image_size`` and checked."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]

    if "pre_logits" in params and "pre_logits" not in expected:
        logging.info("Dropping the checkpoint's pre_logits: the model has no representation_size")
        del params["pre_logits"]
    _adapt_head(params, expected, model)
    _adapt_posemb(params, expected, model, image_size)
    check_fits(params, expected, path)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _adapt_head(params: dict, expected: Mapping, model: VisionTransformer) -> None:
    if "head" not in expected:
        if "head" in params:
            logging.info("Dropping the checkpoint's head: the model has num_classes=0")
            del params["head"]
        return
    shapes = {name: leaf.shape for name, leaf in expected["head"].items()}
    if "head" in params:
        found = {name: np.shape(leaf) for name, leaf in params["head"].items()}
        if found == shapes:
            return
        logging.info("Replacing the checkpoint's head %s by a fresh one %s", found, shapes)
    else:
        logging.info("Checkpoint has no head; initialising a fresh one %s", shapes)
    params["head"] = {
        "kernel": np.zeros(shapes["kernel"], np.float32),
        "bias": np.full(shapes["bias"], model.head_bias_init, np.float32),
    }


def _adapt_posemb(params: dict, expected: Mapping, model: VisionTransformer, image_size: int):
    try:
        posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
        target = expected["Transformer"]["posembed_input"]["pos_embedding"].shape
    except KeyError:  # reported by check_fits
        return
    has_cls = "cls" in params
    same_layout = has_cls == ("cls" in expected) and posemb.shape[-1] == target[-1]
    if posemb.shape != target and same_layout:
        side = image_size // model.patch_size
        new = resample_posemb(posemb, (side, side), has_cls)
        params["Transformer"]["posembed_input"]["pos_embedding"] = new


def check_fits(params: Mapping, expected: Mapping, path) -> None:
    """ValueError naming every missing key, unexpected key and shape mismatch of ``params``
    against ``expected`` (a tree of arrays or ``jax.ShapeDtypeStruct``); ``path`` labels it."""
    got = {key: tuple(np.shape(v)) for key, v in flatten(params).items()}
    want = {key: tuple(v.shape) for key, v in flatten(expected).items()}
    missing = sorted(want.keys() - got.keys())
    unexpected = sorted(got.keys() - want.keys())
    mismatched = [
        f"{key}: file {got[key]} vs model {want[key]}"
        for key in sorted(want.keys() & got.keys())
        if got[key] != want[key]
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint {path} does not fit the model:\n"
            f"  missing keys: {missing}\n"
            f"  unexpected keys: {unexpected}\n"
            f"  shape mismatches: {mismatched}"
        )
