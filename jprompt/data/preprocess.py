"""Image preprocessing ops: pure TensorFlow functions, safe inside ``tf.data`` graphs.

Every random op is stateless (``tf.random.stateless_*`` / ``tf.image.stateless_*``) and takes
an explicit ``seed`` tensor of shape ``(2,)``. The input pipeline derives that seed from the
run's seed and the example's position in the stream, so an example's augmentation depends only
on (seed, position): a resumed run sees exactly the pixels an uninterrupted run would.

The geometry restates torchvision on PIL images, as the papers' official code ran it: the
sizes and offsets of ``Resize(s)`` and ``CenterCrop(s)`` come from ``jprompt.data.crops``
(shared with the TF-free deploy client); ``RandomCrop(s)`` draws its offsets uniformly. Pixels
stay float after a resize, where PIL rounds to uint8 (a difference under half an 8-bit level),
except in the "pgn" augmentation, which works on 8-bit levels as PIL does.

Resizes, crops, augmentations and normalizations are chosen by name from the small registries
below; ``PreprocessSpec`` checks the names when it is built.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from jprompt.data.crops import (
    DEFAULT_RESIZE,
    EVAL_CROPS,
    RESIZES,
    eval_window,
    resize_size,
    shorter_side_to,
)

# CLIP_MEAN and CLIP_STD are re-exported: callers import them from here too.
from jprompt.data.normalization import CLIP_MEAN as CLIP_MEAN
from jprompt.data.normalization import CLIP_STD as CLIP_STD
from jprompt.data.normalization import MEAN_STD

# Inception-style crop ranges (as in the ResNet/ViT ImageNet recipes).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# torchvision's RandomResizedCrop: tries before its fallback crop.
RRC_ATTEMPTS = 10

# PGN's training augmentation (jochemloedeman/PGN datamodules and train scripts' defaults):
# RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.4)], p=0.8), RandomGrayscale(0.2),
# RandomApply([Solarize()], p=0.2), Solarize being PIL's ImageOps.solarize (threshold 128).
PGN_JITTER = 0.4
PGN_JITTER_P = 0.8
PGN_GRAYSCALE_P = 0.2
PGN_SOLARIZE_P = 0.2
SOLARIZE_THRESHOLD = 128


def decode_image(encoded_bytes: tf.Tensor) -> tf.Tensor:
    """PNG/JPEG/GIF/BMP bytes -> uint8 ``(H, W, 3)``; grayscale is repeated, alpha dropped."""
    image = tf.io.decode_image(encoded_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encoded_image_size(encoded_bytes: tf.Tensor) -> tf.Tensor:
    """int64 ``(height, width)`` of an encoded image, read from a JPEG's or PNG's header without
    decoding it (other formats are decoded)."""

    def png():  # the IHDR chunk: width and height, big-endian uint32, at bytes 16 to 24
        header = tf.strings.substr(encoded_bytes, 16, 8)
        return tf.reverse(tf.io.decode_raw(header, tf.int32, little_endian=False), [0])

    size = tf.case(
        [
            (tf.io.is_jpeg(encoded_bytes), lambda: tf.image.extract_jpeg_shape(encoded_bytes)[:2]),
            (tf.strings.substr(encoded_bytes, 0, 8) == _PNG_SIGNATURE, png),
        ],
        default=lambda: tf.shape(decode_image(encoded_bytes))[:2],
    )
    return tf.ensure_shape(tf.cast(size, tf.int64), [2])


# --- Resizes -----------------------------------------------------------------------------------


def _resize(image: tf.Tensor, height, width, resize: str) -> tf.Tensor:
    method, antialias = RESIZES[resize]
    size = tf.cast(tf.stack([height, width]), tf.int32)
    out = tf.image.resize(tf.cast(image, tf.float32), size, method, antialias=antialias)
    # Bilinear weights are non-negative, cubic ones are not: PIL clips to [0, 255].
    return tf.clip_by_value(out, 0.0, 255.0) if method == "bicubic" else out


def _resize_shorter_side(image: tf.Tensor, size: int, resize: str) -> tf.Tensor:
    """torchvision's ``Resize(size)``."""
    shape = tf.shape(image, out_type=tf.int64)
    return _resize(image, *shorter_side_to(shape[0], shape[1], size), resize)


def _scale_1_window(height, width, seed):
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params`` with
    ``scale=(1, 1)``, ratio (3/4, 4/3): each attempt draws a log-uniform aspect ratio ``r`` and
    tries ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))`` (``A = height * width``); the
    first that fits is placed at a uniform offset; if none of the 10 fits, a central crop of
    the whole image clamped to the ratio range."""
    ratio_seed, offset_seed = tf.unstack(tf.random.split(seed, 2))
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    lo, hi = CROP_ASPECT_RATIO_RANGE
    log_ratio = tf.random.stateless_uniform(
        [RRC_ATTEMPTS], ratio_seed, math.log(lo), math.log(hi), tf.float64
    )
    ratio = tf.exp(log_ratio)
    tries_w = tf.cast(tf.round(tf.sqrt(h * w * ratio)), tf.int32)
    tries_h = tf.cast(tf.round(tf.sqrt(h * w / ratio)), tf.int32)
    fits = (tries_w <= width) & (tries_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fit (0 when none fits)

    in_ratio = w / h
    fallback_h = tf.where(in_ratio < lo, tf.cast(tf.round(w / lo), tf.int32), height)
    fallback_w = tf.where(in_ratio > hi, tf.cast(tf.round(h * hi), tf.int32), width)
    found = tf.reduce_any(fits)
    crop_h = tf.where(found, tries_h[first], fallback_h)
    crop_w = tf.where(found, tries_w[first], fallback_w)
    # Uniform integer offsets in [0, height - crop_h] and [0, width - crop_w] (torch.randint).
    spans = tf.cast(tf.stack([height - crop_h, width - crop_w]) + 1, tf.float64)
    draws = tf.random.stateless_uniform([2], offset_seed, dtype=tf.float64)
    random_offsets = tf.cast(tf.floor(draws * spans), tf.int32)
    central = tf.stack([height - crop_h, width - crop_w]) // 2
    top, left = tf.unstack(tf.where(found, random_offsets, central))
    return top, left, crop_h, crop_w


# --- Crops -------------------------------------------------------------------------------------
# A train crop is a deterministic head (image, size, resize), whose output the input pipeline may
# keep in memory between epochs (config.input.cache_decoded), then a random tail (image, seed,
# size, resize). Eval crops are deterministic: (image, size, resize).


def _keep(image, size, resize):
    del size, resize  # a crop drawn first: nothing to do before the draw
    return image


def _squash(image, size, resize):
    return _resize(image, size, size, resize)


def _shorter_side_to_resize_size(image, size, resize):
    return _resize_shorter_side(image, resize_size(size), resize)


def _center_crop(image, size, resize):
    return eval_crop(image, size, "center_crop", resize)


def _no_draw(image, seed, size, resize):
    del seed, size, resize
    return image


def _random_resized_crop(image, seed, size, resize):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=RRC_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return _resize(tf.slice(image, begin, crop_size), size, size, resize)


def _random_resized_crop_scale_1(image, seed, size, resize):
    shape = tf.shape(image)
    top, left, crop_h, crop_w = _scale_1_window(shape[0], shape[1], seed)
    return _resize(image[top : top + crop_h, left : left + crop_w], size, size, resize)


def _random_crop(image, seed, size, resize):
    del resize
    return tf.image.stateless_random_crop(image, [size, size, 3], seed=seed)


def eval_crop(image: tf.Tensor, size: int, crop: str, resize: str) -> tf.Tensor:
    """The ``size x size`` evaluation window of ``crop`` (``EVAL_CROPS``), float pixels."""
    shape = tf.shape(image, out_type=tf.int64)
    height, width, top, left = eval_window(shape[0], shape[1], size, crop)
    return _resize(image, height, width, resize)[top : top + size, left : left + size]


class TrainCrop(NamedTuple):
    """A train crop: ``tail(head(image))``, and what keeping ``head``'s output takes."""

    head: Callable  # deterministic: (uint8 image, size, resize) -> image
    tail: Callable  # random: (head's image, seed, size, resize) -> (size, size, 3) float
    # (height, width, size) -> bytes of head's output for a decoded (height, width) image, from
    # ints or int64 tensors
    head_bytes: Callable


def _float_square_bytes(height, width, size):
    del height, width
    return size * size * 3 * 4  # float32


def _resized_bytes(height, width, size):
    resized_height, resized_width = shorter_side_to(height, width, resize_size(size))
    return resized_height * resized_width * 3 * 4  # float32


def _decoded_bytes(height, width, size):
    del size
    return height * width * 3  # uint8


TRAIN_CROPS = {
    "resize": TrainCrop(_squash, _no_draw, _float_square_bytes),
    "random_resized_crop": TrainCrop(_keep, _random_resized_crop, _decoded_bytes),
    "resize_random_crop": TrainCrop(_shorter_side_to_resize_size, _random_crop, _resized_bytes),
    "center_crop": TrainCrop(_center_crop, _no_draw, _float_square_bytes),
    "random_resized_crop_scale_1": TrainCrop(_keep, _random_resized_crop_scale_1, _decoded_bytes),
}


# --- PGN's augmentation: PIL's 8-bit colour ops, restated ---------------------------------------


def _luma(image: tf.Tensor) -> tf.Tensor:
    """PIL's ``convert("L")`` of integer levels: ITU-R 601-2 in 16-bit fixed point, rounded."""
    r, g, b = tf.unstack(tf.cast(image, tf.int32), num=3, axis=-1)
    return tf.cast((r * 19595 + g * 38470 + b * 7471 + 0x8000) // 0x10000, tf.float32)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ``Image.blend`` (every ``ImageEnhance`` op): float32, clipped, truncated to 8 bits."""
    mixed = degenerate + factor * (image - degenerate)
    return tf.floor(tf.clip_by_value(mixed, 0.0, 255.0))


def _brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def _contrast(image, factor):
    mean = tf.reduce_mean(tf.cast(_luma(image), tf.float64))
    return _blend(tf.cast(tf.floor(mean + 0.5), tf.float32), image, factor)


def _saturation(image, factor):
    return _blend(_luma(image)[..., None], image, factor)


# PIL's HSV -> RGB: which of (v, t, p, q) each output channel takes, per hue sector 0..5.
_HSV_SECTORS = tf.constant([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])


def _hue(image, factor):
    """torchvision's ``adjust_hue`` on PIL images: to PIL's 8-bit HSV, hue plus
    ``uint8(factor * 255)`` with wrap-around, back to RGB; float32/float64 as PIL's C code."""
    rgb = tf.cast(image, tf.int32)
    r, g, b = tf.unstack(rgb, num=3, axis=-1)
    v, low = tf.reduce_max(rgb, -1), tf.reduce_min(rgb, -1)
    grey = v == low
    chroma = tf.cast(tf.where(grey, 1, v - low), tf.float32)
    s = tf.cast(v - low, tf.float32) / tf.cast(tf.maximum(v, 1), tf.float32)
    rc, gc, bc = (tf.cast(v - c, tf.float32) / chroma for c in (r, g, b))
    rc64, gc64, bc64 = (tf.cast(c, tf.float64) for c in (rc, gc, bc))
    from_g, from_b = (tf.cast(x, tf.float32) for x in (2.0 + rc64 - bc64, 4.0 + gc64 - rc64))
    sixths = tf.where(r == v, bc - gc, tf.where(g == v, from_g, from_b))
    turn = tf.cast(sixths, tf.float64) / 6.0 + 1.0
    turn = tf.cast(turn - tf.floor(turn), tf.float32)  # fmod(., 1) of a positive number
    hue = tf.where(grey, 0, tf.cast(tf.cast(turn, tf.float64) * 255.0, tf.int32))
    sat = tf.where(grey, 0, tf.cast(tf.cast(s, tf.float64) * 255.0, tf.int32))

    shift = tf.cast(tf.cast(factor, tf.float64) * 255.0, tf.int32)  # truncates toward zero
    hue = tf.math.floormod(hue + shift, 256)

    h6 = tf.cast(hue, tf.float64) * 6.0 / 255.0
    sector = tf.floor(h6)
    frac = tf.cast(tf.cast(h6 - sector, tf.float32), tf.float64)
    fs32 = tf.cast(tf.cast(sat, tf.float64) / 255.0, tf.float32)
    fs = tf.cast(fs32, tf.float64)
    vf = tf.cast(v, tf.float64)

    def level(x):  # C's round (half away from zero) of a non-negative value, clipped to 8 bits
        return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)

    p = level(vf * (1.0 - fs))
    q = level(vf * (1.0 - tf.cast(fs32 * tf.cast(frac, tf.float32), tf.float64)))
    t = level(vf * (1.0 - fs * (1.0 - frac)))
    candidates = tf.stack([vf, t, p, q], -1)
    channels = tf.gather(_HSV_SECTORS, tf.cast(sector, tf.int32) % 6)
    out = tf.gather(candidates, channels, batch_dims=2)
    return tf.cast(tf.where((sat == 0)[..., None], vf[..., None], out), tf.float32)


def _color_jitter(image, order, factors):
    """torchvision's ``ColorJitter``: brightness, contrast, saturation, hue in ``order``."""
    ops = (_brightness, _contrast, _saturation, _hue)
    for step in range(len(ops)):
        branches = [functools.partial(op, image, factors[i]) for i, op in enumerate(ops)]
        image = tf.switch_case(order[step], branches)
    return image


def pgn_augment_params(seed: tf.Tensor) -> dict:
    """The random draws of PGN's augmentation for one example, from ``seed`` only:
    ``jitter``/``grayscale``/``solarize`` (bool: whether each op fires), ``order`` (int32
    ``(4,)``: a permutation of brightness, contrast, saturation, hue) and ``factors`` (float32
    ``(4,)``: brightness, contrast, saturation in [0.6, 1.4], hue in [-0.4, 0.4])."""
    fire_seed, order_seed, factor_seed = tf.unstack(tf.random.split(seed, 3))
    fire = tf.random.stateless_uniform([3], fire_seed)
    order = tf.argsort(tf.random.stateless_uniform([4], order_seed))
    low = tf.constant([1 - PGN_JITTER] * 3 + [-PGN_JITTER])
    high = tf.constant([1 + PGN_JITTER] * 3 + [PGN_JITTER])
    factors = low + (high - low) * tf.random.stateless_uniform([4], factor_seed)
    return {
        "jitter": fire[0] < PGN_JITTER_P,
        "order": tf.cast(order, tf.int32),
        "factors": factors,
        "grayscale": fire[1] < PGN_GRAYSCALE_P,
        "solarize": fire[2] < PGN_SOLARIZE_P,
    }


def pgn_augment(image: tf.Tensor, params: dict) -> tf.Tensor:
    """PGN's colour augmentation on float ``(H, W, 3)`` pixels in [0, 255], with the draws
    ``params`` (see ``pgn_augment_params``); returns float32 8-bit levels.

    Restates, on the cropped image (PIL's uint8, so the input is rounded first): colour jitter
    with p 0.8 (torchvision's ColorJitter(0.4, 0.4, 0.4, 0.4): PIL's ImageEnhance Brightness,
    Contrast (blend with the rounded mean of the L image) and Color (blend with the L image), and
    the hue shift in PIL's 8-bit HSV, in a random order), then grayscale with p 0.2 (PIL's L,
    repeated), then solarize with p 0.2 (levels >= 128 become 255 - level). The only departure:
    the draws come from TF's stateless generator instead of torch's global one; each op matches
    PIL's integer output (checked against Pillow in tests/test_geometry.py).
    """
    image = tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0))
    image = tf.cond(
        params["jitter"],
        lambda: _color_jitter(image, params["order"], params["factors"]),
        lambda: image,
    )
    image = tf.cond(
        params["grayscale"], lambda: tf.repeat(_luma(image)[..., None], 3, -1), lambda: image
    )
    return tf.where(params["solarize"] & (image >= SOLARIZE_THRESHOLD), 255.0 - image, image)


def _no_augment(image, seed):
    del seed
    return image


AUGMENTS = {
    "none": _no_augment,
    "pgn": lambda image, seed: pgn_augment(image, pgn_augment_params(seed)),
}


# --- Normalizations: the constants live in jprompt.data.normalization ---------------------------


def _minus_one_to_one(image):
    return image / 127.5 - 1.0


def _standardize(mean, std):
    # torchvision's ToTensor + Normalize order of float ops: x / 255, minus mean, over std.
    return lambda image: (image / 255.0 - tf.constant(mean)) / tf.constant(std)


NORMALIZATIONS = {
    "minus_one_to_one": _minus_one_to_one,
    **{name: _standardize(mean, std) for name, (mean, std) in MEAN_STD.items()},
}


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; valid choices: {sorted(choices)}")


CACHE_DECODED = ("auto", "on", "off")  # PreprocessSpec.cache_decoded


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How images become model inputs (S = image_size).

    image_size: output height = width.
    train_crop:
      "resize": squash to S x S.
      "random_resized_crop": Inception-style: area (0.08, 1), aspect ratio (3/4, 4/3), then
        squash to S x S.
      "resize_random_crop": VPT's FGVC train: shorter side to ``resize_size(S)`` (256 at 224),
        aspect kept, then a uniform random S x S window.
      "center_crop": shorter side to S, central S x S (CLIP's preprocess, which VP trains with).
      "random_resized_crop_scale_1": PGN's ``RandomResizedCrop(S, scale=(1, 1))``, then squash
        to S x S. The window: a square image is kept whole (an attempt fits only when both sides
        round to the full side). An aspect ratio within [3/4, 4/3] keeps the whole image, or
        (a few percent of draws at 200 x 250, about 10% at 30 x 40) one pixel less on one side
        at a random offset. Outside that range (e.g. 2:1) no attempt fits, unless the ratio is
        within about a pixel of the range, and the fallback is the central window clamped to
        the range: full height and width round(4/3 * height) for wide images, full width and
        height round(4/3 * width) for tall ones. Its draws come from TF's stateless generator.
    eval_crop: "resize" (squash), "resize_center_crop" (VPT's FGVC test: shorter side to
      ``resize_size(S)``, central S x S) or "center_crop" (shorter side to S, central S x S:
      CLIP's preprocess, PGN's test).
    resize: the interpolation of every crop: "bilinear_antialias" (PIL's bilinear, as
      torchvision runs it on PIL images), "bilinear" (tf.image.resize's default, no antialias:
      VPT's VTAB) or "bicubic" (PIL's bicubic: CLIP's preprocess, PGN's train crop).
    train_resize: the interpolation of the train crop when it differs from the eval one (PGN:
      "bicubic" train, "bilinear_antialias" test); None uses ``resize``.
    augment: "none" or "pgn" (PGN's colour jitter, grayscale and solarize; see ``pgn_augment``),
      after the train crop and before the flip.
    flip: random horizontal flips at train time.
    normalization: "minus_one_to_one" (x / 127.5 - 1, the vit_jax/big_vision range), "clip"
      ((x / 255 - CLIP_MEAN) / CLIP_STD) or "imagenet" ((x / 255 - IMAGENET_MEAN) /
      IMAGENET_STD, as VPT feeds its ViT).
    cache_decoded: whether the input pipeline keeps each image's deterministic work (decoding,
      ``train_head``; at evaluation the whole transform) in memory after the first pass over a
      split: "auto" (when the split's estimate fits ``jprompt.data.decoded_cache.BUDGET``), "on"
      or "off". Not a pixel choice: the batches are the same either way.
    """

    image_size: int
    train_crop: str = "resize"
    eval_crop: str = "resize"
    flip: bool = False
    normalization: str = "minus_one_to_one"
    resize: str = DEFAULT_RESIZE
    train_resize: str | None = None
    augment: str = "none"
    cache_decoded: str = "auto"

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        _check_choice("train_crop", self.train_crop, TRAIN_CROPS)
        _check_choice("eval_crop", self.eval_crop, EVAL_CROPS)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("resize", self.resize, RESIZES)
        if self.train_resize is not None:
            _check_choice("train_resize", self.train_resize, RESIZES)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("cache_decoded", self.cache_decoded, CACHE_DECODED)


def normalize(image: tf.Tensor, kind: str) -> tf.Tensor:
    """Float pixels in [0, 255] -> the range a backbone was trained on (see PreprocessSpec)."""
    _check_choice("normalization", kind, NORMALIZATIONS)
    return NORMALIZATIONS[kind](tf.cast(image, tf.float32))


def train_head(image: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """The part of ``train_transform`` that draws nothing: uint8 ``(H, W, 3)`` -> the train crop's
    deterministic head (the resized image, or the image itself when the crop is drawn first)."""
    return TRAIN_CROPS[spec.train_crop].head(image, spec.image_size, _train_resize(spec))


def train_head_bytes(height, width, spec: PreprocessSpec):
    """Bytes of ``train_head``'s output for a decoded ``(height, width)`` image (ints or int64
    tensors): what keeping it in memory takes."""
    return TRAIN_CROPS[spec.train_crop].head_bytes(height, width, spec.image_size)


def train_tail(image: tf.Tensor, seed: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """The rest of ``train_transform``, drawn from ``seed``: ``train_head``'s output -> float32
    ``(S, S, 3)``."""
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    crop = TRAIN_CROPS[spec.train_crop]
    image = crop.tail(image, crop_seed, spec.image_size, _train_resize(spec))
    # Its own stream, so adding the augmentation leaves the crop and flip draws unchanged.
    image = AUGMENTS[spec.augment](image, tf.random.fold_in(seed, 1))
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.ensure_shape(image, [spec.image_size, spec.image_size, 3])
    return normalize(image, spec.normalization)


def train_transform(image: tf.Tensor, seed: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(S, S, 3)``; a function of ``(image, seed)`` only."""
    return train_tail(train_head(image, spec), seed, spec)


def _train_resize(spec: PreprocessSpec) -> str:
    return spec.train_resize or spec.resize


def eval_transform(image: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(S, S, 3)``, deterministic."""
    image = eval_crop(image, spec.image_size, spec.eval_crop, spec.resize)
    image = tf.ensure_shape(image, [spec.image_size, spec.image_size, 3])
    return normalize(image, spec.normalization)
