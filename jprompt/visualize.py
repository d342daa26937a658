"""Pictures of what a method does to its inputs: grids of prompted images and masks.

Methods that act on pixels define ``visualize(trained, frozen, images, *, rng)`` returning
``{name: (B, H, W, C) array}`` in the backbone's normalized input space (C = 3), or in [0, 1]
when the name ends with ``_mask`` (C = 1 or 3). The trainer turns each into one grid image, logs
it to TensorBoard and writes it as ``WORKDIR/images/{name}_{step}.png`` after each evaluation.
"""

import math

import numpy as np
import tensorflow as tf
from etils import epath

from jprompt.data import normalization as normalizations

NUM_IMAGES = 16  # validation images shown per picture


def to_unit_range(images: np.ndarray, normalization: str) -> np.ndarray:
    """Undo the input normalization and clip to [0, 1] (prompts may leave the valid range)."""
    rgb = normalizations.to_rgb(np.asarray(images, np.float32), normalization)
    return np.clip(rgb / 255.0, 0.0, 1.0)


def grid(images: np.ndarray, *, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) in [0, 1] -> one (rows*H, cols*W, 3) uint8 picture, white gaps between."""
    images = np.asarray(images, np.float32)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    count, height, width, _ = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    canvas = np.ones((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), np.float32)
    for index, image in enumerate(images):
        top = pad + (index // cols) * (height + pad)
        left = pad + (index % cols) * (width + pad)
        canvas[top : top + height, left : left + width] = image
    return np.round(canvas * 255).astype(np.uint8)


def method_pictures(method, trained, frozen, images, *, rng, normalization: str) -> dict:
    """``{name: uint8 grid}`` for a method with ``visualize``; empty for the others."""
    if not hasattr(method, "visualize"):
        return {}
    pictures = {}
    for name, batch in method.visualize(trained, frozen, images, rng=rng).items():
        batch = np.asarray(batch)
        unit = (
            np.clip(batch, 0, 1) if name.endswith("_mask") else to_unit_range(batch, normalization)
        )
        pictures[name] = grid(unit)
    return pictures


def write_png(path: epath.Path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(picture).numpy())
