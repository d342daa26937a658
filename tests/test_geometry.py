"""Paper-exact image geometry, PGN's augmentation and the ImageNet normalization.

The references are restated here with PIL and numpy (no torchvision): torchvision's
``Resize(int)`` on a PIL image sets the shorter side and truncates the longer one with ``int()``,
``CenterCrop`` starts at ``int(round((h - s) / 2))``, ``RandomResizedCrop``'s fallback is a
central crop clamped to the ratio range, and CLIP's preprocess is bicubic ``Resize`` plus
``CenterCrop``. Images are small and non-square (50 x 68 and 68 x 50).
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from jprompt.data import normalization, preprocess
from jprompt.data.preprocess import PreprocessSpec

SIZE = 24
LANDSCAPE, PORTRAIT = (50, 68), (68, 50)  # (height, width)
PIL_RESAMPLE = {"bilinear_antialias": Image.BILINEAR, "bicubic": Image.BICUBIC}


def textured(height, width, seed=0):
    """Gradients (so every window differs) plus a ripple and noise (texture), uint8."""
    y, x = np.mgrid[:height, :width]
    ripple = 128 + 60 * np.sin(x / 3) * np.cos(y / 4)
    smooth = np.stack([255 * x / width, 255 * y / height, ripple], -1)
    noise = np.random.default_rng(seed).normal(0, 12, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def pil_resize(image, height, width, resize):
    resized = Image.fromarray(image).resize((width, height), PIL_RESAMPLE[resize])
    return np.asarray(resized, np.float32)


def pil_resize_shorter_side(image, size, resize):
    """torchvision's ``Resize(size)`` on a PIL image."""
    height, width = image.shape[:2]
    long = int(size * max(height, width) / min(height, width))
    new_height, new_width = (size, long) if height <= width else (long, size)
    return pil_resize(image, new_height, new_width, resize)


def center_offsets(shape, size):
    return tuple(int(round((n - size) / 2)) for n in shape[:2])


def best_window(full, out):
    """``(offset, mean |difference|)`` of the window of ``full`` closest to ``out``."""
    size = out.shape[0]
    errors = {
        (top, left): np.abs(full[top : top + size, left : left + size] - out).mean()
        for top in range(full.shape[0] - size + 1)
        for left in range(full.shape[1] - size + 1)
    }
    offset = min(errors, key=errors.get)
    return offset, errors[offset]


def pixels(normalized):
    """Undo minus_one_to_one: the transforms' output in [0, 255] units."""
    return (np.asarray(normalized) + 1) * 127.5


def train_pixels(image, spec, seed):
    return pixels(preprocess.train_transform(image, tf.constant(seed, tf.int64), spec))


def eval_pixels(image, spec):
    return pixels(preprocess.eval_transform(image, spec))


@pytest.mark.parametrize("shape", [LANDSCAPE, PORTRAIT])
@pytest.mark.parametrize(
    "crop, resize, short_side",
    [
        ("resize_center_crop", "bilinear_antialias", 27),  # VPT FGVC test: Resize(256) at 224
        ("center_crop", "bicubic", SIZE),  # CLIP's preprocess (VP train and test)
        ("center_crop", "bilinear_antialias", SIZE),  # PGN test
    ],
)
def test_crops_match_torchvision_on_pil(shape, crop, resize, short_side):
    image = textured(*shape)
    full = pil_resize_shorter_side(image, short_side, resize)
    # 27 x 36: the offsets are round(1.5) = 2 (half to even) and 6; 24 x 32: 0 and 4.
    expected = center_offsets(full.shape, SIZE)
    spec = PreprocessSpec(SIZE, eval_crop=crop, resize=resize)
    outputs = [eval_pixels(image, spec)]
    if crop == "center_crop":  # the deterministic train geometry is the same window
        train = PreprocessSpec(SIZE, train_crop=crop, resize=resize)
        outputs.append(train_pixels(image, train, [3, 4]))
    for out in outputs:
        offset, error = best_window(full, out)
        assert offset == expected and error < 1.5, (offset, expected, error)


def test_resize_is_a_squash_and_vpt_resize_sizes():
    image = textured(*LANDSCAPE)
    out = eval_pixels(image, PreprocessSpec(SIZE))
    assert np.abs(out - pil_resize(image, SIZE, SIZE, "bilinear_antialias")).mean() < 1.5
    # VPT's table: Resize 256/438/512 before crops of 224/384/448.
    assert [preprocess.resize_size(s) for s in (224, 384, 448)] == [256, 438, 512]


def numpy_bilinear(image, height, width):
    """tf.image.resize(bilinear, antialias=False): half-pixel centres, edge-clamped taps."""

    def taps(out_size, in_size):
        src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, in_size - 1), src - low

    y0, y1, wy = taps(height, image.shape[0])
    x0, x1, wx = taps(width, image.shape[1])
    image = image.astype(np.float64)
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_vtab_bilinear_without_antialias_and_imagenet_normalization():
    """VPT's VTAB input: tf.image.resize to S x S with its defaults, /255, ImageNet mean/std."""
    image = textured(*PORTRAIT)
    spec = PreprocessSpec(SIZE, resize="bilinear", normalization="imagenet")
    out = preprocess.eval_transform(image, spec).numpy()
    reference = numpy_bilinear(image, SIZE, SIZE)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, (reference / 255 - mean) / std, atol=2e-5)
    # Shrinking 68 x 50 to 24 x 24 without a low-pass aliases: far from the antialiased resize.
    smooth = pil_resize(image, SIZE, SIZE, "bilinear_antialias")
    assert np.abs(reference - smooth).mean() > 3


@pytest.mark.parametrize("shape", [LANDSCAPE, PORTRAIT])
def test_resize_random_crop_is_a_seeded_window_of_the_aspect_kept_resize(shape):
    """VPT's FGVC train: Resize(256) (aspect kept, 27 x 36 here) then RandomCrop(224)."""
    image = textured(*shape)
    full = pil_resize_shorter_side(image, preprocess.resize_size(SIZE), "bilinear_antialias")
    assert sorted(full.shape[:2]) == [27, 36]
    spec = PreprocessSpec(SIZE, train_crop="resize_random_crop")
    offsets = set()
    for seed in range(6):
        out = train_pixels(image, spec, [seed, 1])
        offset, error = best_window(full, out)
        assert error < 1.5, (seed, offset, error)
        np.testing.assert_array_equal(train_pixels(image, spec, [seed, 1]), out)
        offsets.add(offset)
    assert len(offsets) > 1  # other seeds, other windows


@pytest.mark.parametrize(
    "shape, window",
    [
        ((30, 30), (0, 0, 30, 30)),  # square: only the whole image fits (both sides round to 30)
        ((20, 40), (0, 6, 20, 27)),  # 2:1: no attempt fits; width round(20 * 4/3), (40-27)//2
    ],
)
def test_random_resized_crop_scale_1_windows(shape, window):
    image = textured(*shape)
    top, left, height, width = window
    reference = pil_resize(image[top : top + height, left : left + width], SIZE, SIZE, "bicubic")
    spec = PreprocessSpec(SIZE, train_crop="random_resized_crop_scale_1", resize="bicubic")
    for seed in range(4):
        assert np.abs(train_pixels(image, spec, [seed, 7]) - reference).mean() < 1.5


def pil_color_jitter(image, order, factors):
    """torchvision's ColorJitter on a PIL image with given draws (its adjust_* functions)."""

    def hue(img, factor):
        h, s, v = img.convert("HSV").split()
        shifted = (np.asarray(h, np.int64) + int(factor * 255)) % 256  # uint8 wrap-around
        return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8)), s, v)).convert("RGB")

    ops = [
        lambda img, f: ImageEnhance.Brightness(img).enhance(f),
        lambda img, f: ImageEnhance.Contrast(img).enhance(f),
        lambda img, f: ImageEnhance.Color(img).enhance(f),
        hue,
    ]
    for index in order:
        image = ops[index](image, float(factors[index]))
    return image


def params(jitter, grayscale, solarize, order=(0, 1, 2, 3), factors=(1, 1, 1, 0)):
    return {
        "jitter": tf.constant(jitter),
        "order": tf.constant(order, tf.int32),
        "factors": tf.constant(factors, tf.float32),
        "grayscale": tf.constant(grayscale),
        "solarize": tf.constant(solarize),
    }


@pytest.mark.parametrize(
    "jitter, grayscale, solarize, order, factors",
    [
        (True, False, False, (3, 1, 0, 2), (0.63, 1.37, 0.71, -0.33)),
        (True, False, True, (2, 3, 1, 0), (1.29, 0.66, 1.4, 0.27)),
        (True, True, True, (1, 0, 3, 2), (0.9, 1.2, 0.6, 0.11)),
        (False, False, True, (0, 1, 2, 3), (1, 1, 1, 0)),
    ],
)
def test_pgn_augment_matches_pil(jitter, grayscale, solarize, order, factors):
    image = textured(12, 16, seed=1)
    out = preprocess.pgn_augment(
        tf.constant(image, tf.float32), params(jitter, grayscale, solarize, order, factors)
    )
    expected = Image.fromarray(image)
    if jitter:
        expected = pil_color_jitter(expected, order, np.float32(factors))
    if grayscale:
        expected = expected.convert("L").convert("RGB")
    if solarize:
        before = np.asarray(expected)
        expected = ImageOps.solarize(expected)
        flipped = before >= 128
        assert 0 < flipped.mean() < 1
        np.testing.assert_array_equal(np.asarray(expected)[flipped], 255 - before[flipped])
    np.testing.assert_array_equal(out.numpy(), np.asarray(expected, np.float32))
    if grayscale:
        assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_pgn_augment_is_seeded_and_fires_at_its_rates():
    image = textured(*LANDSCAPE)
    spec = PreprocessSpec(SIZE, train_crop="center_crop", resize="bicubic", augment="pgn")
    outputs = [train_pixels(image, spec, [seed, 5]) for seed in (0, 0, 1, 2)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])
    assert not np.array_equal(outputs[0], outputs[3])

    seeds = tf.stack([tf.range(2000, dtype=tf.int64), tf.fill([2000], tf.constant(9, tf.int64))], 1)
    signature = {name: value.dtype for name, value in params(True, True, True).items()}
    draws = tf.function(
        lambda seeds: tf.map_fn(preprocess.pgn_augment_params, seeds, fn_output_signature=signature)
    )(seeds)
    for name, rate in [("jitter", 0.8), ("grayscale", 0.2), ("solarize", 0.2)]:
        assert abs(draws[name].numpy().mean() - rate) < 0.03, name
    first = np.bincount(draws["order"][:, 0].numpy(), minlength=4) / 2000
    np.testing.assert_allclose(first, 0.25, atol=0.04)
    assert np.all(np.sort(draws["order"].numpy(), 1) == np.arange(4))
    factors = draws["factors"].numpy()
    np.testing.assert_allclose(factors.min(0), [0.6, 0.6, 0.6, -0.4], atol=0.01)
    np.testing.assert_allclose(factors.max(0), [1.4, 1.4, 1.4, 0.4], atol=0.01)


def test_imagenet_normalization_values_and_round_trip():
    rgb = np.array([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [123.675, 116.28, 103.53]], np.float32)
    expected = [
        [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
        [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225],
        [0.0, 0.0, 0.0],
    ]
    np.testing.assert_allclose(preprocess.normalize(rgb, "imagenet"), expected, atol=1e-5)
    assert set(preprocess.NORMALIZATIONS) == set(normalization.NAMES)
    for name in normalization.NAMES:  # one set of constants for the pipeline and its inverse
        normalized = preprocess.normalize(rgb, name).numpy()
        scale, offset = normalization.affine(name)
        np.testing.assert_allclose(normalized, rgb * scale + offset, atol=1e-5)
        np.testing.assert_allclose(normalization.to_rgb(normalized, name), rgb, atol=1e-3)


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("resize", "lanczos", "bilinear_antialias"),
        ("train_resize", "area", "bicubic"),
        ("augment", "autoaugment", "pgn"),
        ("train_crop", "random_crop", "random_resized_crop_scale_1"),
        ("eval_crop", "centre_crop", "center_crop"),
    ],
)
def test_new_fields_list_their_valid_choices(field, value, valid):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'; valid choices: .*{valid}"):
        PreprocessSpec(SIZE, **{field: value})
