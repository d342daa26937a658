"""The data package: offline synthetic builder, preprocessing ops, tf.data input pipeline.

Nothing here may reach the network: every dataset is the package's own ``jprompt_shapes``, a
tiny builder defined below, or a real builder that must fail before any download.
"""

import collections
import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jprompt.data import pipeline, preprocess, synthetic
from jprompt.data.preprocess import PreprocessSpec

SHAPES = "jprompt_shapes/shapes"


@pytest.fixture(scope="session")
def shapes_dir(shapes_data_dir):
    return str(shapes_data_dir)


def read_split(data_dir, split, name=SHAPES):
    """(uint8 images, labels) of ``split`` in file order, straight from tfds."""
    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    examples = list(tfds.as_numpy(ds))
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def to_uint8(images):
    """Undo the minus_one_to_one normalization (exact for unresized images)."""
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def example_keys(images_uint8, labels):
    return [
        (int(label), hashlib.sha1(image.tobytes()).hexdigest())
        for image, label in zip(images_uint8, labels, strict=True)
    ]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# --- synthetic builder -----------------------------------------------------------------------


def test_synthetic_splits_classes_and_balance(shapes_dir):
    builder = tfds.builder(SHAPES, data_dir=shapes_dir)
    assert builder.is_prepared()
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        "train": 5000,
        "validation": 1000,
        "test": 1000,
    }
    assert builder.info.features["label"].names == list(synthetic.SHAPES)
    assert builder.info.supervised_keys == ("image", "label")
    images, labels = read_split(shapes_dir, "validation")
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 100))
    # Not blank: every image spans a real range of intensities.
    assert (images.reshape(1000, -1).std(axis=1) > 10).all()


def test_synthetic_config_class_names():
    names = {
        config.name: tfds.builder(f"jprompt_shapes/{config.name}").info.features["label"].names
        for config in synthetic.JpromptShapes.BUILDER_CONFIGS
    }
    assert names == {
        "shapes": list(synthetic.SHAPES),
        "colors": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"],
        "count": ["one", "two", "three", "four", "five", "six"],
        "textures": list(synthetic.TEXTURES),
    }
    assert "polka dots" in names["textures"] and "circle" in names["shapes"]


def test_synthetic_preparation_is_offline_and_deterministic(shapes_dir, tmp_path):
    # tfds.load downloads and prepares by default: this works only because nothing is fetched.
    again = tfds.load(SHAPES, split="test", data_dir=str(tmp_path), shuffle_files=False)
    first_images, first_labels = read_split(shapes_dir, "test")
    again = list(tfds.as_numpy(again))
    np.testing.assert_array_equal(np.stack([e["image"] for e in again]), first_images)
    np.testing.assert_array_equal(np.array([e["label"] for e in again]), first_labels)
    # And the drawing itself is a pure function of (config, split, index).
    image, label = synthetic.draw_example("shapes", "train", 7)
    np.testing.assert_array_equal(synthetic.draw_example("shapes", "train", 7)[0], image)
    assert label == 7
    assert not np.array_equal(synthetic.draw_example("shapes", "test", 7)[0], image)


# sha256 of the first 4 examples of every config and split, per JpromptShapes.VERSION. tfds
# reuses a dataset prepared under the same version, so a generator change that kept the
# version would leave prepared machines training on the old images while fresh ones train on
# the new. The digest was the same with numpy's
# AVX-512 and AVX2 paths switched off (NPY_DISABLE_CPU_FEATURES).
GENERATOR_DIGESTS = {"1.0.0": "e42671240f6c6be84c83427ee290c2c4927bb0f2ed2a09fe4307311b396ff845"}


def test_generator_output_is_pinned_to_the_dataset_version():
    digest = hashlib.sha256()
    for config in synthetic.TASKS:
        for split in synthetic.SPLIT_SIZES:
            for index in range(4):
                image, label = synthetic.draw_example(config, split, index)
                digest.update(image.tobytes())
                digest.update(bytes([label]))
    version = str(synthetic.JpromptShapes.VERSION)
    assert digest.hexdigest() == GENERATOR_DIGESTS.get(version), (
        f"jprompt_shapes draws different images than version {version} did: bump "
        "JpromptShapes.VERSION (and RELEASE_NOTES), then pin the new digest here"
    )


def test_shapes_learnable_but_not_from_raw_pixels(shapes_dir):
    """Shape kind is learnable from translation-invariant statistics, not from colour/position.

    Nearest class mean on raw pixels stays near chance (colour and position are random), while
    nearest class mean on the magnitude of the grayscale Fourier transform (invariant to
    translation) is far above chance (about 0.6 against 0.1).
    """
    train_images, train_labels = read_split(shapes_dir, "train[:2000]")
    test_images, test_labels = read_split(shapes_dir, "test[:500]")

    def ncm_accuracy(features):
        train, test = features(train_images), features(test_images)
        means = np.stack([train[train_labels == k].mean(0) for k in range(10)])
        distances = ((test[:, None] - means[None]) ** 2).sum(-1)
        return (distances.argmin(1) == test_labels).mean()

    def raw(images):
        return images.reshape(len(images), -1).astype(np.float32)

    def spectrum(images):
        gray = images.astype(np.float32).mean(-1)
        gray -= gray.mean(axis=(1, 2), keepdims=True)
        magnitude = np.abs(np.fft.fft2(gray)).reshape(len(images), -1)
        return magnitude / np.linalg.norm(magnitude, axis=1, keepdims=True)

    assert ncm_accuracy(raw) < 0.2
    assert ncm_accuracy(spectrum) > 0.4


# --- preprocessing ---------------------------------------------------------------------------


def test_decode_grayscale_and_rgba_to_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
    decoded = preprocess.decode_image(tf.io.encode_png(gray)).numpy()
    assert decoded.shape == (5, 7, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.repeat(gray, 3, axis=-1))

    rgba = rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    decoded = preprocess.decode_image(tf.io.encode_png(rgba)).numpy()
    np.testing.assert_array_equal(decoded, rgba[..., :3])


def test_normalization_values():
    x = np.array([[[0.0, 127.5, 255.0], [1.0, 50.0, 200.0]]], np.float32)
    np.testing.assert_array_equal(
        preprocess.normalize(x, "minus_one_to_one").numpy(), x / np.float32(127.5) - 1
    )
    expected_clip = (x / np.float32(255) - np.float32(preprocess.CLIP_MEAN)) / np.float32(
        preprocess.CLIP_STD
    )
    np.testing.assert_allclose(preprocess.normalize(x, "clip").numpy(), expected_clip, rtol=1e-6)
    np.testing.assert_allclose(
        preprocess.normalize(np.array(preprocess.CLIP_MEAN, np.float32) * 255, "clip"), 0, atol=1e-6
    )
    assert preprocess.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert preprocess.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_eval_resize_is_identity_at_same_size_and_center_crop_keeps_the_middle():
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = preprocess.eval_transform(image, PreprocessSpec(32)).numpy()
    np.testing.assert_allclose(out, image / 127.5 - 1, atol=1e-6)

    # Wide image: left half black, right half white. Shorter side -> 36 (= 32 * 256 // 224, as
    # VPT's 224 -> 256 and 384 -> 438), width -> 72, central 32 columns: the edge lands in the
    # middle of the crop.
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 40:] = 255
    spec = PreprocessSpec(32, eval_crop="resize_center_crop")
    out = preprocess.eval_transform(wide, spec).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :14], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 18:], 1.0, atol=1e-6)
    assert preprocess.resize_size(224) == 256 and preprocess.resize_size(32) == 36

    tall = np.zeros((90, 20, 3), np.uint8)
    assert preprocess.eval_transform(tall, PreprocessSpec(16)).shape == (16, 16, 3)
    assert preprocess.eval_transform(tall, spec).shape == (32, 32, 3)


@pytest.mark.parametrize("crop", ["random_resized_crop", "resize_random_crop"])
def test_random_crops_depend_only_on_the_seed(crop):
    image = np.random.default_rng(2).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    spec = PreprocessSpec(24, train_crop=crop, flip=True)

    def run(seed):
        return preprocess.train_transform(image, tf.constant(seed, tf.int64), spec).numpy()

    a = run([1, 2])
    assert a.shape == (24, 24, 3) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(run([1, 2]), a)
    assert not np.array_equal(run([1, 3]), a)
    assert not np.array_equal(run([2, 2]), a)


def test_flip_is_seeded_and_applies_to_some_seeds_only():
    image = np.random.default_rng(3).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    spec = PreprocessSpec(8, flip=True)
    plain = image / 127.5 - 1
    flipped = 0
    for seed in range(16):
        out = preprocess.train_transform(image, tf.constant([seed, 0], tf.int64), spec).numpy()
        is_flipped = np.allclose(out, plain[:, ::-1], atol=1e-6)
        assert is_flipped or np.allclose(out, plain, atol=1e-6)
        flipped += is_flipped
    assert 0 < flipped < 16


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("train_crop", "inception", "random_resized_crop"),
        ("eval_crop", "center", "resize_center_crop"),
        ("normalization", "imagenet21k", "minus_one_to_one"),
    ],
)
def test_unknown_choices_list_the_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=valid):
        PreprocessSpec(32, **{field: value})


def test_bad_image_size_and_normalization_name():
    with pytest.raises(ValueError, match="positive int"):
        PreprocessSpec(0)
    with pytest.raises(ValueError, match="clip"):
        preprocess.normalize(np.zeros(3, np.float32), "imagenet21k")


# --- dataset_info ----------------------------------------------------------------------------


def test_dataset_info_of_a_sliced_split(shapes_dir):
    info = pipeline.dataset_info(SHAPES, "train[:90%]", data_dir=shapes_dir)
    assert info == pipeline.DatasetInfo(
        num_classes=10, class_names=synthetic.SHAPES, num_examples=4500
    )
    assert pipeline.dataset_info(SHAPES, "test[10:47]", data_dir=shapes_dir).num_examples == 37
    with pytest.raises(ValueError, match="no feature 'fine_label'"):
        pipeline.dataset_info(SHAPES, "test", data_dir=shapes_dir, label_map="feature:fine_label")


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(ValueError, match="unknown tfds dataset 'cifar11'") as error:
        pipeline.dataset_info("cifar11", "train")
    assert "cifar10" in str(error.value) and "jprompt_shapes/textures" in str(error.value)
    with pytest.raises(ValueError, match="close matches: \\['jprompt_shapes'\\]"):
        pipeline.dataset_info("jprompt_shapez/shapes", "train")
    with pytest.raises(ValueError, match="valid configs: \\['shapes', 'colors', 'count'"):
        pipeline.dataset_info("jprompt_shapes/shape", "train")


def test_missing_real_dataset_fails_fast_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a real dataset download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --data_dir") as error:
        pipeline.dataset_info("cifar10", "train", data_dir=str(tmp_path))
    assert "gs://tfds-data/datasets" in str(error.value)
    assert not any(tmp_path.rglob("*.tfrecord*"))


# --- train_iterator --------------------------------------------------------------------------

AUGMENT = PreprocessSpec(32, train_crop="random_resized_crop", flip=True)


def train_batches(shapes_dir, split="train[:64]", **kwargs):
    kwargs = {"global_batch_size": 8, "spec": AUGMENT, "seed": 0, "process_count": 1, **kwargs}
    return pipeline.train_iterator(
        SHAPES, split, data_dir=shapes_dir, process_index=kwargs.pop("process_index", 0), **kwargs
    )


def test_train_batches_shapes_dtypes_and_seeding(shapes_dir):
    first = next(train_batches(shapes_dir))
    assert first["image"].shape == (8, 32, 32, 3) and first["image"].dtype == np.float32
    assert first["label"].shape == (8,) and first["label"].dtype == np.int32
    assert first["image"].min() >= -1 and first["image"].max() <= 1
    assert first["image"].std() > 0.1
    assert set(first["label"]) <= set(range(10))
    again = next(train_batches(shapes_dir))
    np.testing.assert_array_equal(again["image"], first["image"])
    np.testing.assert_array_equal(again["label"], first["label"])
    other = next(train_batches(shapes_dir, seed=1))
    assert not np.array_equal(other["image"], first["image"])


def test_resuming_equals_never_stopping(shapes_dir):
    # 64 examples, batches of 8: steps 3..10 cross the epoch boundary (reshuffle included).
    fresh = take(train_batches(shapes_dir), 11)
    resumed = take(train_batches(shapes_dir, start_step=3), 8)
    for expected, got in zip(fresh[3:], resumed, strict=True):
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


def test_process_shares_are_disjoint_and_cover_an_epoch(shapes_dir):
    plain = PreprocessSpec(32)
    keys = {}
    for index in (0, 1):
        batches = train_batches(
            shapes_dir, spec=plain, process_index=index, process_count=2, shuffle_buffer=64
        )
        # 32 examples per process in batches of 8 // 2 = 4: 8 batches per epoch, 2 epochs.
        epochs = [take(batches, 8), take(batches, 8)]
        assert epochs[0][0]["image"].shape == (4, 32, 32, 3)
        per_epoch = [
            example_keys(
                to_uint8(np.concatenate([b["image"] for b in epoch])),
                np.concatenate([b["label"] for b in epoch]),
            )
            for epoch in epochs
        ]
        assert collections.Counter(per_epoch[0]) == collections.Counter(per_epoch[1])
        assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch
        keys[index] = per_epoch[0]
    assert not set(keys[0]) & set(keys[1])
    images, labels = read_split(shapes_dir, "train[:64]")
    assert collections.Counter(keys[0] + keys[1]) == collections.Counter(
        example_keys(images, labels)
    )


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.train_iterator(
            SHAPES,
            "train",
            global_batch_size=8,
            spec=AUGMENT,
            seed=0,
            process_count=3,
            process_index=0,
        )


# --- eval_iterator ---------------------------------------------------------------------------


def test_eval_sees_every_example_once_with_padding(shapes_dir):
    spec = PreprocessSpec(32)
    seen, counts = [], []
    for index in (0, 1):
        batches = list(
            pipeline.eval_iterator(
                SHAPES,
                "test[:37]",
                global_batch_size=8,
                spec=spec,
                data_dir=shapes_dir,
                process_index=index,
                process_count=2,
            )
        )
        counts.append(len(batches))
        mask = np.concatenate([b["mask"] for b in batches])
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
        # Shares of 19 and 18 examples; 5 batches of 4 each: 1 and 2 padding examples, last.
        real = 19 - index
        np.testing.assert_array_equal(mask, np.r_[np.ones(real), np.zeros(20 - real)])
        assert (images[real:] == 0).all() and (labels[real:] == 0).all()
        seen += example_keys(to_uint8(images[:real]), labels[:real])
    assert counts == [5, 5]
    assert (
        pipeline.num_eval_batches(
            SHAPES, "test[:37]", global_batch_size=8, data_dir=shapes_dir, process_count=2
        )
        == 5
    )
    images, labels = read_split(shapes_dir, "test[:37]")
    assert collections.Counter(seen) == collections.Counter(example_keys(images, labels))


def test_eval_pads_whole_batches_for_a_process_without_data(shapes_dir):
    # One example over two processes: process 1 has none, yet yields one all-padding batch.
    batches = [
        list(
            pipeline.eval_iterator(
                SHAPES,
                "test[:1]",
                global_batch_size=4,
                spec=PreprocessSpec(32),
                data_dir=shapes_dir,
                process_index=index,
                process_count=2,
            )
        )
        for index in (0, 1)
    ]
    assert [len(b) for b in batches] == [1, 1]
    np.testing.assert_array_equal(batches[0][0]["mask"], [1, 0])
    np.testing.assert_array_equal(batches[1][0]["mask"], [0, 0])
