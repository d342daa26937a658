"""``drop_last=False``: VPT's PyTorch loader keeps the last, partial batch of every epoch
(800 examples at batch 128: 7 steps). jprompt pads that batch to full size with ``mask`` 0
examples, and the masked step trains as if it had been given the real examples alone.
"""

import collections
import types

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from test_data import AUGMENT, SHAPES, example_keys, read_split, take, to_uint8

from jprompt.data import pipeline, preprocess
from jprompt.data.preprocess import PreprocessSpec
from jprompt.methods.linear import ProbeHead
from jprompt.train import feature_cache
from jprompt.train.step import make_train_step

PLAIN = PreprocessSpec(32)  # a resize to the images' own size: pixels unchanged


def batches(data_dir, split="train[:37]", **kwargs):
    kwargs = {"global_batch_size": 8, "spec": PLAIN, "seed": 0, "process_count": 1, **kwargs}
    return pipeline.train_iterator(
        SHAPES,
        split,
        data_dir=str(data_dir),
        process_index=kwargs.pop("process_index", 0),
        **kwargs,
    )


def test_steps_per_epoch_count_the_partial_batch():
    assert pipeline.steps_per_epoch(800, 128, drop_last=False) == 7  # VPT's VTAB-1k epoch
    assert pipeline.steps_per_epoch(800, 128, drop_last=True) == 6
    assert pipeline.steps_per_epoch(768, 128, drop_last=False) == 6
    with pytest.raises(ValueError, match="skip_undecodable=True .* set drop_last=True"):
        pipeline.steps_per_epoch(800, 128, drop_last=False, skip_undecodable=True)


@pytest.mark.parametrize("process_count", [1, 2])
def test_an_epoch_holds_every_example_once_and_pads_its_last_batch(shapes_data_dir, process_count):
    # 37 examples, global batch 8: 5 steps per epoch. Two processes: shares of 19 and 18 in
    # local batches of 4, both 5 batches long (the smaller one padded a little more).
    steps = pipeline.steps_per_epoch(37, 8, drop_last=False)
    assert steps == 5
    local = 8 // process_count
    seen = []
    for index in range(process_count):
        stream = batches(
            shapes_data_dir, drop_last=False, process_index=index, process_count=process_count
        )
        epochs = [take(stream, steps), take(stream, steps)]
        real = 37 // process_count + (index < 37 % process_count)
        per_epoch = []
        for epoch in epochs:
            mask = np.concatenate([b["mask"] for b in epoch])
            images = np.concatenate([b["image"] for b in epoch])
            labels = np.concatenate([b["label"] for b in epoch])
            assert all(b["image"].shape == (local, 32, 32, 3) for b in epoch)
            np.testing.assert_array_equal(mask, np.r_[np.ones(real), np.zeros(5 * local - real)])
            assert (images[real:] == 0).all() and (labels[real:] == 0).all()
            per_epoch.append(example_keys(to_uint8(images[:real]), labels[:real]))
        if process_count == 1:
            assert epochs[0][-1]["mask"].sum() == 37 - 4 * 8  # the partial batch of 5
        assert collections.Counter(per_epoch[0]) == collections.Counter(per_epoch[1])
        assert per_epoch[0] != per_epoch[1]  # each epoch in its own order
        seen += per_epoch[0]
    images, labels = read_split(str(shapes_data_dir), "train[:37]")
    assert collections.Counter(seen) == collections.Counter(example_keys(images, labels))


def test_resuming_equals_never_stopping(shapes_data_dir):
    # Steps 3..11 cross two epoch ends (5 steps each), augmentation included.
    fresh = take(batches(shapes_data_dir, spec=AUGMENT, drop_last=False), 12)
    resumed = take(batches(shapes_data_dir, spec=AUGMENT, drop_last=False, start_step=3), 9)
    for expected, got in zip(fresh[3:], resumed, strict=True):
        assert got.keys() == expected.keys() == {"image", "label", "mask"}
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_drop_last_keeps_the_endless_stream_unchanged(shapes_data_dir):
    """The default stream is the one jprompt always made: one seeded shuffle reshuffled every
    pass, example ``k`` of the stream augmented with seed ``fold_in([seed, process], k)``,
    full batches only, no mask."""
    images, labels = read_split(str(shapes_data_dir), "train[:12]")
    got = take(batches(shapes_data_dir, "train[:12]", spec=AUGMENT, seed=3), 3)
    order = pipeline.shuffled_forever(
        tf.data.Dataset.range(12), seed=3, process_index=0, buffer=10_000
    )
    order = list(order.take(24).as_numpy_iterator())
    assert sorted(order[:12]) == sorted(order[12:]) == list(range(12))
    base = tf.constant([3, 0], tf.int64)
    for step, batch in enumerate(got):
        assert batch.keys() == {"image", "label"}
        positions = order[step * 8 : (step + 1) * 8]
        np.testing.assert_array_equal(batch["label"], labels[positions])
        expected = [
            preprocess.train_transform(
                tf.constant(images[p]),
                tf.random.fold_in(base, tf.constant(step * 8 + i, tf.int64)),
                AUGMENT,
            )
            for i, p in enumerate(positions)
        ]
        np.testing.assert_array_equal(batch["image"], np.stack(expected))


def test_cached_features_follow_the_padded_epochs(shapes_data_dir):
    # Features = the images' own pixels: a cached run must see exactly the pipeline's batches.
    images, labels = read_split(str(shapes_data_dir), "train[:37]")
    pixels = preprocess.normalize(tf.constant(images), PLAIN.normalization).numpy()
    cached = feature_cache.Features(pixels.reshape(37, -1), labels.astype(np.int32), 5)
    got = feature_cache.train_iterator(
        cached, global_batch_size=8, seed=0, start_step=2, steps_per_epoch=5
    )
    expected = batches(shapes_data_dir, drop_last=False, start_step=2)
    for cached_batch, batch in zip(take(got, 6), take(expected, 6), strict=True):
        np.testing.assert_array_equal(cached_batch["image"].reshape(8, 32, 32, 3), batch["image"])
        np.testing.assert_array_equal(cached_batch["label"], batch["label"])
        np.testing.assert_array_equal(cached_batch["mask"], batch["mask"])


def _probe_step():
    """A linear probe's head on random 6-d features, 3 classes, plain SGD at lr 1 (the update
    is minus the gradient)."""
    method = ProbeHead(types.SimpleNamespace(feature_dim=6), num_classes=3, head_init="vpt")
    trained, frozen = method.init(jax.random.PRNGKey(0), {})
    state = {"step": np.int32(0), "trained": trained, "opt_state": optax.sgd(1.0).init(trained)}
    return jax.jit(make_train_step(method, optax.sgd(1.0), steps_per_epoch=7)), state, frozen


def test_masked_step_equals_a_step_on_the_real_examples_only():
    step, state, frozen = _probe_step()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=8).astype(np.int32)
    mask = np.r_[np.ones(5), np.zeros(3)].astype(np.float32)
    # Padding of any finite content changes nothing: random, not zeros, to show it.
    padded = {"image": features, "label": labels, "mask": mask}
    real = {"image": features[:5], "label": labels[:5]}
    key = jax.random.PRNGKey(1)
    padded_state, padded_metrics = step(jax.tree.map(np.copy, state), frozen, padded, key)
    real_state, real_metrics = step(jax.tree.map(np.copy, state), frozen, real, key)

    kernel, bias = (np.asarray(state["trained"]["params"]["head"][k]) for k in ("kernel", "bias"))
    logits = features[:5] @ kernel + bias
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    loss = -log_probs[np.arange(5), labels[:5]].mean()  # PyTorch's mean over the 5
    values = padded_metrics.compute()
    # float32 sums of another program (and numpy): relative 1e-5 over 5 examples.
    np.testing.assert_allclose(values["loss"], loss, rtol=1e-5)
    assert int(values["num_examples"]) == 5
    np.testing.assert_allclose(values["accuracy"], (logits.argmax(1) == labels[:5]).mean())
    for name, value in real_metrics.compute().items():
        np.testing.assert_allclose(values[name], value, rtol=1e-5, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        padded_state["trained"],
        real_state["trained"],
    )
    assert not np.allclose(padded_state["trained"]["params"]["head"]["kernel"], kernel)


def test_batch_statistics_refuse_padded_batches():
    step, state, frozen = _probe_step()
    state["trained"] = {**state["trained"], "batch_stats": {}}
    batch = {"image": np.zeros((2, 6), np.float32), "label": np.zeros(2, np.int32)}
    with pytest.raises(ValueError, match="BatchNorm .* config.input.drop_last=True"):
        step(state, frozen, {**batch, "mask": np.ones(2, np.float32)}, jax.random.PRNGKey(0))
