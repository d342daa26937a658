"""``jprompt_shapes``: an offline, procedurally drawn tfds image-classification dataset.

Importing this module registers the builder, after which

    import jprompt.data.synthetic  # noqa: F401
    tfds.load("jprompt_shapes/shapes", data_dir=...)

prepares (a few seconds, no network) and loads it like any tfds dataset. Every image is a
32x32 RGB uint8 picture drawn from a numpy generator seeded by (config, split, index), so two
preparations give identical data. Backgrounds are random dull colours with smooth blotches and
pixel noise; objects are anti-aliased, randomly coloured, placed and sized.

Configs (one source task to pretrain a backbone on, three targets to transfer to with prompts):

==========  ====  ======================================================================
config      role  classes (names double as CLIP text prompts)
==========  ====  ======================================================================
shapes      src   circle, square, triangle, diamond, star, cross, ring, heart, crescent,
                  hexagon (the shape kind; colour, position, size, tilt random)
colors      tgt   red, orange, yellow, green, cyan, blue, purple, pink (colour of the large
                  object; the background and a small object have two other of these colours)
count       tgt   one, two, three, four, five, six (number of small objects)
textures    tgt   horizontal stripes, vertical stripes, diagonal stripes, checkerboard,
                  polka dots, grid, concentric circles, zigzag (pattern filling the image)
==========  ====  ======================================================================

Splits for every config: train 5000, validation 1000, test 1000, labels exactly balanced
(``label = index % num_classes``; the files are stored in tfds's shuffled key order).
"""

import functools
import zlib

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 5000, "validation": 1000, "test": 1000}
_SUPERSAMPLE = 2  # shapes are drawn on a 2x grid and averaged down: anti-aliased edges

SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "heart",
    "crescent",
    "hexagon",
)
_SOLID_SHAPES = ("circle", "square", "diamond", "heart", "hexagon")  # large area for their radius
COLORS = {  # class name -> hue in degrees
    "red": 0,
    "orange": 30,
    "yellow": 58,
    "green": 120,
    "cyan": 182,
    "blue": 228,
    "purple": 275,
    "pink": 320,
}
COUNTS = ("one", "two", "three", "four", "five", "six")
TEXTURES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "grid",
    "concentric circles",
    "zigzag",
)


# --- shapes as inside-tests on coordinates scaled to the object's radius (y points up) ---


def _star(u, v, inner=0.42, points=5):
    angle = np.mod(np.arctan2(u, v), 2 * np.pi / points)  # 0 at the top point
    angle = np.minimum(angle, 2 * np.pi / points - angle)  # symmetric within a sector
    # Distance from the centre to the edge joining the outer point (0 deg) and the inner
    # corner (180/points deg), along the ray at ``angle``.
    half = np.pi / points
    p1 = np.array([1.0, 0.0])
    edge = np.array([inner * np.cos(half), inner * np.sin(half)]) - p1
    reach = (p1[0] * edge[1] - p1[1] * edge[0]) / (
        np.cos(angle) * edge[1] - np.sin(angle) * edge[0]
    )
    return np.hypot(u, v) <= 1.05 * reach


_INSIDE = {
    "circle": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: (v >= -0.55) & (v <= 1.1 - np.sqrt(3) * np.abs(u)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.1,
    "star": _star,
    "cross": lambda u, v: (
        (np.minimum(np.abs(u), np.abs(v)) <= 0.32) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)
    ),
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2),
    "heart": lambda u, v: (
        ((1.2 * u) ** 2 + (1.2 * v + 0.15) ** 2 - 1) ** 3 - (1.2 * u) ** 2 * (1.2 * v + 0.15) ** 3
        <= 0
    ),
    "crescent": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.5) ** 2 + v**2 >= 0.8**2),
    "hexagon": lambda u, v: (
        np.maximum(np.abs(u), 0.5 * np.abs(u) + np.sqrt(3) / 2 * np.abs(v)) <= 0.92
    ),
}


@functools.cache
def _grid(size):
    """Pixel-centre coordinates of the supersampled grid, in output pixels."""
    n = size * _SUPERSAMPLE
    c = (np.arange(n) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(c, c)  # x, y (rows grow downwards)


def _shape_mask(kind, size, cx, cy, radius, tilt):
    """Coverage in [0, 1] of shape ``kind`` centred at (cx, cy), anti-aliased."""
    x, y = _grid(size)
    dx, dy = (x - cx) / radius, (cy - y) / radius
    cos, sin = np.cos(tilt), np.sin(tilt)
    inside = _INSIDE[kind](cos * dx + sin * dy, -sin * dx + cos * dy)
    return _downsample(inside.astype(np.float32))


def _downsample(fine):
    n = fine.shape[0] // _SUPERSAMPLE
    return fine.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))


def _hsv_to_rgb(h, s, v):
    """One colour: hue in degrees, saturation and value in [0, 1] -> RGB in [0, 255]."""
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h / 60.0, 6.0)
    return 255.0 * (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _random_color(rng, min_value=0.35):
    return _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.5, 1.0), rng.uniform(min_value, 1.0))


def _contrasting_color(rng, background, min_distance=110.0):
    """A random saturated colour far enough from ``background``'s mean colour to be seen."""
    mean = background.reshape(-1, 3).mean(0)
    while True:
        color = _random_color(rng)
        if np.linalg.norm(color - mean) >= min_distance:
            return color


def _background(rng, size, max_saturation=0.35):
    """A dull random colour with smooth blotches and pixel noise."""
    base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, max_saturation), rng.uniform(0.1, 0.9))
    return base + _mottle(rng, size)


def _mottle(rng, size):
    """Zero-mean texture: smooth low-frequency blotches plus pixel noise."""
    coarse = rng.normal(0.0, 18.0, size=(5, 5, 3))
    up = _bilinear_weights(size, 5)
    blotches = np.moveaxis(up @ np.moveaxis(coarse, -1, 0) @ up.T, 0, -1)
    return blotches + rng.normal(0.0, 6.0, size=(size, size, 3))


@functools.cache
def _bilinear_weights(size, coarse):
    """(size, coarse) matrix that bilinearly upsamples ``coarse`` knots to ``size`` pixels."""
    position = np.linspace(0, coarse - 1, size)
    return np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(coarse)[None, :]))


def _paint(image, coverage, color):
    return image * (1.0 - coverage[..., None]) + coverage[..., None] * color


def _to_uint8(image):
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _draw_shapes(rng, label, size):
    image = _background(rng, size)
    radius = rng.uniform(0.22, 0.38) * size
    margin = 0.9 * radius
    cx, cy = rng.uniform(margin, size - margin, size=2)
    tilt = np.deg2rad(rng.uniform(-15, 15))
    coverage = _shape_mask(SHAPES[label], size, cx, cy, radius, tilt)
    return _paint(image, coverage, _contrasting_color(rng, image))


def _draw_colors(rng, label, size):
    hues = list(COLORS.values())
    background_hue, distractor_hue = rng.choice(
        [h for i, h in enumerate(hues) if i != label], 2, replace=False
    )

    def vivid(hue, lowest):
        color = _hsv_to_rgb(
            hue + rng.uniform(-12, 12), rng.uniform(lowest, 1), rng.uniform(lowest, 1)
        )
        return color + _mottle(rng, size)

    # Background and objects are equally colourful and equally mottled, so neither the set of
    # colours in an image nor local texture gives the answer away: the model must find the
    # object. The object's colour is kept vivid enough for its name to be unambiguous.
    image = vivid(background_hue, 0.6)
    for hue, rel_radius, kinds in (
        (distractor_hue, rng.uniform(0.09, 0.13), SHAPES),
        (hues[label], rng.uniform(0.19, 0.27), _SOLID_SHAPES),
    ):
        radius = rel_radius * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        kind = kinds[rng.integers(len(kinds))]
        coverage = _shape_mask(kind, size, cx, cy, radius, np.deg2rad(rng.uniform(-30, 30)))
        image = _paint(image, coverage, vivid(hue, 0.8))
    return image


def _draw_count(rng, label, size):
    image = _background(rng, size)
    centres = []
    while len(centres) < label + 1:  # rejection sampling: objects never touch
        radius = rng.uniform(0.08, 0.12) * size
        cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
        if all(np.hypot(cx - x, cy - y) > radius + r + 1.5 for x, y, r in centres):
            centres.append((cx, cy, radius))
    for cx, cy, radius in centres:
        kind = ("circle", "square", "diamond", "triangle")[rng.integers(4)]
        coverage = _shape_mask(kind, size, cx, cy, radius, 0.0)
        image = _paint(image, coverage, _contrasting_color(rng, image))
    return image


def _texture_field(kind, x, y, period, rng):
    """A binary pattern (bool array) of ``kind`` on coordinates x, y."""
    phase = rng.uniform(0, period)
    jitter = np.deg2rad(rng.uniform(-10, 10))

    def stripes(angle):
        along = np.cos(angle) * x + np.sin(angle) * y
        return np.mod(along + phase, period) < period / 2

    if kind == "horizontal stripes":
        return stripes(np.pi / 2 + jitter)
    if kind == "vertical stripes":
        return stripes(jitter)
    if kind == "diagonal stripes":
        return stripes(rng.choice([np.pi / 4, 3 * np.pi / 4]) + jitter)
    if kind == "checkerboard":
        return stripes(jitter) ^ stripes(np.pi / 2 + jitter)
    if kind == "polka dots":
        gx, gy = np.mod(x + phase, period) - period / 2, np.mod(y + phase, period) - period / 2
        return np.hypot(gx, gy) < 0.3 * period
    if kind == "grid":
        gx, gy = np.mod(x + phase, period), np.mod(y + phase, period)
        return (gx < 0.25 * period) | (gy < 0.25 * period)
    if kind == "concentric circles":
        cx, cy = rng.uniform(0.25, 0.75, size=2) * x.max()
        return np.mod(np.hypot(x - cx, y - cy) + phase, period) < period / 2
    if kind == "zigzag":
        # Horizontal bands whose centre line is a triangle wave.
        wave = np.abs(np.mod(x + phase, period) - period / 2)
        return np.mod(y + wave + rng.uniform(0, period), period) < period / 2
    raise ValueError(f"unknown texture {kind!r}")


def _draw_textures(rng, label, size):
    x, y = _grid(size)
    period = rng.uniform(4.0, 10.0)
    pattern = _downsample(_texture_field(TEXTURES[label], x, y, period, rng).astype(np.float32))
    light = _random_color(rng, min_value=0.45)
    dark = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.0, 0.4))
    image = _paint(np.broadcast_to(dark, (size, size, 3)), pattern, light)
    # Blend in a noisy background so the pattern is not the only thing in the pixels.
    return 0.7 * image + 0.3 * _background(rng, size) + rng.normal(0.0, 12.0, size=image.shape)


# config name -> (class names, drawing function, description)
TASKS = {
    "shapes": (SHAPES, _draw_shapes, "Kind of shape; the source task."),
    "colors": (tuple(COLORS), _draw_colors, "Colour of the large object; a target task."),
    "count": (COUNTS, _draw_count, "Number of objects; a target task."),
    "textures": (TEXTURES, _draw_textures, "Pattern filling the image; a target task."),
}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def draw_example(config: str, split: str, index: int, size: int = IMAGE_SIZE):
    """``(uint8 image (size, size, 3), label)`` of example ``index``: a pure function."""
    names, draw, _ = TASKS[config]
    # crc32 rather than hash(): Python salts str hashes per process.
    rng = np.random.default_rng([zlib.crc32(config.encode()), _SPLIT_IDS[split], index])
    label = index % len(names)
    return _to_uint8(draw(rng, label, size)), label


class JpromptShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural 32x32 images: one source and three target classification tasks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=description)
        for name, (_, _, description) in TASKS.items()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not dataset_info_from_configs: that looks for metadata files
        # (README, citations) beside this module, which a generated dataset has no use for.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(names=TASKS[self.builder_config.name][0]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        for index in range(SPLIT_SIZES[split]):
            image, label = draw_example(self.builder_config.name, split, index)
            yield index, {"image": image, "label": label}
