"""Pictures of what a method does to its inputs: grids of prompted images and masks.

Methods that act on pixels define ``visualize(trained, frozen, images, *, rng)`` returning
``{name: (B, H, W, C) array}`` in the backbone's normalized input space (C = 3), or in [0, 1]
when the name ends with ``_mask`` (C = 1 or 3). The trainer turns each into one grid image (a
mask's with blue gaps, so that a mask that is on everywhere shows as a white tile rather than as
blank paper), logs it to TensorBoard and writes it as ``WORKDIR/images/{name}_{step}.png`` after
each evaluation.
A mixture run (``jprompt.data.mixture``) of a method with a token library (PGN) also gets
``token_usage_by_source``: each component's mean token weights as a heat map.
"""

import math

import numpy as np
import tensorflow as tf
from etils import epath

from jprompt.data import normalization as normalizations

NUM_IMAGES = 16  # validation images shown per picture
WHITE = (1.0, 1.0, 1.0)
# Between masks, which are grey levels from black (off) to white (on): a colour no mask takes.
MASK_GAP = (0.0, 0.4, 0.8)


def to_unit_range(images: np.ndarray, normalization: str) -> np.ndarray:
    """Undo the input normalization and clip to [0, 1] (prompts may leave the valid range)."""
    rgb = normalizations.to_rgb(np.asarray(images, np.float32), normalization)
    return np.clip(rgb / 255.0, 0.0, 1.0)


def grid(images: np.ndarray, *, pad: int = 2, gap=WHITE) -> np.ndarray:
    """(B, H, W, C) in [0, 1] -> one (rows*H, cols*W, 3) uint8 picture, ``gap`` (RGB in [0, 1])
    between and around the images."""
    images = np.asarray(images, np.float32)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    count, height, width, _ = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    canvas = np.empty((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), np.float32)
    canvas[:] = gap
    for index, image in enumerate(images):
        top = pad + (index // cols) * (height + pad)
        left = pad + (index % cols) * (width + pad)
        canvas[top : top + height, left : left + width] = image
    return np.round(canvas * 255).astype(np.uint8)


def method_pictures(method, trained, frozen, images, *, rng, normalization: str) -> dict:
    """``{name: uint8 grid}`` for a method with ``visualize``; empty for the others."""
    if not method.has_pictures:
        return {}
    pictures = {}
    for name, batch in method.visualize(trained, frozen, images, rng=rng).items():
        batch = np.asarray(batch)
        if name.endswith("_mask"):
            pictures[name] = grid(np.clip(batch, 0, 1), gap=MASK_GAP)
        else:
            pictures[name] = grid(to_unit_range(batch, normalization))
    return pictures


def heatmaps(maps, *, pad: int = 2) -> np.ndarray:
    """(K, N) maps -> one uint8 picture, the maps top to bottom with white gaps between, on one
    shared scale: black is 0, white the largest value of all the maps. A cell is at least one
    pixel and the picture about 512 pixels wide."""
    maps = [np.asarray(m, np.float32) for m in maps]
    cell = max(1, 512 // maps[0].shape[1])
    top = max(float(m.max()) for m in maps) or 1.0  # all zero: black
    scaled = [np.kron(m / top, np.ones((cell, cell), np.float32)) for m in maps]
    gap = np.ones((pad, scaled[0].shape[1]), np.float32)
    rows = [gap]
    for picture in scaled:
        rows += [picture, gap]
    canvas = np.pad(np.concatenate(rows), ((0, 0), (pad, pad)), constant_values=1.0)
    return np.round(np.repeat(canvas[..., None], 3, axis=-1) * 255).astype(np.uint8)


def token_usage_picture(method, trained, images_by_source) -> dict:
    """``{"token_usage_by_source": picture}``: the mean (K, N) token weights of each source's
    images (``method.token_weights``, which PGN has), as ``heatmaps`` in source order."""
    usages = [np.asarray(method.token_weights(trained, x)).mean(axis=0) for x in images_by_source]
    return {"token_usage_by_source": heatmaps(usages)}


def write_png(path: epath.Path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(picture).numpy())
