"""Derived labels: how a tfds example becomes ``(encoded image, int32 label)`` when the task is
not the builder's ``label`` feature (CLEVR count, dSprites location, ...), as ``tf.data`` maps.

A preset (``jprompt.data.presets``) names its map by a key of ``EXAMPLE_MAPS``.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from jprompt.data.class_names import COUNT_NAMES
from jprompt.data.preprocess import decode_image


@dataclasses.dataclass(frozen=True)
class ExampleMap:
    """How a tfds example becomes ``(encoded image, label)``.

    ``image_key`` is read undecoded (the pipeline decodes after skipping); ``features`` are
    the other features ``fn`` reads; ``pixel_scale`` multiplies decoded pixels (dSprites stores
    0/1). ``num_classes``/``class_names`` replace the builder's for derived labels (0/() keep
    the builder's ``label`` feature).
    """

    fn: Callable[[dict], tuple[tf.Tensor, tf.Tensor]]
    image_key: str = "image"
    features: tuple[str, ...] = ("label",)
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    pixel_scale: int = 1

    def decode(self, encoded: tf.Tensor) -> tf.Tensor:
        """Encoded bytes -> uint8 ``(H, W, 3)`` (grayscale repeated to 3 channels)."""
        image = decode_image(encoded)
        return image * self.pixel_scale if self.pixel_scale != 1 else image


def _label(x) -> tf.Tensor:
    return tf.cast(x, tf.int32)


def _bucket(value: tf.Tensor, thresholds) -> tf.Tensor:
    """Index of the last threshold strictly below ``value`` (VTAB's distance bins)."""
    below = tf.cast(tf.constant(thresholds, tf.float32) < tf.cast(value, tf.float32), tf.int32)
    return tf.reduce_sum(below) - 1


def _clevr_count(ex):
    # 3 to 10 objects -> classes 0..7
    return ex["image"], _label(tf.size(ex["objects"]["size"]) - 3)


# Depth (pixel_coords z) of the closest object, binned as in the VTAB code: balanced classes.
CLEVR_DISTANCE_BINS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def _clevr_distance(ex):
    depth = tf.reduce_min(ex["objects"]["pixel_coords"][:, 2])
    return ex["image"], _bucket(depth, CLEVR_DISTANCE_BINS)


# KITTI closest vehicle (Car, Van, Truck: types 0-2) distance in metres; "no vehicle" is the
# last class (an image without vehicles counts as 1000 m away).
KITTI_DISTANCE_BINS = (-100.0, 8.0, 20.0, 999.0)


def _kitti_distance(ex):
    objects = ex["objects"]
    is_vehicle = objects["type"] < 3
    depth = tf.boolean_mask(tf.cast(objects["location"][:, 2], tf.float32), is_vehicle)
    nearest = tf.reduce_min(tf.concat([depth, [1000.0]], axis=0))
    return ex["image"], _bucket(nearest, KITTI_DISTANCE_BINS)


def _coarsened(feature: str, original: int, classes: int):
    """dSprites: ``original`` latent bins merged into ``classes`` (VTAB: floor(v / (o / c)))."""
    factor = original / classes

    def fn(ex):
        return ex["image"], _label(tf.floor(tf.cast(ex[feature], tf.float32) / factor))

    return fn


def _feature(name: str):
    return lambda ex: (ex["image"], _label(ex[name]))


def _middle_frame(ex):
    frames = ex["video"]  # encoded frames, undecoded
    return frames[tf.shape(frames)[0] // 2], _label(ex["label"])


EXAMPLE_MAPS = {
    "": ExampleMap(_feature("label")),
    "clevr_count": ExampleMap(
        _clevr_count, features=("objects",), num_classes=8, class_names=COUNT_NAMES
    ),
    "clevr_distance": ExampleMap(_clevr_distance, features=("objects",), num_classes=6),
    "kitti_distance": ExampleMap(_kitti_distance, features=("objects",), num_classes=4),
    "dsprites_location": ExampleMap(
        _coarsened("label_x_position", 32, 16),
        features=("label_x_position",),
        num_classes=16,
        pixel_scale=255,
    ),
    "dsprites_orientation": ExampleMap(
        _coarsened("label_orientation", 40, 16),
        features=("label_orientation",),
        num_classes=16,
        pixel_scale=255,
    ),
    "smallnorb_azimuth": ExampleMap(
        _feature("label_azimuth"), features=("label_azimuth",), num_classes=18
    ),
    "smallnorb_elevation": ExampleMap(
        _feature("label_elevation"), features=("label_elevation",), num_classes=9
    ),
    "ucf101_middle_frame": ExampleMap(_middle_frame, image_key="video"),
}


FEATURE_PREFIX = "feature:"  # "feature:coarse_label": that feature is the label


def example_map(name: str) -> ExampleMap:
    """The map named ``name``: a key of ``EXAMPLE_MAPS``, or ``feature:<label feature>``."""
    if name.startswith(FEATURE_PREFIX):
        feature = name.removeprefix(FEATURE_PREFIX)
        return ExampleMap(_feature(feature), features=(feature,))
    if name not in EXAMPLE_MAPS:
        raise ValueError(
            f"unknown label map {name!r}; valid choices: {sorted(EXAMPLE_MAPS)} or "
            f"'{FEATURE_PREFIX}<label feature>'"
        )
    return EXAMPLE_MAPS[name]
