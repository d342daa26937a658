"""Image preprocessing ops: pure TensorFlow functions, safe inside ``tf.data`` graphs.

Every random op is stateless (``tf.random.stateless_*`` / ``tf.image.stateless_*``) and takes
an explicit ``seed`` tensor of shape ``(2,)``. The input pipeline derives that seed from the
run's seed and the example's position in the stream, so an example's augmentation depends only
on (seed, position): a resumed run sees exactly the pixels an uninterrupted run would.

Crops and normalizations are chosen by name from the small registries below; ``PreprocessSpec``
checks the names when it is built.
"""

import dataclasses

import tensorflow as tf

from jprompt.data.normalization import CLIP_MEAN, CLIP_STD

# Inception-style crop ranges (as in the ResNet/ViT ImageNet recipes).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def resize_size(image_size: int) -> int:
    """The ImageNet convention of resizing to 256 before cropping 224, at any image size."""
    return round(image_size * 256 / 224)


def decode_image(encoded_bytes: tf.Tensor) -> tf.Tensor:
    """PNG/JPEG/GIF/BMP bytes -> uint8 ``(H, W, 3)``; grayscale is repeated, alpha dropped."""
    image = tf.io.decode_image(encoded_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
    # Bilinear with antialiasing: a proper low-pass when shrinking large photos; its weights
    # are non-negative, so values stay within [0, 255].
    return tf.image.resize(tf.cast(image, tf.float32), [height, width], antialias=True)


def _resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    return _resize(image, size, size)


def _resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    # max() guards against rounding the shorter side just below ``size``.
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    return _resize(image, new_shape[0], new_shape[1])


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def _train_resize(image, seed, size):
    del seed  # deterministic
    return _resize_square(image, size)


def _train_random_resized_crop(image, seed, size):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return _resize_square(tf.slice(image, begin, crop_size), size)


def _train_resize_random_crop(image, seed, size):
    image = _resize_square(image, resize_size(size))
    return tf.image.stateless_random_crop(image, [size, size, 3], seed=seed)


def _eval_resize(image, size):
    return _resize_square(image, size)


def _eval_resize_center_crop(image, size):
    return _center_crop(_resize_shorter_side(image, resize_size(size)), size)


def _minus_one_to_one(image):
    return image / 127.5 - 1.0


def _clip(image):
    return (image / 255.0 - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


TRAIN_CROPS = {
    "resize": _train_resize,
    "random_resized_crop": _train_random_resized_crop,
    "resize_random_crop": _train_resize_random_crop,
}
EVAL_CROPS = {"resize": _eval_resize, "resize_center_crop": _eval_resize_center_crop}
NORMALIZATIONS = {"minus_one_to_one": _minus_one_to_one, "clip": _clip}


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; valid choices: {sorted(choices)}")


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How images become model inputs.

    image_size: output height = width.
    train_crop: "resize" (plain resize), "random_resized_crop" (Inception-style: area
      (0.08, 1), aspect ratio (3/4, 4/3), then resize) or "resize_random_crop" (resize to
      ``image_size * 256 / 224``, random crop).
    eval_crop: "resize" or "resize_center_crop" (shorter side to ``image_size * 256 / 224``,
      central crop).
    flip: random horizontal flips at train time.
    normalization: "minus_one_to_one" (x / 127.5 - 1, the vit_jax/big_vision range) or "clip"
      ((x / 255 - CLIP_MEAN) / CLIP_STD).
    """

    image_size: int
    train_crop: str = "resize"
    eval_crop: str = "resize"
    flip: bool = False
    normalization: str = "minus_one_to_one"

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        _check_choice("train_crop", self.train_crop, TRAIN_CROPS)
        _check_choice("eval_crop", self.eval_crop, EVAL_CROPS)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)


def normalize(image: tf.Tensor, kind: str) -> tf.Tensor:
    """Float pixels in [0, 255] -> the range a backbone was trained on (see PreprocessSpec)."""
    _check_choice("normalization", kind, NORMALIZATIONS)
    return NORMALIZATIONS[kind](tf.cast(image, tf.float32))


def train_transform(image: tf.Tensor, seed: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(S, S, 3)``; a function of ``(image, seed)`` only."""
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    image = TRAIN_CROPS[spec.train_crop](image, crop_seed, spec.image_size)
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.ensure_shape(image, [spec.image_size, spec.image_size, 3])
    return normalize(image, spec.normalization)


def eval_transform(image: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(S, S, 3)``, deterministic."""
    image = EVAL_CROPS[spec.eval_crop](image, spec.image_size)
    image = tf.ensure_shape(image, [spec.image_size, spec.image_size, 3])
    return normalize(image, spec.normalization)
