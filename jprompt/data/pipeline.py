"""tf.data input pipeline over any tfds image-classification dataset.

``name`` is a tfds name (``"cifar100"``, ``"jprompt_shapes/shapes"``) and ``split`` a tfds split
string, slicing included (``"train[:90%]"``). Every process reads only its own share of the
split (``tfds.even_splits``) and yields host-local numpy batches of
``global_batch_size // process_count`` examples; ``jprompt.sharding`` assembles global arrays.

Training is deterministic and resumable: the shuffle is seeded (and reshuffles every epoch),
and each example's augmentation seed is derived from ``(seed, process_index, k)`` where ``k``
is the example's position in this process's stream. ``start_step=s`` skips the first
``s * batch`` encoded examples before any decoding, and then yields exactly the batches an
uninterrupted run would have yielded from step ``s`` on.

Evaluation reads every example once, pads the last batch, and gives all processes the same
number of batches (padding marked by ``mask == 0``), so a multi-host evaluation never waits on
a process that ran out of data.

Datasets are never downloaded from here: without network tfds retries a download for minutes.
The offline ``jprompt_shapes`` dataset is prepared on first use; any other dataset must
already be prepared in ``data_dir`` (the error says how).
"""

import contextlib
import dataclasses
import difflib
import math
import zlib
from collections.abc import Iterator

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from jprompt.data import synthetic
from jprompt.data.preprocess import PreprocessSpec, decode_image, eval_transform, train_transform

# JAX owns the accelerators; TensorFlow only runs the input pipeline on the CPU. Setting this
# fails once TF has initialised its devices, in which case it is too late to matter here.
with contextlib.suppress(RuntimeError, ValueError):
    tf.config.set_visible_devices([], "GPU")

_AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    class_names: tuple[str, ...]
    num_examples: int  # of the split string given, slicing applied


def _unknown_dataset_message(name: str) -> str:
    base = name.partition("/")[0].split(":")[-1]
    known = tfds.list_builders(with_community_datasets=False)  # offline: no community index
    close = difflib.get_close_matches(base, known, n=5)
    synthetic_names = [f"{synthetic.JpromptShapes.name}/{c}" for c in synthetic.TASKS]
    return (
        f"unknown tfds dataset {name!r}"
        + (f"; close matches: {close}" if close else "")
        + f". The offline synthetic datasets are {synthetic_names}."
    )


def _check_config(name: str) -> None:
    """tfds's own error for a misspelt config lists no valid names; this one does."""
    base, _, rest = name.partition("/")  # "name[/config][:version]"
    config = rest.split(":")[0]
    if not config or ":" in base or "=" in config:
        return  # no config, or a form tfds parses itself ("namespace:name", "name/key=value")
    try:
        configs = tfds.builder_cls(base).builder_configs
    except tfds.core.registered.DatasetNotFoundError:
        return  # reported by load_builder, which also finds datasets that exist only as files
    if configs and config not in configs:
        raise ValueError(f"unknown config {config!r} of {base!r}; valid configs: {list(configs)}")


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The tfds builder for ``name``, prepared, without ever downloading a real dataset."""
    _check_config(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(_unknown_dataset_message(name)) from e
    if builder.is_prepared():
        return builder
    if builder.name == synthetic.JpromptShapes.name:
        builder.download_and_prepare()  # offline, a few seconds
        return builder
    root = str(builder.data_dir_root)
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in data_dir={root!r}, and jprompt does not "
        f"download datasets itself (tfds would retry for minutes without network). Prepare it "
        f"once on a machine with network: `tfds build {name} --data_dir {root}`; or pass a "
        "data_dir that holds a prepared copy, e.g. the public gs://tfds-data/datasets."
    )


def _check_keys(builder, name: str, *keys: str) -> None:
    features = builder.info.features
    for key in keys:
        if key not in features:
            raise ValueError(f"dataset {name!r} has no feature {key!r}; it has {list(features)}")


def dataset_info(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> DatasetInfo:
    """Classes and size of ``name``'s ``split`` (prepares ``jprompt_shapes`` if needed)."""
    builder = load_builder(name, data_dir)
    _check_keys(builder, name, image_key, label_key)
    label = builder.info.features[label_key]
    return DatasetInfo(
        num_classes=label.num_classes,
        class_names=tuple(label.names),
        num_examples=builder.info.splits[split].num_examples,
    )


def _process(process_index, process_count, global_batch_size) -> tuple[int, int, int]:
    """(process_index, process_count, host-local batch size), defaulting to JAX's values."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    if global_batch_size % count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {count} processes"
        )
    return index, count, global_batch_size // count


def _read_share(builder, split, index, count, image_key, label_key) -> tf.data.Dataset:
    """(encoded image bytes, label) of this process's share, in file order."""
    share = tfds.even_splits(split, count)[index]
    ds = builder.as_dataset(
        split=share,
        shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},  # decoded after any skip
    )
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def numpy_batches(ds: tf.data.Dataset, context: str) -> Iterator[dict]:
    """Iterate ``ds`` as numpy; an undecodable example fails naming ``context``."""
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"could not decode an example of {context}: {e.message}") from e
        yield batch


def train_iterator(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    spec: PreprocessSpec,
    seed: int,
    start_step: int = 0,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle_buffer: int = 10_000,
    image_key: str = "image",
    label_key: str = "label",
) -> Iterator[dict]:
    """Endless shuffled, augmented host-local batches ``{"image", "label"}``.

    Yields float32 ``(b, S, S, 3)`` images and int32 ``(b,)`` labels, ``b = global_batch_size
    // process_count``. A function of (dataset, seed, process_index, step): ``start_step=s``
    continues exactly as an uninterrupted iterator after ``s`` batches.
    """
    index, count, batch = _process(process_index, process_count, global_batch_size)
    builder = load_builder(name, data_dir)
    _check_keys(builder, name, image_key, label_key)
    if not builder.info.splits[tfds.even_splits(split, count)[index]].num_examples:
        raise ValueError(f"{name}:{split} has no examples for process {index} of {count}")
    ds = _read_share(builder, split, index, count, image_key, label_key)
    # crc32, not hash(): Python salts hashes per process, and this must not change on restart.
    shuffle_seed = zlib.crc32(f"{seed}/{index}".encode())
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_step * batch)  # skip encoded bytes: cheap
    base_seed = tf.constant([seed, index], tf.int64)

    def prepare(position, example):
        encoded, label = example
        example_seed = tf.random.fold_in(base_seed, position)
        image = train_transform(decode_image(encoded), example_seed, spec)
        return {"image": image, "label": label}

    ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE)
    ds = _deterministic(ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE))
    return numpy_batches(ds, f"{name}:{split} (process share {index} of {count})")


def _eval_plan(builder, split, count, batch) -> tuple[list[int], int]:
    """Sizes of every process's share and the common number of batches."""
    sizes = [builder.info.splits[share].num_examples for share in tfds.even_splits(split, count)]
    return sizes, math.ceil(max(sizes) / batch)


def num_eval_batches(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    process_count: int | None = None,
) -> int:
    """How many batches ``eval_iterator`` yields (the same on every process)."""
    _, count, batch = _process(0, process_count, global_batch_size)
    return _eval_plan(load_builder(name, data_dir), split, count, batch)[1]


def eval_iterator(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    spec: PreprocessSpec,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Iterator[dict]:
    """One pass over this process's share: ``{"image", "label", "mask"}`` host-local batches.

    Every example appears once with ``mask`` 1.0; the rest of the last batch, and any whole
    batches a smaller share needs to match the largest, are zeros with ``mask`` 0.0.
    """
    index, count, batch = _process(process_index, process_count, global_batch_size)
    builder = load_builder(name, data_dir)
    _check_keys(builder, name, image_key, label_key)
    sizes, num_batches = _eval_plan(builder, split, count, batch)

    def prepare(encoded, label):
        image = eval_transform(decode_image(encoded), spec)
        return {"image": image, "label": label, "mask": tf.constant(1.0)}

    size = spec.image_size
    blank = {
        "image": tf.zeros([size, size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }
    padding = tf.data.Dataset.from_tensors(blank).repeat(num_batches * batch - sizes[index])
    if sizes[index]:
        ds = _read_share(builder, split, index, count, image_key, label_key)
        ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE).concatenate(padding)
    else:  # tfds cannot read an empty share: this process only pads
        ds = padding
    ds = _deterministic(ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE))
    return numpy_batches(ds, f"{name}:{split} (process share {index} of {count})")
