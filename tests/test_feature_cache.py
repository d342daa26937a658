"""Linear probing from cached features: the same head as without the cache, one backbone forward
per image, exact resumption, and clear errors for random augmentation and non-finite features."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import to_numpy

from jprompt.data.preprocess import PreprocessSpec
from jprompt.models import backbones
from jprompt.train import feature_cache, sharding, trainer


@pytest.fixture
def probe_config(shapes_data_dir):
    """The linear probe demo (features cached) on 4 steps per epoch: train 256, batch 64."""

    def make(**overrides):
        config = helpers.shrink(
            helpers.load_config("linear_probe.py"),
            shapes_data_dir,
            num_epochs=2,
            val_split="validation[:64]",
            test_split="test[:100]",  # not a multiple of the batch: padding
            warmup_steps=2,
        )
        config.input.shuffle_buffer = 64  # smaller than the split: a partial shuffle
        config.update_from_flattened_dict(overrides)
        return config

    return make


def test_cached_training_equals_training_on_images(probe_config):
    cached = trainer.create_experiment(probe_config())
    uncached = trainer.create_experiment(probe_config(**{"method.cache_features": False}))
    assert cached.features is not None and uncached.features is None
    # 6 steps: the second pass over the 256 examples reshuffles.
    cached_losses, cached_state = helpers.run_steps(cached, 6)
    uncached_losses, uncached_state = helpers.run_steps(uncached, 6)
    # Two compiled programs summing float32 in different orders: relative 1e-4.
    np.testing.assert_allclose(cached_losses, uncached_losses, rtol=1e-4)
    assert cached_losses[-1] != cached_losses[0]  # it trained
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        to_numpy(cached_state["trained"]),
        to_numpy(uncached_state["trained"]),
    )
    trained = cached_state["trained"]
    for split in ("validation[:64]", "test[:100]"):
        assert cached.evaluate(trained, split) == pytest.approx(uncached.evaluate(trained, split))


@pytest.fixture
def backbone_rows(monkeypatch):
    """Counts the images every backbone forward runs on, as the compiled programs execute."""
    rows = []
    features = backbones.Backbone.features

    def counted(self, params, images, **kwargs):
        jax.debug.callback(lambda x: rows.append(x.shape[0]), images[:, 0, 0, 0])
        return features(self, params, images, **kwargs)

    monkeypatch.setattr(backbones.Backbone, "features", counted)
    return rows


def test_backbone_runs_once_per_image_and_resumes_exactly(probe_config, tmp_path, backbone_rows):
    config = probe_config()
    whole = trainer.train_and_evaluate(config, str(tmp_path / "whole"))
    # 2 epochs, each validated: the train split (256), validation (64) and test (100, padded to
    # 2 batches of 64) each ran through the backbone once.
    assert sum(backbone_rows) == 256 + 64 + 128
    assert whole["total_steps"] == 8 and whole["test"]["num_examples"] == 100

    # Stopped mid-epoch, after the first epoch's checkpoint, then finished.
    parts = tmp_path / "parts"
    assert trainer.train_and_evaluate(config, str(parts), max_steps=5)["stopped_at_step"] == 5
    resumed = trainer.train_and_evaluate(config, str(parts))
    assert resumed == whole
    experiment = trainer.create_experiment(config)
    jax.tree.map(
        np.testing.assert_array_equal,
        helpers.latest_trained(parts, experiment),
        helpers.latest_trained(tmp_path / "whole", experiment),
    )


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"input.flip": True}, "but config.input.flip=True augment"),
        ({"input.train_crop": "random_resized_crop"}, "config.input.train_crop='random_resized"),
        ({"input.augment": "pgn"}, "config.input.augment='pgn'"),
    ],
)
def test_random_augmentation_is_refused_naming_the_fix(probe_config, overrides, named):
    with pytest.raises(ValueError) as error:
        trainer.create_experiment(probe_config(**overrides))
    message = str(error.value)
    assert named in message
    assert "Set config.input.train_crop to one of ['center_crop', 'resize']" in message
    assert "config.input.flip=False and config.input.augment='none'" in message
    assert "or config.method.cache_features=False to keep the augmentation" in message
    # Without the cache the augmentation trains as asked.
    config = probe_config(**overrides, **{"method.cache_features": False})
    assert trainer.create_experiment(config).features is None


def test_non_finite_features_fail_naming_the_examples():
    def read(split, spec):
        for start in (0, 4):  # two batches of 4 "images" whose pixels are their position
            images = np.broadcast_to(
                np.arange(start, start + 4.0)[:, None, None, None], (4, 2, 2, 3)
            )
            yield {"image": images, "label": np.zeros(4, np.int32), "mask": np.ones(4, np.float32)}

    pixels = lambda images: images[:, 0, 0, :]
    cache = feature_cache.FeatureCache(
        jax.jit(lambda images: jnp.where(pixels(images) == 6, jnp.nan, pixels(images))),
        sharding.make_mesh(jax.devices()[:1]),
        read=read,
        num_batches=lambda split: 2,
    )
    with pytest.raises(FloatingPointError, match=r"1 example\(s\) of train .*examples \[6\]"):
        cache.get("train", PreprocessSpec(image_size=2))
