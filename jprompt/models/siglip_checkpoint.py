"""SigLIP's towers from big_vision's ``.npz`` files (``jprompt.models.siglip``).

big_vision saves the two-towers model flat with "/"-joined keys: ``params/img/...`` is the image
tower, ``params/txt/...`` the text tower, ``params/t`` the log temperature and ``params/b`` the
bias of the sigmoid logits. ``load`` reads the image tower alone, also from a file holding only
it (keys from ``embedding/...`` on); ``load_towers`` reads all four. The
encoder is read as ``vit_checkpoint.convert`` reads big_vision's ViTs (scanned or unrolled
blocks, the top-level ``pos_embedding`` moved into ``Transformer/posembed_input``, no class-token
slot); ``MAPHead_0`` is kept as is. A position embedding of another grid is resampled as
big_vision's ``vit.resample_posemb`` does: ``scipy.ndimage.zoom(order=1)`` of the square grid.
The text tower's ``Encoder_0`` is read the same way as ``Transformer``, with big_vision's
``text_transformer.load`` fix of old files that also hold ``Encoder_0/pos_embedding`` (summed).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jprompt.errors import InputError
from jprompt.models import siglip, vit_checkpoint


def load(path, module: siglip.ImageTower, *, image_size: int) -> dict:
    """Parameters of ``module`` at ``image_size`` from the big_vision ``.npz`` at ``path``, as a
    nested dict of float32 numpy arrays; a ValueError names every key that does not fit."""
    return _image_params(_read(path), path, module, image_size)


def load_towers(
    path, image: siglip.ImageTower, text: siglip.TextTower, *, image_size: int
) -> tuple[dict, dict, float, float]:
    """``(image params, text params, t, b)`` from the two-towers ``.npz`` at ``path``: ``load``'s
    image parameters, the text tower's, the log temperature and the bias of the logits."""
    flat = _read(path)
    missing = [key for key in ("txt/Embed_0/embedding", "t", "b") if key not in flat]
    if missing:
        raise InputError(
            f"{path} lacks {missing}, so it holds no SigLIP text tower and sigmoid head: use a "
            "big_vision SigLIP two-towers .npz (params/img, params/txt, params/t, params/b)"
        )
    tree = vit_checkpoint.unflatten(
        {key[len("txt/") :]: value for key, value in flat.items() if key.startswith("txt/")}
    )
    encoder = tree.pop("Encoder_0", {})
    if "pos_embedding" in encoder:  # old files added a second position embedding there
        tree["pos_embedding"] = tree.get("pos_embedding", 0) + encoder.pop("pos_embedding")
    tree = vit_checkpoint.convert(vit_checkpoint.flatten({**tree, "Transformer": encoder}))
    # The text length is the file's: its position embedding sets it (one row when it lacks one).
    posemb = tree["Transformer"].get("posembed_input", {}).get("pos_embedding")
    tokens = jax.ShapeDtypeStruct((1, 1 if posemb is None else posemb.shape[1]), jnp.int32)
    expected = jax.eval_shape(text.init, jax.random.key(0), tokens)["params"]
    vit_checkpoint.check_fits(tree, expected, path)
    return (
        _image_params(flat, path, image, image_size),
        _float32(tree),
        float(np.asarray(flat["t"]).reshape(())),
        float(np.asarray(flat["b"]).reshape(())),
    )


def _read(path) -> dict[str, np.ndarray]:
    flat = vit_checkpoint.read_npz(vit_checkpoint.existing(path))
    return {key.removeprefix("params/"): value for key, value in flat.items()}


def _float32(tree: dict) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _image_params(flat: dict, path, module: siglip.ImageTower, image_size: int) -> dict:
    tree = image_tower_tree(flat, path)
    side = image_size // module.patch_size
    posemb = tree["Transformer"].get("posembed_input", {}).get("pos_embedding")
    if posemb is not None and posemb.shape[1] != side * side:
        tree["Transformer"]["posembed_input"]["pos_embedding"] = vit_checkpoint.resample_posemb(
            posemb, (side, side), has_cls=False
        )
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    expected = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    vit_checkpoint.check_fits(tree, expected, path)
    return _float32(tree)


def image_tower_tree(flat: dict[str, np.ndarray], path) -> dict:
    """big_vision's flat arrays (without ``params/``) -> the nested tree of
    ``siglip.ImageTower``, its position embedding not yet resampled."""
    if any(key.startswith("img/") for key in flat):
        flat = {key[len("img/") :]: value for key, value in flat.items() if key.startswith("img/")}
    tree = vit_checkpoint.unflatten(flat)
    head = tree.pop("MAPHead_0", None)
    if head is None:
        raise InputError(
            f"{path} has no MAPHead_0 (multihead attention pooling), so it is no SigLIP image "
            "tower: use a big_vision SigLIP .npz, or a vit_* backbone for this file"
        )
    if "head" in tree:  # only with an image out_dim, which the released SigLIP models lack
        logging.info("Dropping the image tower's head: the backbone's features are MAPHead_0's")
        del tree["head"]
    tree = vit_checkpoint.convert(vit_checkpoint.flatten(tree))
    tree["MAPHead_0"] = head
    return tree
