"""Which splits keep their images' deterministic preprocessing in memory between passes
(``PreprocessSpec.cache_decoded``, ``config.input.cache_decoded``), and the evaluation splits
kept from one call to the next.

From the second pass over a cached split on, no image is decoded. Training keeps each image as
``preprocess.train_head`` leaves it (decoded, and resized where the train crop resizes before it
draws: "resize", "center_crop", "resize_random_crop") and still draws the random crop, flip and
augmentation from the example's seed every epoch; evaluation keeps the finished model inputs.
tf.data's in-memory cache (``Dataset.cache()``) holds them, filled during the first pass, so the
batches are bit for bit those of an uncached run. A cached training split is shuffled as kept
images, so its first batch waits until the shuffle buffer (all of a small split) is decoded.

"auto" caches a split when its estimate fits ``BUDGET``, 2 GiB: the sum over its images of the
bytes each takes as kept (float32 after a resize, uint8 when only decoded). Image sizes come from
the tfds feature's shape where it is fixed, else from each image's JPEG or PNG header, read
without decoding; the count stops once it passes the budget. Every process decides for its own
share. A training split's cache lives as long as its iterator. Evaluation splits are kept
between calls, since the trainer evaluates every epoch; the least recently used are dropped once
the kept ones take more than ``BUDGET`` together, or number more than 16.
"""

import collections
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from jprompt.data.preprocess import encoded_image_size

BUDGET = 2 * 2**30  # bytes
_MIB = 2**20
_KEPT_SPLITS = 16  # evaluation splits kept, cached or not, at most


def image_bytes(share, per_image: Callable) -> int:
    """The sum of ``per_image(height, width)`` over the images of ``share`` (a
    ``pipeline.Share``), or a number above ``BUDGET`` once it passes it."""
    feature = share.builder.info.features[share.example_map.image_key]
    shape = getattr(feature, "shape", ())  # an Image's (H, W, C), a Video's (T, H, W, C)
    if len(shape) >= 3 and None not in shape[-3:-1]:
        return share.size * int(per_image(*shape[-3:-1]))
    examples, _ = share.examples(skip_undecodable=False)

    def kept(position, encoded, label):
        del position, label
        return tf.cast(per_image(*tf.unstack(encoded_image_size(encoded))), tf.int64)

    # Examples that fail to read are left to the pipeline, which names them.
    sizes = examples.map(kept, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    total = 0
    for chunk in sizes.batch(256).as_numpy_iterator():
        total += int(chunk.sum())
        if total > BUDGET:
            break
    return total


def use(share, mode: str, estimate: Callable[[], int], what: str) -> bool:
    """Whether to cache ``what`` of ``share`` under ``mode`` ("auto", "on", "off"), logged in
    one line; ``estimate()`` gives the bytes (``image_bytes``)."""
    if mode == "off":
        logging.info(
            "Input cache: not keeping the %s of %s (config.input.cache_decoded='off')",
            what,
            share.context,
        )
        return False
    size = estimate()
    cache = mode == "on" or size <= BUDGET
    logging.info(
        "Input cache: %s the %s of %s in memory after the first pass: %s MiB, budget %.0f MiB "
        "(config.input.cache_decoded=%r)",
        "keeping" if cache else "not keeping",
        what,
        share.context,
        f"over {BUDGET / _MIB:.1f}" if size > BUDGET else f"about {size / _MIB:.1f}",
        BUDGET / _MIB,
        mode,
    )
    return cache


# key -> (examples, how many, bytes cached), least recently used first
_EVAL_SPLITS: collections.OrderedDict = collections.OrderedDict()


def kept_eval_split(key, build: Callable[[], tuple[tf.data.Dataset, int, int]]):
    """``(examples, how many)`` of an evaluation split: ``build()``'s ``(examples, how many,
    bytes cached)`` the first time, kept for the next calls with the same ``key``."""
    if key not in _EVAL_SPLITS:
        _EVAL_SPLITS[key] = build()
        while len(_EVAL_SPLITS) > 1 and (
            len(_EVAL_SPLITS) > _KEPT_SPLITS
            or sum(nbytes for _, _, nbytes in _EVAL_SPLITS.values()) > BUDGET
        ):
            _EVAL_SPLITS.popitem(last=False)
    _EVAL_SPLITS.move_to_end(key)
    examples, count, _ = _EVAL_SPLITS[key]
    return examples, count
