"""Mixtures of datasets: one model trained on several presets at once, in one label space.

The PGN paper claims that one PGN trains on several datasets simultaneously and divides its
token library between them. ``mix/<preset>+<preset>+...`` names such a mixture, e.g.
``mix/jprompt_shapes/colors+jprompt_shapes/count+jprompt_shapes/textures``: two or more
``jprompt.data.presets`` names, each once, each with its own tfds builder, splits and labels.
The functions here take that name where ``jprompt.data.pipeline``'s take a tfds name, with the
same signatures, so the trainer reads either through one interface.

- Labels: the union. Component i's labels are offset by the class counts of the components
  before it, and the class names (each preset's clean names) are concatenated in that order, so
  a zero-shot head is built over every class of every component.
- Zero-shot templates: ``TEMPLATES`` (the VP/PGN default, "This is a photo of a {}") for every
  class. The per-dataset templates of the papers' code (CIFAR-100's, CLEVR's) are not used: no
  official code trains on a mixture, and one template keeps the classes of all components
  comparable in the one softmax.
- Splits: a split argument that is a preset role (``ROLES``: train, val, test, trainval) means
  each component's own split for that role (``Preset.train``, ...); any other string is a tfds
  split applied to every component (``train[:40]``).
- Preprocessing: one ``PreprocessSpec`` for every component; labels and decoding are each
  preset's own (``Preset.label_map``).
- Training order, ``sampling`` (``SAMPLINGS``): ``proportional``, every example of every
  component once per pass, the components interleaved in a fresh random order each pass (each
  also reshuffles its own examples), so a component is drawn in proportion to its size;
  ``uniform``, each example's component drawn uniformly whatever the sizes (a pass is then as
  many examples as the components hold together). The guarantees of
  ``pipeline.train_iterator`` hold: a function of (seed, process, step), resumable at
  ``start_step`` (equal to an uninterrupted stream), each process reading its share of every
  component, each example's augmentation seeded by its position in the stream. Batches carry
  ``"source"``, the component's index (int32). ``drop_last=False`` pads every pass to whole
  batches (``mask`` 0); the number of batches per pass follows the largest process's share,
  which in a multi-process job can exceed the trainer's ``ceil(examples / global batch)``.
- Evaluation: ``eval_iterator`` reads the components' splits one after the other (the mixture's
  pooled accuracy, on which the trainer selects), or one component (``component=i``), its labels
  still in the union space. ``score`` rates each component two ways: ``accuracy``, the arg max
  over all classes of the mixture (the model is not told the source: the mixed-domain setting),
  and ``accuracy_own_classes``, the arg max over the component's own classes only (the model is
  told the source, as a dataset is scored when trained alone; how the paper scored its mixture
  per dataset is not published), with its mean token weights where the method has a token
  library (PGN).
- Division of labour: ``division_of_labour``, the mean Jensen-Shannon divergence (bits, 0 to 1)
  between the components' mean use of the library rows; 0 when every component uses the library
  alike.

``jprompt.data.mixture_name`` holds the names (``TEMPLATES``, ``ROLES``, ``SAMPLINGS``, ``parse``).
"""

import dataclasses
import functools
import itertools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from jprompt.data import pipeline, presets
from jprompt.data.mixture_name import ROLES, SAMPLINGS, parse
from jprompt.data.preprocess import PreprocessSpec, train_transform


@dataclasses.dataclass(frozen=True)
class Component:
    """One dataset of a mixture: its preset, its split, and its classes' place in the union."""

    preset: presets.Preset
    split: str
    offset: int  # added to its labels
    num_classes: int
    class_names: tuple[str, ...]  # the preset's clean names
    num_examples: int


def _split(preset: presets.Preset, split: str) -> str:
    if split not in ROLES:
        return split
    if not getattr(preset, split):
        raise ValueError(f"preset {preset.name!r} has no {split} split; name a tfds split instead")
    return getattr(preset, split)


def components(name: str, split: str, *, data_dir: str | None = None) -> tuple[Component, ...]:
    """The components of mixture ``name`` with ``split`` resolved for each (``ROLES``)."""
    parts, offset = [], 0
    for preset in parse(name):
        part_split = _split(preset, split)
        info = pipeline.dataset_info(
            preset.tfds_spec, part_split, data_dir=data_dir, label_map=preset.label_map
        )
        if preset.num_classes not in (0, info.num_classes):
            raise ValueError(
                f"preset {preset.name!r} has {preset.num_classes} classes but its dataset "
                f"{preset.tfds_spec} has {info.num_classes}; prepare the preset's version"
            )
        names = preset.clean_class_names(info.class_names)
        parts.append(
            Component(preset, part_split, offset, info.num_classes, names, info.num_examples)
        )
        offset += info.num_classes
    return tuple(parts)


def _checked(name, split, data_dir, label_map, num_classes) -> tuple[Component, ...]:
    if label_map:
        raise ValueError(
            f"label_map={label_map!r} (config.dataset.label_map) cannot apply to the mixture "
            f"{name!r}: each component uses its preset's own; set it to ''"
        )
    parts = components(name, split, data_dir=data_dir)
    total = sum(part.num_classes for part in parts)
    if num_classes not in (None, total):
        raise ValueError(f"the model has {num_classes} classes but mixture {name!r} has {total}")
    return parts


def dataset_info(
    name: str, split: str, *, data_dir: str | None = None, label_map: str = ""
) -> pipeline.DatasetInfo:
    """The union's classes (names concatenated in component order) and the examples of every
    component's ``split``."""
    parts = _checked(name, split, data_dir, label_map, None)
    return pipeline.DatasetInfo(
        num_classes=sum(part.num_classes for part in parts),
        class_names=tuple(itertools.chain.from_iterable(part.class_names for part in parts)),
        num_examples=sum(part.num_examples for part in parts),
    )


@dataclasses.dataclass(frozen=True)
class _Shares:
    """This process's share of every component: a failed read is explained by the component
    at fault."""

    shares: tuple

    def explain(self, error: tf.errors.InvalidArgumentError) -> ValueError:
        label_error = pipeline.LABEL_ASSERTION in error.message
        at_fault = (
            s for s in self.shares if (s.bad_labels() if label_error else s.undecodable()[0])
        )
        return next(at_fault, self.shares[0]).explain(error)


def _tag(position, encoded, label, *, offset: int, source: int):
    del position
    return encoded, label + offset, tf.constant(source, tf.int32), tf.constant(1.0)


def _augment(decode, encoded, seed, spec):
    return train_transform(decode(encoded), seed, spec)


def _sources(sizes, sampling, per_epoch, *, seed, process_index) -> tf.data.Dataset:
    """The endless sequence of component indices, pass by pass: ``sampling`` fills the first
    ``sum(sizes)`` places of each pass, and ``len(sizes)`` (padding) the rest of its
    ``per_epoch``. Pass ``e`` is a function of ``(seed, process_index, e)`` alone."""
    total, count = sum(sizes), len(sizes)
    proportional = tf.constant(np.repeat(np.arange(count), sizes), tf.int64)
    padding = tf.fill([per_epoch - total], tf.constant(count, tf.int64))
    key = zlib.crc32(f"{seed}/{process_index}/sources".encode())  # stable across runs

    def one_pass(epoch):
        pass_seed = tf.stack([tf.constant(key, tf.int64), epoch])
        if sampling == "proportional":
            drawn = tf.random.experimental.stateless_shuffle(proportional, seed=pass_seed)
        else:
            drawn = tf.random.stateless_uniform(
                [total], seed=pass_seed, maxval=count, dtype=tf.int64
            )
        return tf.data.Dataset.from_tensor_slices(tf.concat([drawn, padding], 0))

    return tf.data.Dataset.range(tf.int64.max).flat_map(one_pass)


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
    sampling: str = "proportional",
) -> Iterator[dict]:
    """Endless shuffled, augmented host-local batches ``{"image", "label", "source"}`` (and
    ``"mask"`` with ``drop_last=False``) of mixture ``name``, as ``pipeline.train_iterator``;
    ``sampling`` is one of ``SAMPLINGS`` (module docstring)."""
    if sampling not in SAMPLINGS:
        raise ValueError(
            f"unknown sampling {sampling!r} (config.dataset.sampling); valid choices: {SAMPLINGS}"
        )
    index, count, batch = pipeline.process_batch(process_index, process_count, global_batch_size)
    pipeline.check_drop_last(drop_last, skip_undecodable)
    parts = _checked(name, split, data_dir, label_map, num_classes)
    shares, streams, sizes, share_sizes = [], [], [], []
    for source, part in enumerate(parts):
        builder = pipeline.load_builder(part.preset.tfds_spec, data_dir)
        share = pipeline.open_share(
            builder, part.preset.tfds_spec, part.split, index, count, part.preset.label_map, None
        )
        if not share.size:
            raise ValueError(
                f"{part.preset.name}:{part.split} has no examples for process {index} of {count}"
            )
        examples, size = share.examples(skip_undecodable=skip_undecodable)
        examples = examples.map(functools.partial(_tag, offset=part.offset, source=source))
        # Each component reshuffles its own examples every pass, with its own seed.
        streams.append(
            pipeline.shuffled_forever(
                examples,
                seed=zlib.crc32(f"{seed}/{source}".encode()),
                process_index=index,
                buffer=shuffle_buffer,
            )
        )
        shares.append(share)
        sizes.append(size)
        share_sizes.append(pipeline.eval_plan(builder, part.split, count, batch)[0])
    # Every process makes as many batches per pass as the one with the largest share.
    per_epoch = (
        sum(sizes) if drop_last else math.ceil(max(np.sum(share_sizes, axis=0)) / batch) * batch
    )
    padding = tf.data.Dataset.from_tensors(
        (tf.constant(b""), tf.constant(0, tf.int32), tf.constant(0, tf.int32), tf.constant(0.0))
    ).repeat()
    choices = _sources(sizes, sampling, per_epoch, seed=seed, process_index=index)
    ds = tf.data.Dataset.choose_from_datasets([*streams, padding], choices)
    ds = ds.enumerate().skip(start_step * batch)  # skip encoded bytes: cheap
    base_seed = tf.constant([seed, index], tf.int64)
    decoders = [share.example_map.decode for share in shares]
    blank = tf.zeros([spec.image_size, spec.image_size, 3], tf.float32)

    def prepare(position, element):
        encoded, label, source, mask = element
        example_seed = tf.random.fold_in(base_seed, position)
        branches = [functools.partial(_augment, d, encoded, example_seed, spec) for d in decoders]
        image = tf.cond(mask > 0, lambda: tf.switch_case(source, branches), lambda: blank)
        out = {"image": image, "label": label, "source": source}
        return out if drop_last else {**out, "mask": mask}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = pipeline.deterministic(ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    return pipeline.numpy_batches(ds, _Shares(tuple(shares)))


def _selected(parts, component: int | None):
    if component is None:
        return list(enumerate(parts))
    if not 0 <= component < len(parts):
        raise ValueError(f"component {component} is not in [0, {len(parts)})")
    return [(component, parts[component])]


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
    component: int | None = None,
) -> Iterator[dict]:
    """``pipeline.eval_iterator`` over every component's ``split`` in turn, or over component
    ``component`` only: ``{"image", "label", "mask", "source"}`` batches, labels in the union
    space. Each component pads its own last batch."""
    parts = _checked(name, split, data_dir, label_map, num_classes)
    for source, part in _selected(parts, component):
        batches = pipeline.eval_iterator(
            part.preset.tfds_spec,
            part.split,
            global_batch_size=global_batch_size,
            spec=spec,
            data_dir=data_dir,
            process_index=process_index,
            process_count=process_count,
            label_map=part.preset.label_map,
            num_classes=part.num_classes,
            skip_undecodable=skip_undecodable,
        )
        for batch in batches:
            # Padding rows get the offset too: masked, but still a label of the union.
            label = batch["label"] + np.int32(part.offset)
            yield {**batch, "label": label, "source": np.full_like(label, source)}


def num_eval_batches(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    process_count: int | None = None,
    component: int | None = None,
) -> int:
    """How many batches ``eval_iterator`` yields (the same on every process)."""
    parts = components(name, split, data_dir=data_dir)
    return sum(
        pipeline.num_eval_batches(
            part.preset.tfds_spec,
            part.split,
            global_batch_size=global_batch_size,
            data_dir=data_dir,
            process_count=process_count,
        )
        for _, part in _selected(parts, component)
    )


@dataclasses.dataclass
class Tally:
    """One component's scores, summed over predicted batches (``add``), then ``result``."""

    offset: int
    num_classes: int
    correct: int = 0
    correct_own: int = 0
    count: int = 0
    usage: np.ndarray | None = None  # the (K, N) token weights, summed over examples

    def add(self, logits, labels, mask, token_weights=None) -> None:
        real = np.asarray(mask) > 0
        logits, labels = np.asarray(logits)[real], np.asarray(labels)[real]
        own = logits[:, self.offset : self.offset + self.num_classes].argmax(-1) + self.offset
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.correct_own += int((own == labels).sum())
        self.count += int(real.sum())
        if token_weights is not None:
            summed = np.asarray(token_weights, np.float64)[real].sum(0)
            self.usage = summed if self.usage is None else self.usage + summed

    def result(self) -> dict:
        return {
            "accuracy": self.correct / self.count,
            "accuracy_own_classes": self.correct_own / self.count,
            "num_examples": self.count,
        }

    def mean_usage(self) -> np.ndarray | None:
        return None if self.usage is None else self.usage / self.count


def score(
    predict: Callable[[dict, int], dict],
    name: str,
    split: str,
    **eval_options,
) -> tuple[dict[str, dict], list[np.ndarray | None]]:
    """Each component's ``Tally.result`` on ``split`` by preset name, and its mean ``(K, N)``
    token weights (None for a method without a token library).

    ``predict(batch, index)`` gives the global batch's ``"logits"``, ``"label"``, ``"mask"`` and
    ``"token_weights"`` (or None) as numpy; ``eval_options`` go to ``eval_iterator``.
    """
    parts = components(name, split, data_dir=eval_options.get("data_dir"))
    scores, usages = {}, []
    for source, part in enumerate(parts):
        tally = Tally(part.offset, part.num_classes)
        batches = eval_iterator(name, split, component=source, **eval_options)
        for index, batch in enumerate(batches):
            out = predict(batch, index)
            tally.add(out["logits"], out["label"], out["mask"], out["token_weights"])
        scores[part.preset.name] = tally.result()
        usages.append(tally.mean_usage())
    return scores, usages


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions, in bits: 0 if equal, 1 if disjoint."""
    p, q = (np.asarray(x, np.float64) / np.sum(x) for x in (p, q))
    middle = (p + q) / 2

    def kl(a):  # KL(a || middle); terms with a == 0 contribute nothing
        used = a > 0
        return float(np.sum(a[used] * np.log2(a[used] / middle[used])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def division_of_labour(usages: Sequence[np.ndarray]) -> float:
    """Mean ``js_divergence`` over pairs of components of their library use: each one's mean
    ``(K, N)`` token weights averaged over the K tokens, a distribution over the N rows."""
    rows = [np.asarray(u, np.float64).reshape(-1, np.shape(u)[-1]).mean(0) for u in usages]
    return float(np.mean([js_divergence(a, b) for a, b in itertools.combinations(rows, 2)]))
