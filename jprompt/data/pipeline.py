"""tf.data input pipeline over any tfds image-classification dataset.

``name`` is a tfds name (``"cifar100"``, ``"jprompt_shapes/shapes"``) and ``split`` a tfds split
string, slicing included (``"train[:90%]"``). Every process reads only its own share of the
split (``tfds.even_splits``) and yields host-local numpy batches of
``global_batch_size // process_count`` examples; ``jprompt.train.sharding`` assembles global arrays.

Training is deterministic and resumable: the shuffle is seeded (and reshuffles every epoch),
and each example's augmentation seed is derived from ``(seed, process_index, k)`` where ``k``
is the example's position in this process's stream. ``start_step=s`` skips the first
``s * batch`` encoded examples before any decoding, and then yields exactly the batches an
uninterrupted run would have yielded from step ``s`` on. By default the stream is endless and
only full batches are made (``drop_last=True``); ``drop_last=False`` makes it epoch by epoch, as
PyTorch's ``DataLoader(drop_last=False)`` of the official VPT code does: every example once per
epoch and the last batch partial, padded to full size with ``mask == 0`` examples.

A split small enough is decoded only once (``PreprocessSpec.cache_decoded``; ``decoded_cache``
says what is kept and when): from the second pass on, a training example starts from its image
kept in memory, decoded and, where the train crop resizes before it draws, resized; an evaluation
example is its kept model input. The batches are the same as without; a resumed run decodes the
split's examples in its first pass, the skipped ones included.

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
from collections.abc import Iterator, Sequence

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from jprompt.data import builders, decoded_cache, label_maps, presets, synthetic
from jprompt.data.preprocess import (
    PreprocessSpec,
    eval_transform,
    train_head,
    train_head_bytes,
    train_tail,
)

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
    # Offline: generated (a few seconds), or read from local files in <data_dir>/downloads/manual.
    root = str(builder.data_dir_root)
    if builder.name == synthetic.JpromptShapes.name:
        builder.download_and_prepare()
        return builder
    if builder.name in presets.LOCAL_BUILDERS:
        try:
            builder.download_and_prepare()
        except AssertionError as e:  # tfds's way of saying the manual directory is empty
            raise FileNotFoundError(f"{e}{builders.manual_download_help(builder, root)}") from e
        return builder
    if data_dir and not tf.io.gfile.exists(data_dir):
        raise FileNotFoundError(f"dataset directory data_dir={data_dir!r} does not exist")
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in data_dir={root!r}, and jprompt does not "
        f"download datasets itself (tfds would retry for minutes without network). Prepare it "
        f"once on a machine with network: `tfds build {name} --data_dir {root}`; or pass a "
        "data_dir that holds a prepared copy, e.g. the public gs://tfds-data/datasets."
        + builders.manual_download_help(builder, root)
    )


def _check_keys(builder, name: str, *keys: str) -> None:
    features = builder.info.features
    for key in keys:
        if key not in features:
            raise ValueError(f"dataset {name!r} has no feature {key!r}; it has {list(features)}")


def _split_size(builder, name: str, split: str) -> int:
    """Examples in ``split``; an unknown or empty split fails listing the dataset's splits."""
    splits = {s: info.num_examples for s, info in builder.info.splits.items()}
    try:
        size = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(f"bad split {split!r} of dataset {name!r}: {e} Splits: {splits}") from e
    if not size:
        raise ValueError(f"split {split!r} of dataset {name!r} has no examples; splits: {splits}")
    return size


def dataset_info(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    label_map: str = "",
) -> DatasetInfo:
    """Classes and size of ``name``'s ``split`` (prepares ``jprompt_shapes`` if needed).

    ``label_map`` names how examples become (image, label): ``label_maps.example_map``.
    """
    builder = load_builder(name, data_dir)
    example_map = label_maps.example_map(label_map)
    _check_keys(builder, name, example_map.image_key, *example_map.features)
    num_examples = _split_size(builder, name, split)
    if example_map.num_classes:
        return DatasetInfo(example_map.num_classes, example_map.class_names, num_examples)
    label = _class_label(builder, name, example_map.features[0])
    return DatasetInfo(label.num_classes, tuple(label.names), num_examples)


def _class_label(builder, name: str, label_key: str) -> tfds.features.ClassLabel:
    label = builder.info.features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(
            f"feature {label_key!r} of {name!r} is not a ClassLabel, so its classes are unknown; "
            "pass num_classes"
        )
    return label


def process_batch(process_index, process_count, global_batch_size) -> tuple[int, int, int]:
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


# Marks the assertion a bad label trips inside the tf.data graph, to tell it from a decode error.
LABEL_ASSERTION = "jprompt: label out of range"
_NAMED_AT_MOST = 5  # bad examples named in an error or warning
# (data_dir, split share, example map) -> positions of undecodable examples, the first ids.
_UNDECODABLE: dict[tuple, tuple[tuple[int, ...], list[str]]] = {}


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's share of a split (``tfds.even_splits``), and what went wrong in it.

    Examples are read in file order as (position in the share, encoded image bytes, label):
    a position names the same example in every run, and images are decoded later, after any
    skip. Errors name examples by their tfds id (``<file>__<index>``).
    """

    builder: tfds.core.DatasetBuilder
    name: str
    split: str
    index: int
    count: int
    example_map: label_maps.ExampleMap
    num_classes: int

    @property
    def tfds_split(self) -> str:
        return tfds.even_splits(self.split, self.count)[self.index]

    @property
    def context(self) -> str:
        return f"{self.name}:{self.split} (process share {self.index} of {self.count})"

    @property
    def size(self) -> int:
        return self.builder.info.splits[self.tfds_split].num_examples

    def _read(self, *, add_tfds_id: bool = False) -> tf.data.Dataset:
        return self.builder.as_dataset(
            split=self.tfds_split,
            shuffle_files=False,
            decoders={self.example_map.image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=add_tfds_id),
        ).enumerate()

    def examples(self, *, skip_undecodable: bool) -> tuple[tf.data.Dataset, int]:
        """(position, encoded image, label) of the share, and how many there are.

        A label outside ``[0, num_classes)`` stops iteration (``explain`` names it).
        ``skip_undecodable`` leaves out the examples whose image does not decode, found by one
        decoding pass over the share the first time (a warning counts and names them).
        """

        def unpack(position, example):
            image, label = self.example_map.fn(example)
            in_range = tf.logical_and(label >= 0, label < self.num_classes)
            with tf.control_dependencies([tf.debugging.Assert(in_range, [LABEL_ASSERTION])]):
                return position, image, tf.identity(label)

        ds = self._read().map(unpack)
        if not skip_undecodable:
            return ds, self.size
        bad, ids = self.undecodable()
        if not bad:
            return ds, self.size
        if len(bad) == self.size:
            raise ValueError(f"no example of {self.context} decodes as an image: {ids}, ...")
        logging.warning("Skipping %d undecodable examples of %s: %s", len(bad), self.context, ids)
        bad_positions = tf.constant(bad, tf.int64)
        ds = ds.filter(lambda position, *_: tf.reduce_all(position != bad_positions))
        return ds, self.size - len(bad)

    def undecodable(self) -> tuple[tuple[int, ...], list[str]]:
        """Positions of the examples whose image does not decode, and the first few's ids."""
        key = (str(self.builder.data_dir), self.tfds_split, self.example_map)
        if key not in _UNDECODABLE:
            decode = self.example_map.decode

            def decoded_height(position, example):
                return position, tf.shape(decode(self.example_map.fn(example)[0]))[0]

            decoded = self._read().map(decoded_height, num_parallel_calls=_AUTOTUNE)
            good = {int(position) for position, _ in decoded.ignore_errors().as_numpy_iterator()}
            bad = tuple(sorted(set(range(self.size)) - good))
            _UNDECODABLE[key] = bad, self.example_ids(bad[:_NAMED_AT_MOST])
        return _UNDECODABLE[key]

    def example_ids(self, positions: Sequence[int]) -> list[str]:
        """The tfds ids of the examples at ``positions`` (sorted), each followed by its source
        file where the dataset records it (jprompt's builders: ``file_name``)."""
        if not positions:
            return []
        wanted = set(positions)
        ds = self._read(add_tfds_id=True).take(max(wanted) + 1)
        ds = ds.filter(lambda position, _: tf.reduce_any(position == list(wanted)))
        return [_example_id(ex) for _, ex in ds.as_numpy_iterator()]

    def bad_labels(self) -> list[tuple[int, int]]:
        """(position, label) of the first few examples whose label is out of range."""
        labels = self._read().map(lambda p, ex: (p, self.example_map.fn(ex)[1]))
        labels = labels.filter(lambda _, label: (label < 0) | (label >= self.num_classes))
        return list(labels.take(_NAMED_AT_MOST).as_numpy_iterator())

    def explain(self, error: tf.errors.InvalidArgumentError) -> ValueError:
        """An error naming the examples behind ``error``, raised while reading this share."""
        if LABEL_ASSERTION in error.message:
            bad = self.bad_labels()
            ids = self.example_ids([position for position, _ in bad])
            pairs = zip(ids, bad, strict=True)
            named = ", ".join(f"{i} (label {label})" for i, (_, label) in pairs)
            return ValueError(
                f"labels of {self.context} must be in [0, {self.num_classes}) for the model's "
                f"{self.num_classes} classes; out of range: {named}"
            )
        bad, ids = self.undecodable()
        if not bad:
            return ValueError(f"could not read an example of {self.context}: {error.message}")
        return ValueError(
            f"{len(bad)} example(s) of {self.context} could not be decoded as images: {ids}"
            f"{', ...' if len(bad) > len(ids) else ''}. Set skip_undecodable=True "
            "(config.input.skip_undecodable) to leave them out."
        )


def _example_id(example: dict) -> str:
    name = example["tfds_id"].decode()
    source = example.get("file_name")
    return name if source is None else f"{name} ({source.decode()})"


def open_share(builder, name, split, index, count, label_map, num_classes) -> Share:
    """Share ``index`` of ``count`` of ``name:split``, its keys and classes checked."""
    example_map = label_maps.example_map(label_map)
    _check_keys(builder, name, example_map.image_key, *example_map.features)
    _split_size(builder, name, split)
    if num_classes is None:
        num_classes = example_map.num_classes or (
            _class_label(builder, name, example_map.features[0]).num_classes
        )
    return Share(builder, name, split, index, count, example_map, num_classes)


def deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` in the same order on every run: a resumed iterator must equal an uninterrupted one."""
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def numpy_batches(ds: tf.data.Dataset, share: Share) -> Iterator[dict]:
    """Iterate ``ds`` as numpy; a bad example fails naming it (``Share.explain``)."""
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            raise share.explain(e) from e
        yield batch


def shuffled_forever(
    ds: tf.data.Dataset, *, seed: int, process_index: int, buffer: int
) -> tf.data.Dataset:
    """``ds`` repeated endlessly, reshuffled every pass: the training order, a function of the
    seed and the process only."""
    # crc32, not hash(): Python salts hashes per process, and this must not change on restart.
    shuffle_seed = zlib.crc32(f"{seed}/{process_index}".encode())
    return ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()


def steps_per_epoch(
    num_examples: int, global_batch_size: int, *, drop_last: bool, skip_undecodable: bool = False
) -> int:
    """Training steps in one pass over ``num_examples``: the full batches (``drop_last``), or
    every batch, the last one partial (PyTorch's ``drop_last=False``: 800 examples at 128 make
    7 steps)."""
    check_drop_last(drop_last, skip_undecodable)
    if drop_last:
        return num_examples // global_batch_size
    return math.ceil(num_examples / global_batch_size)


def check_drop_last(drop_last: bool, skip_undecodable: bool) -> None:
    """drop_last=False counts every example into its epochs, which skipping would break."""
    if not drop_last and skip_undecodable:
        raise ValueError(
            "drop_last=False (config.input.drop_last) counts every example of the split into "
            "the epoch's batches, but skip_undecodable=True (config.input.skip_undecodable) "
            "may leave some out: set drop_last=True, or skip_undecodable=False (an undecodable "
            "image then fails naming it)"
        )


def padded_epochs(
    examples: tf.data.Dataset,
    *,
    num_examples: int,
    batches_per_epoch: int,
    batch: int,
    seed: int,
    process_index: int,
    buffer: int,
    start_step: int,
) -> tf.data.Dataset:
    """``examples`` (``num_examples`` of them) as endless epochs of ``batches_per_epoch * batch``
    elements ``(slot, (example, mask))``, from step ``start_step`` on: each epoch is one pass in
    its own shuffled order (mask 1.0), then zeros of the examples' structure (mask 0.0).

    ``slot`` counts the elements from the start of training. The order of epoch ``e`` is a
    function of ``(seed, process_index, e)`` alone, so resuming skips whole epochs unread.
    Every process passes the same ``batches_per_epoch``: collective steps stay in step.
    """
    per_epoch = batches_per_epoch * batch
    if num_examples > per_epoch:
        raise ValueError(
            f"{num_examples} examples do not fit in {batches_per_epoch} batches of {batch}; "
            f"pass batches_per_epoch={math.ceil(num_examples / batch)} or more"
        )
    # Images of unknown size (kept decoded, cache_decoded) are padded with empty ones.
    blank = tf.nest.map_structure(
        lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype),
        examples.element_spec,
    )
    padding = tf.data.Dataset.from_tensors((blank, 0.0)).repeat(per_epoch - num_examples)

    def epoch(index):
        # A fingerprint (FarmHash), stable across runs and machines, as the epoch's shuffle seed.
        name = tf.strings.format("{}/{}/{}", (seed, process_index, index))
        order_seed = tf.strings.to_hash_bucket_fast(name, 2**63 - 1)
        order = examples.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
        real = tf.data.Dataset.from_tensors(1.0).repeat()
        return tf.data.Dataset.zip((order, real)).concatenate(padding)

    first_epoch, offset = divmod(start_step, batches_per_epoch)
    ds = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)
    return ds.enumerate(start=first_epoch * per_epoch).skip(offset * batch)


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
    label_map: str = "",
    num_classes: int | None = None,
    skip_undecodable: bool = False,
    drop_last: bool = True,
) -> Iterator[dict]:
    """Endless shuffled, augmented host-local batches ``{"image", "label"}``.

    Yields float32 ``(b, S, S, 3)`` images and int32 ``(b,)`` labels, ``b = global_batch_size
    // process_count``. A function of (dataset, seed, process_index, step): ``start_step=s``
    continues exactly as an uninterrupted iterator after ``s`` batches. ``label_map`` names how
    examples become (image, label) (``label_maps.example_map``; default: the ``image`` and
    ``label`` features). Labels must lie in ``[0, num_classes)`` (default: the label map's or
    the label feature's classes); an undecodable image fails naming it, or is left out with
    ``skip_undecodable``.

    ``drop_last=False``: epochs of ``steps_per_epoch(split size, global_batch_size,
    drop_last=False)`` batches, each example once per epoch, and a float32 ``"mask"`` (0.0 on the
    zero images padding the last batch, and the batches a smaller process share needs to match
    the largest).
    """
    index, count, batch = process_batch(process_index, process_count, global_batch_size)
    builder = load_builder(name, data_dir)
    share = open_share(builder, name, split, index, count, label_map, num_classes)
    if not share.size:
        raise ValueError(f"{name}:{split} has no examples for process {index} of {count}")
    check_drop_last(drop_last, skip_undecodable)
    ds, _ = share.examples(skip_undecodable=skip_undecodable)

    def decode_head(encoded):
        return train_head(share.example_map.decode(encoded), spec)

    def estimate():
        return decoded_cache.image_bytes(share, lambda h, w: train_head_bytes(h, w, spec))

    cache = decoded_cache.use(share, spec.cache_decoded, estimate, "decoded training images")
    if cache:  # before the shuffle, which orders the elements the same whatever they hold
        ds = ds.map(lambda _, encoded, label: (decode_head(encoded), label), _AUTOTUNE).cache()
    else:
        ds = ds.map(lambda _, encoded, label: (encoded, label))
    base_seed = tf.constant([seed, index], tf.int64)

    def augment(position, image):
        image = image if cache else decode_head(image)  # the cache holds decode_head's output
        return train_tail(image, tf.random.fold_in(base_seed, position), spec)

    if drop_last:
        ds = shuffled_forever(ds, seed=seed, process_index=index, buffer=shuffle_buffer)
        ds = ds.enumerate().skip(start_step * batch)  # before the random part; uncached, undecoded

        def prepare(position, example):
            image, label = example
            return {"image": augment(position, image), "label": label}

    else:
        ds = padded_epochs(
            ds,
            num_examples=share.size,
            batches_per_epoch=eval_plan(builder, split, count, batch)[1],
            batch=batch,
            seed=seed,
            process_index=index,
            buffer=shuffle_buffer,
            start_step=start_step,
        )
        blank = tf.zeros([spec.image_size, spec.image_size, 3], tf.float32)

        def prepare(position, item):
            (image, label), mask = item
            image = tf.cond(mask > 0, lambda: augment(position, image), lambda: blank)
            return {"image": image, "label": label, "mask": mask}

    ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE)
    ds = deterministic(ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE))
    return numpy_batches(ds, share)


def eval_plan(builder, split, count, batch) -> tuple[list[int], int]:
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
    _, count, batch = process_batch(0, process_count, global_batch_size)
    return eval_plan(load_builder(name, data_dir), split, count, batch)[1]


def eval_iterator(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    spec: PreprocessSpec,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    label_map: str = "",
    num_classes: int | None = None,
    skip_undecodable: bool = False,
) -> Iterator[dict]:
    """One pass over this process's share: ``{"image", "label", "mask"}`` host-local batches.

    Every example appears once with ``mask`` 1.0; the rest of the last batch, and any whole
    batches a smaller share needs to match the largest, are zeros with ``mask`` 0.0. Labels and
    undecodable images are handled as in ``train_iterator`` (skipped examples are not counted).
    """
    index, count, batch = process_batch(process_index, process_count, global_batch_size)
    builder = load_builder(name, data_dir)
    share = open_share(builder, name, split, index, count, label_map, num_classes)
    _, num_batches = eval_plan(builder, split, count, batch)
    size = spec.image_size
    blank = {
        "image": tf.zeros([size, size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }
    if share.size:
        examples, num_examples = decoded_cache.kept_eval_split(
            # everything the examples depend on
            (str(builder.data_dir), name, share.tfds_split, share.example_map, share.num_classes)
            + (skip_undecodable, spec),
            lambda: _eval_examples(share, spec, skip_undecodable),
        )
    else:  # tfds cannot read an empty share: this process only pads
        examples, num_examples = None, 0
    ds = tf.data.Dataset.from_tensors(blank).repeat(num_batches * batch - num_examples)
    if examples is not None:
        ds = examples.concatenate(ds)
    ds = deterministic(ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE))
    return numpy_batches(ds, share)


def _eval_examples(share: Share, spec: PreprocessSpec, skip_undecodable: bool):
    """(preprocessed examples, how many, bytes cached) of ``share`` for ``eval_iterator``."""

    def prepare(position, encoded, label):
        del position
        image = eval_transform(share.example_map.decode(encoded), spec)
        return {"image": image, "label": label, "mask": tf.constant(1.0)}

    examples, num_examples = share.examples(skip_undecodable=skip_undecodable)
    examples = examples.map(prepare, num_parallel_calls=_AUTOTUNE)
    nbytes = share.size * spec.image_size**2 * 3 * 4  # float32 images
    if not decoded_cache.use(share, spec.cache_decoded, lambda: nbytes, "evaluation images"):
        return examples, num_examples, 0
    return examples.cache(), num_examples, nbytes
