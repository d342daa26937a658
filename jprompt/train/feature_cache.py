"""Linear probing from cached features: the frozen backbone runs once per image.

A linear probe trains only its head, so the backbone's features of an image never change. With
``LinearProbe(cache_features=True)`` (``config.method.cache_features``) the trainer computes
them once per split, through the evaluation pipeline (deterministic preprocessing, every example
once, padding dropped), keeps them in host memory, and trains and evaluates the head on them:
many cheap steps instead of one backbone forward per image per epoch.

Cached batches keep the input pipeline's keys, so the trainer's steps, evaluation, non-finite
input check and sharding run on them unchanged: ``"image"`` holds the image's features
``(b, feature_dim)`` in place of its pixels. Training batches come in exactly the order
``pipeline.train_iterator`` reads the examples (the same seeded shuffle, indexed by step), so a
cached run trains the head as an uncached run without augmentation does, and resumes exactly.

Random train-time augmentation cannot be cached (each epoch would need new pixels):
``train_spec`` refuses it.
"""

import dataclasses
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from jprompt.data import pipeline
from jprompt.data.preprocess import PreprocessSpec
from jprompt.train import sharding

# The train crops that ignore their seed, and the eval crop that computes the same pixels
# (``jprompt.data.preprocess``: both "resize" squash to the image size, both "center_crop"
# scale the shorter side and take the central square).
DETERMINISTIC_TRAIN_CROPS = {"resize": "resize", "center_crop": "center_crop"}
LOG_EVERY_S = 30.0  # progress of an extraction, which is the long part on real data


def train_spec(spec: PreprocessSpec) -> PreprocessSpec:
    """The evaluation preprocessing that gives exactly the pixels ``spec`` trains on.

    Fails, naming the config fields, if ``spec`` augments at random: features computed once
    cannot follow a new crop or flip every epoch.
    """
    random = [f"config.input.flip={spec.flip}"] if spec.flip else []
    if spec.augment != "none":
        random.append(f"config.input.augment={spec.augment!r}")
    if spec.train_crop not in DETERMINISTIC_TRAIN_CROPS:
        random.insert(0, f"config.input.train_crop={spec.train_crop!r}")
    if random:
        raise ValueError(
            "config.method.cache_features=True computes each training image's features once, "
            f"but {' and '.join(random)} augment(s) the training images at random every epoch. "
            f"Set config.input.train_crop to one of {sorted(DETERMINISTIC_TRAIN_CROPS)}, "
            "config.input.flip=False and config.input.augment='none', or "
            "config.method.cache_features=False to keep the augmentation."
        )
    return dataclasses.replace(
        spec,
        eval_crop=DETERMINISTIC_TRAIN_CROPS[spec.train_crop],
        resize=spec.train_resize or spec.resize,
    )


@dataclasses.dataclass(frozen=True)
class Features:
    """One split's cached features: this process's share, in reading order, padding dropped."""

    features: np.ndarray  # (n, feature_dim), the backbone's dtype
    labels: np.ndarray  # (n,) int32
    num_batches: int  # evaluation batches of the split, the same on every process


class FeatureCache:
    """Each split's features, extracted on first use and kept in host memory.

    ``forward`` maps a global batch of images to their features (jitted, batch-sharded output);
    ``read(split, spec)`` is ``pipeline.eval_iterator`` over ``split`` preprocessed by ``spec``,
    and ``num_batches(split)`` the number of batches it yields.
    """

    def __init__(
        self,
        forward: Callable[[jax.Array], jax.Array],
        mesh: jax.sharding.Mesh,
        read: Callable[[str, PreprocessSpec], Iterator[dict]],
        num_batches: Callable[[str], int],
    ):
        self._forward = forward
        self._mesh = mesh
        self._read = read
        self._num_batches = num_batches
        self._splits: dict[tuple[str, PreprocessSpec], Features] = {}

    def get(self, split: str, spec: PreprocessSpec) -> Features:
        key = (split, spec)
        if key not in self._splits:
            self._splits[key] = self._extract(split, spec)
        return self._splits[key]

    def _extract(self, split: str, spec: PreprocessSpec) -> Features:
        total = self._num_batches(split)
        logging.info("Computing the backbone's features of %s once (%d batches)", split, total)
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        start = last_log = time.monotonic()
        # The batch in flight: fetched only once the next one is dispatched, so that reading
        # the next images overlaps the backbone's work on this one.
        pending = None
        num_batches = 0
        # Each split is read once here: keeping its images for another pass would only hold memory.
        read = self._read(split, dataclasses.replace(spec, cache_decoded="off"))
        for num_batches, local in enumerate(read, start=1):
            images = sharding.to_global_batch({"image": local["image"]}, self._mesh)["image"]
            if pending is not None:
                kept.append(self._real_rows(*pending))
            pending = self._forward(images), local
            if time.monotonic() - last_log >= LOG_EVERY_S:
                last_log = time.monotonic()
                rate = num_batches / (last_log - start)
                logging.info(
                    "Features of %s: %d/%d batches, %.1f batches/s, %.0f s left",
                    split,
                    num_batches,
                    total,
                    rate,
                    (total - num_batches) / rate,
                )
        if pending is None:
            raise ValueError(f"split {split!r} produced no batches to compute features of")
        kept.append(self._real_rows(*pending))
        features, labels = zip(*kept, strict=True)
        cached = Features(np.concatenate(features), np.concatenate(labels), num_batches)
        # Caught before any training and for every split (uncached, such a row is a NaN loss).
        bad = np.flatnonzero(~np.isfinite(cached.features).all(axis=1))
        if bad.size:
            raise FloatingPointError(
                f"the backbone's features of {bad.size} example(s) of {split} (this process's "
                f"examples {bad[:5].tolist()}, in reading order) contain NaN or Inf; check the "
                "dataset and its preprocessing (config.input), or compute in float32 "
                "(config.backbone.compute_dtype)"
            )
        logging.info(
            "Features of %s: %d examples (this process's share) in %.1f s",
            split,
            len(cached.labels),
            time.monotonic() - start,
        )
        return cached

    def _real_rows(self, features: jax.Array, local: dict) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the batch-sharded ``features`` (those it fed in), and their
        labels, without the padding."""
        spec = sharding.batch_sharded(self._mesh).spec
        rows = multihost_utils.global_array_to_host_local_array(features, self._mesh, spec)
        real = local["mask"] > 0
        return np.asarray(rows)[real], local["label"][real]


def train_iterator(
    cached: Features,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    shuffle_buffer: int = 10_000,
    steps_per_epoch: int | None = None,
) -> Iterator[dict]:
    """Endless host-local batches ``{"image": features, "label"}``, from step ``start_step`` on.

    The order is ``pipeline.train_iterator``'s: the same seeded shuffle (buffer, per-process
    seed, reshuffled every pass) over the same examples, drawn as positions into ``cached``, so
    step ``s`` trains on the features of exactly the images the uncached step ``s`` would.
    ``steps_per_epoch`` (the trainer's, with ``drop_last=False``) gives its epochs and padding:
    batches then carry the ``"mask"`` of ``pipeline.train_iterator(drop_last=False)``.
    """
    batch = global_batch_size // jax.process_count()
    positions = tf.data.Dataset.range(len(cached.labels))
    options = dict(seed=seed, process_index=jax.process_index(), buffer=shuffle_buffer)
    if steps_per_epoch is None:
        order = pipeline.shuffled_forever(positions, **options).skip(start_step * batch)
        order = order.batch(batch, drop_remainder=True)
        for taken in order.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            yield {"image": cached.features[taken], "label": cached.labels[taken]}
        return
    order = pipeline.padded_epochs(
        positions,
        num_examples=len(cached.labels),
        batches_per_epoch=steps_per_epoch,
        batch=batch,
        start_step=start_step,
        **options,
    )
    order = order.map(lambda slot, item: item).batch(batch, drop_remainder=True)
    for taken, mask in order.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        real = mask > 0  # padding: zero features and label 0, as the pipeline pads images
        features = np.zeros((batch, *cached.features.shape[1:]), cached.features.dtype)
        features[real] = cached.features[taken[real]]
        labels = np.where(real, cached.labels[taken], 0).astype(cached.labels.dtype)
        yield {"image": features, "label": labels, "mask": mask}


def eval_iterator(cached: Features, *, global_batch_size: int) -> Iterator[dict]:
    """One pass: host-local ``{"image": features, "label", "mask"}`` batches, padded as
    ``pipeline.eval_iterator`` pads (zeros with ``mask`` 0.0, the same number of batches on
    every process)."""
    batch = global_batch_size // jax.process_count()
    for start in range(0, cached.num_batches * batch, batch):
        features = cached.features[start : start + batch]
        labels = cached.labels[start : start + batch]
        padding = batch - len(labels)
        yield {
            "image": np.pad(features, ((0, padding), (0, 0))),
            "label": np.pad(labels, (0, padding)),
            "mask": np.pad(np.ones(len(labels), np.float32), (0, padding)),
        }
