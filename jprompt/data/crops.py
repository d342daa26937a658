"""Resize and crop geometry: one definition for the TF input pipeline and the TF-free client.

torchvision on PIL images, as the papers' official code ran it: ``Resize(s)`` scales the shorter
side to ``s`` and the longer to ``int(s * long / short)`` (truncated); ``CenterCrop(s)`` starts
at ``int(round((h - s) / 2))`` (Python's round, half to even). The functions use only ``+ - *
// %`` and ``abs``, so the same code runs on Python ints, NumPy scalars and the int64 shape
tensors of a ``tf.data`` graph (``jprompt.data.preprocess``), and in the deploy client
(``jprompt.deploy.client``), which resizes with ``jax.image.resize``.
"""

# name -> (kernel, antialias). Antialiased kernels scale their support when shrinking, as PIL's
# resize does (torchvision on PIL images); the bicubic is Keys' a = -0.5, PIL's too. VPT's VTAB
# code calls tf.image.resize with its defaults: bilinear, no antialias.
RESIZES = {
    "bilinear_antialias": ("bilinear", True),
    "bilinear": ("bilinear", False),
    "bicubic": ("bicubic", True),
}
DEFAULT_RESIZE = "bilinear_antialias"

# "resize": squash to S x S; "resize_center_crop": shorter side to resize_size(S), central
# S x S (VPT's FGVC test); "center_crop": shorter side to S, central S x S (CLIP's preprocess).
EVAL_CROPS = ("resize", "resize_center_crop", "center_crop")


def resize_size(image_size: int) -> int:
    """The ImageNet convention of resizing to 256 before cropping 224, at any image size.

    Truncated, as VPT's table has it (224 -> 256, 384 -> 438, 448 -> 512).
    """
    return image_size * 256 // 224


def shorter_side_to(height, width, size):
    """``(height, width)`` after torchvision's ``Resize(size)``: the shorter side ``size``, the
    longer ``int(size * long / short)`` (floor division of integers is exactly that)."""
    shorter = (height + width - abs(height - width)) // 2
    return size * height // shorter, size * width // shorter


def center_offset(length, size):
    """``int(round((length - size) / 2))`` for ``length >= size``: half of an odd difference
    rounds to the even neighbour, as Python's round does."""
    difference = length - size
    return (difference + (difference // 2) % 2) // 2


def check(eval_crop: str, resize: str) -> None:
    """ValueError unless both names are known."""
    if eval_crop not in EVAL_CROPS:
        raise ValueError(f"unknown eval_crop {eval_crop!r}; valid choices: {sorted(EVAL_CROPS)}")
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; valid choices: {sorted(RESIZES)}")


def eval_window(height, width, size: int, crop: str):
    """``(resized_height, resized_width, top, left)``: an ``(height, width)`` image is resized to
    the first two, then the ``size x size`` window at ``(top, left)`` is the model's input."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"unknown eval_crop {crop!r}; valid choices: {sorted(EVAL_CROPS)}")
    if crop == "resize":
        return size, size, 0, 0
    short = resize_size(size) if crop == "resize_center_crop" else size
    resized_height, resized_width = shorter_side_to(height, width, short)
    top = center_offset(resized_height, size)
    left = center_offset(resized_width, size)
    return resized_height, resized_width, top, left
