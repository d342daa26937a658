"""The input normalizations as per-channel affine maps, without TensorFlow.

``normalized = rgb * scale + offset`` for RGB in [0, 255]. The input pipeline
(``jprompt.data.preprocess``) applies these maps inside ``tf.data``; the pictures
(``jprompt.train.visualize``) and PGN prompt inversion (``jprompt.methods.inversion``) undo them,
so both directions come from this one definition. No TensorFlow here: the methods import it.
"""

import numpy as np

# CLIP's pixel statistics (OpenAI CLIP, also used by open_clip), in [0, 1] units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's pixel statistics (torchvision's Normalize as VPT feeds its ViT), in [0, 1] units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NAMES = ("minus_one_to_one", "clip", "imagenet")
# (mean, std) per channel, in [0, 1] units, of the names that standardise: (x / 255 - mean) / std.
MEAN_STD = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def affine(normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)``, each ``(3,)`` float32: ``minus_one_to_one`` is ``x / 127.5 - 1``
    (the vit_jax / big_vision range), ``clip`` is ``(x / 255 - CLIP_MEAN) / CLIP_STD`` and
    ``imagenet`` is ``(x / 255 - IMAGENET_MEAN) / IMAGENET_STD``."""
    if normalization == "minus_one_to_one":
        return np.full(3, 1 / 127.5, np.float32), np.full(3, -1.0, np.float32)
    if normalization in MEAN_STD:
        mean, std = map(np.asarray, MEAN_STD[normalization])
        return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)
    raise ValueError(f"unknown normalization {normalization!r}; valid choices: {NAMES}")


def to_rgb(normalized, normalization: str):
    """The inverse map: normalized pixels (numpy or JAX) -> float RGB in [0, 255] units, not
    clipped (prompted pixels may leave the range)."""
    scale, offset = affine(normalization)
    return (normalized - offset) / scale
