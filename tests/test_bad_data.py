"""Bad data fails clearly, naming the example, split or path, and loses nothing.

The expected example ids are read straight from the tfds files (file order, raw bytes), never
from the pipeline under test.
"""

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from jprompt.data import pipeline, presets
from jprompt.data.preprocess import PreprocessSpec

NOT_AN_IMAGE = b"these bytes are not an image"
SPEC = PreprocessSpec(8)


def png(value: int) -> io.BytesIO:
    return io.BytesIO(tf.io.encode_png(np.full((8, 8, 3), value, np.uint8)).numpy())


class UndecodableImagesSet(tfds.core.GeneratorBasedBuilder):
    """Six examples, two of whose image bytes are not an image (``undecodable_images_set``)."""

    VERSION = tfds.core.Version("1.0.0")
    BROKEN = (1, 4)  # generator keys; tfds writes the examples in its own order

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b"]),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            image = io.BytesIO(NOT_AN_IMAGE) if i in self.BROKEN else png(40 * i)
            yield i, {"image": image, "label": i % 2}


class OutOfRangeLabelsSet(tfds.core.GeneratorBasedBuilder):
    """Four good images whose integer labels (not a ClassLabel) include 5 and -1."""

    VERSION = tfds.core.Version("1.0.0")
    LABELS = (0, 5, 1, -1)

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            yield i, {"image": png(i), "label": self.LABELS[i]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("bad_data"))
    for name in ("undecodable_images_set", "out_of_range_labels_set"):
        tfds.builder(name, data_dir=data_dir).download_and_prepare()
    return data_dir


def file_order(name, data_dir, split="train"):
    """(tfds id, raw image bytes, label) of every example, in file order."""
    ds = tfds.builder(name, data_dir=data_dir).as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    return [(e["tfds_id"].decode(), e["image"], int(e["label"])) for e in tfds.as_numpy(ds)]


def iterators(name, data_dir, split="train", **kwargs):
    """The evaluation and training iterators of ``split``, one process, batches of 2."""
    common = dict(
        global_batch_size=2,
        spec=SPEC,
        data_dir=data_dir,
        process_index=0,
        process_count=1,
        **kwargs,
    )
    return {
        "eval": pipeline.eval_iterator(name, split, **common),
        "train": pipeline.train_iterator(name, split, seed=0, **common),
    }


def test_undecodable_images_are_named_with_the_way_to_skip_them(data_dir):
    examples = file_order("undecodable_images_set", data_dir)
    broken = [i for i, image, _ in examples if image == NOT_AN_IMAGE]
    assert len(broken) == 2
    for batches in iterators("undecodable_images_set", data_dir).values():
        with pytest.raises(ValueError) as error:
            for _ in range(3):  # one pass over the six examples
                next(batches)
        message = str(error.value)
        assert message.startswith(
            "2 example(s) of undecodable_images_set:train (process share 0 of 1) could not be "
            f"decoded as images: {broken}"
        ), message
        assert "config.input.skip_undecodable" in message


def test_skipping_undecodable_images_keeps_every_good_example(data_dir, caplog):
    examples = file_order("undecodable_images_set", data_dir)
    good_labels = sorted(label for _, image, label in examples if image != NOT_AN_IMAGE)
    batches = iterators("undecodable_images_set", data_dir, skip_undecodable=True)
    evaluated = list(batches["eval"])
    mask = np.concatenate([b["mask"] for b in evaluated])
    labels = np.concatenate([b["label"] for b in evaluated])
    assert len(evaluated) == 3 and mask.sum() == 4  # batches planned for 6; the skipped 2 pad
    assert sorted(labels[mask == 1]) == good_labels
    # Two epochs of training batches: every good example twice, never a broken one.
    trained = np.concatenate([next(batches["train"])["label"] for _ in range(4)])
    assert sorted(trained) == sorted(good_labels * 2)
    assert "Skipping 2 undecodable examples of undecodable_images_set:train" in caplog.text


@pytest.mark.parametrize("kind", ["eval", "train"])
def test_label_out_of_range_names_the_examples(data_dir, kind):
    examples = file_order("out_of_range_labels_set", data_dir)
    out_of_range = ", ".join(f"{i} (label {label})" for i, _, label in examples if label in (5, -1))
    batches = iterators("out_of_range_labels_set", data_dir, num_classes=2)[kind]
    with pytest.raises(ValueError) as error:
        [next(batches) for _ in range(2)]
    assert str(error.value) == (
        "labels of out_of_range_labels_set:train (process share 0 of 1) must be in [0, 2) for the "
        f"model's 2 classes; out of range: {out_of_range}"
    )


def test_integer_labels_need_the_number_of_classes(data_dir):
    with pytest.raises(
        ValueError, match="'label' of 'out_of_range_labels_set' is not a ClassLabel"
    ):
        iterators("out_of_range_labels_set", data_dir)


def test_empty_and_unknown_splits_are_named_with_the_splits_there_are(data_dir):
    with pytest.raises(ValueError) as error:
        iterators("out_of_range_labels_set", data_dir, "train[2:2]", num_classes=2)
    assert str(error.value) == (
        "split 'train[2:2]' of dataset 'out_of_range_labels_set' has no examples; "
        "splits: {'train': 4}"
    )
    with pytest.raises(ValueError, match="bad split 'tran' of dataset 'out_of_range_labels_set'"):
        pipeline.dataset_info("out_of_range_labels_set", "tran", data_dir=data_dir)


def test_missing_dataset_directory_is_named(tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError) as error:
        pipeline.dataset_info("cifar10", "train", data_dir=missing)
    assert str(error.value) == f"dataset directory data_dir={missing!r} does not exist"


def test_a_bad_image_of_a_local_folder_is_named_by_its_file(tmp_path):
    root = tmp_path / "downloads" / "manual" / "nabirds"
    for split in ("train", "test"):
        for cls in ("a_finch", "b_wren"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                (root / split / cls / f"{i}.png").write_bytes(png(40 * i).getvalue())
    (root / "train" / "b_wren" / "1.png").write_bytes(NOT_AN_IMAGE)
    name = presets.get("fgvc/nabirds").tfds_spec
    batches = pipeline.eval_iterator(
        name, "train", global_batch_size=2, spec=SPEC, data_dir=str(tmp_path), process_count=1
    )
    with pytest.raises(ValueError) as error:
        list(batches)
    message = str(error.value)
    assert "1 example(s) of " in message and " (b_wren/1.png)" in message
