"""``cache_decoded``: a small split is decoded once, and its batches stay bit for bit those of an
uncached run, for every train crop, both ``drop_last`` modes, a resumed run and evaluation.

The data is a tiny tfds dataset of JPEGs of several sizes and aspect ratios, so the kept images
differ in shape and every crop resizes for real.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jprompt.data import decoded_cache, label_maps, pipeline, preprocess
from jprompt.data.preprocess import PreprocessSpec

SIZES = [(30, 40), (40, 30), (36, 36), (28, 50), (45, 33), (32, 32), (50, 40)]  # (h, w)
TRAIN_SIZE = 11  # images, their sizes cycling through SIZES
SIZE = 24  # model input


def image(index: int) -> np.ndarray:
    height, width = SIZES[index % len(SIZES)]
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows * 5 + index, cols * 5, (rows + cols + 7 * index) % 256], -1).astype(
        np.uint8
    )


class JpegSizesSet(tfds.core.GeneratorBasedBuilder):
    """JPEGs of several sizes (``jpeg_sizes_set``): 11 train and 7 test examples."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=3),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(0, TRAIN_SIZE),
            "test": self._generate_examples(100, 7),
        }

    def _generate_examples(self, first, count):
        for i in range(first, first + count):
            yield i, {"image": image(i), "label": i % 3}


NAME = "jpeg_sizes_set"
# The presets' train crops (all but Inception's random_resized_crop, whose deterministic head,
# the decoded image, is PGN's crop's too) and augmentations.
SPECS = {
    "vtab": PreprocessSpec(SIZE, resize="bilinear", normalization="imagenet"),
    "fgvc": PreprocessSpec(
        SIZE, train_crop="resize_random_crop", eval_crop="resize_center_crop", flip=True
    ),
    "pgn": PreprocessSpec(
        SIZE,
        train_crop="random_resized_crop_scale_1",
        train_resize="bicubic",
        augment="pgn",
        eval_crop="center_crop",
        flip=True,
        normalization="clip",
    ),
    "vp": PreprocessSpec(SIZE, train_crop="center_crop", resize="bicubic"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("jpeg_sizes"))
    tfds.builder(NAME, data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture
def decodes(monkeypatch):
    """The sizes of the images decoded so far, one entry per decode."""
    seen = []
    decode = label_maps.ExampleMap.decode

    def note(encoded):
        seen.append(int(encoded))
        return np.int32(0)

    def counted(self, encoded):
        tick = tf.py_function(note, [tf.strings.length(encoded)], tf.int32)
        with tf.control_dependencies([tick]):
            return tf.identity(decode(self, encoded))

    monkeypatch.setattr(label_maps.ExampleMap, "decode", counted)
    return seen


def train(data_dir, spec, cache, steps, **kwargs):
    batches = pipeline.train_iterator(
        NAME,
        "train",
        global_batch_size=4,
        spec=dataclasses.replace(spec, cache_decoded=cache),
        seed=0,
        data_dir=data_dir,
        process_index=0,
        process_count=1,
        **kwargs,
    )
    return [next(batches) for _ in range(steps)]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(
    ("recipe", "drop_last", "resume"),
    [("vtab", False, True), ("fgvc", True, True), ("pgn", True, False), ("vp", False, False)],
)
def test_cached_training_batches_are_the_uncached_ones(
    data_dir, decodes, recipe, drop_last, resume
):
    # 11 images in batches of 4: 3 (drop_last=False, the last padded) or 2 steps an epoch.
    steps = 8  # 2.7 or 4 epochs, reshuffled each
    cached = train(data_dir, SPECS[recipe], "on", steps, drop_last=drop_last)
    assert len(decodes) == TRAIN_SIZE  # each image once, in the first epoch
    uncached = train(data_dir, SPECS[recipe], "off", steps, drop_last=drop_last)
    assert len(decodes) > 3 * TRAIN_SIZE  # uncached: every epoch decodes again
    assert_same(cached, uncached)
    assert cached[0]["image"].shape == (4, SIZE, SIZE, 3)
    if resume:
        resumed = train(data_dir, SPECS[recipe], "on", 3, drop_last=drop_last, start_step=5)
        assert_same(resumed, uncached[5:])


def test_cached_evaluation_is_the_uncached_one_and_decodes_once(data_dir, decodes):
    spec = SPECS["fgvc"]

    def evaluate(cache):
        return list(
            pipeline.eval_iterator(
                NAME,
                "test",
                global_batch_size=4,
                spec=dataclasses.replace(spec, cache_decoded=cache),
                data_dir=data_dir,
                process_index=0,
                process_count=1,
            )
        )

    first, second = evaluate("on"), evaluate("on")  # the second call reads the kept split
    assert len(decodes) == 7
    uncached = evaluate("off")
    assert len(decodes) == 14
    assert_same(first, uncached)
    assert_same(second, uncached)
    np.testing.assert_array_equal(uncached[-1]["mask"], [1, 1, 1, 0])


def test_kept_bytes_and_the_auto_choice(data_dir, monkeypatch, caplog):
    # Each crop's count of kept bytes is what its deterministic head leaves.
    for spec in SPECS.values():
        for height, width in SIZES:
            head = preprocess.train_head(tf.zeros([height, width, 3], tf.uint8), spec)
            assert preprocess.train_head_bytes(height, width, spec) == head.numpy().nbytes
    png = tf.io.encode_png(tf.zeros([5, 9, 3], tf.uint8))
    assert preprocess.encoded_image_size(png).numpy().tolist() == [5, 9]
    # The dataset's image sizes, read from its JPEGs' headers (its feature has no fixed shape).
    builder = pipeline.load_builder(NAME, data_dir)
    share = pipeline.open_share(builder, NAME, "train", 0, 1, "", None)
    decoded = sum(h * w * 3 for h, w in (SIZES[i % len(SIZES)] for i in range(TRAIN_SIZE)))
    assert decoded_cache.image_bytes(share, lambda h, w: h * w * 3) == decoded

    caplog.set_level("INFO")
    what = "decoded training images"
    assert decoded_cache.use(share, "auto", lambda: decoded, what)
    monkeypatch.setattr(decoded_cache, "BUDGET", decoded - 1)
    assert not decoded_cache.use(share, "auto", lambda: decoded, what)
    assert decoded_cache.use(share, "on", lambda: decoded, what)
    assert not decoded_cache.use(share, "off", lambda: decoded, what)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Input cache")]
    context = "jpeg_sizes_set:train (process share 0 of 1)"
    assert lines == [
        f"Input cache: keeping the {what} of {context} in memory after the first pass: about "
        "0.0 MiB, budget 2048 MiB (config.input.cache_decoded='auto')",
        f"Input cache: not keeping the {what} of {context} in memory after the first pass: over "
        "0.0 MiB, budget 0 MiB (config.input.cache_decoded='auto')",
        f"Input cache: keeping the {what} of {context} in memory after the first pass: over "
        "0.0 MiB, budget 0 MiB (config.input.cache_decoded='on')",
        f"Input cache: not keeping the {what} of {context} (config.input.cache_decoded='off')",
    ]
    with pytest.raises(ValueError, match="unknown cache_decoded 'yes'; valid choices"):
        PreprocessSpec(SIZE, cache_decoded="yes")
