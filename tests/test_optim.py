"""Learning-rate schedules, parameter groups and weight decay of jprompt.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jprompt import config_lib, optim


def optim_config(**overrides):
    config = config_lib.base_config(backbone="vit_tiny4", dataset="jprompt_shapes", demo=True)
    config.optim.update(overrides)
    return config.optim


def test_warmup_cosine_values():
    schedule = optim.warmup_cosine(base_lr=2.0, total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(1.0)
    assert float(schedule(10)) == pytest.approx(2.0)
    # Halfway through the decay the cosine is at half height.
    assert float(schedule(60)) == pytest.approx(1.0, abs=1e-6)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_cosine_ends_at_fraction_and_steps_per_epoch():
    schedule = optim.warmup_cosine(
        base_lr=1.0, total_steps=100, warmup_steps=0, end_lr_factor=0.01, steps_per_epoch=10
    )
    assert float(schedule(100)) == pytest.approx(0.01)
    # Stepped per epoch: constant within an epoch.
    assert float(schedule(21)) == float(schedule(29)) == pytest.approx(float(schedule(20)))
    assert float(schedule(30)) < float(schedule(29))


def test_unknown_choices_fail_listing_valid_ones():
    with pytest.raises(ValueError, match=r"valid choices: \('cosine', 'constant'\)"):
        optim.warmup_cosine(base_lr=1, total_steps=1, warmup_steps=0, kind="linear")
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'.*sgd"):
        optim.build(optim_config(name="lamb"), params, total_steps=10, steps_per_epoch=5)


def test_per_group_learning_rates_by_regex():
    params = {
        "prompter": {"mask_generator": {"kernel": jnp.ones((2, 2))}, "pad": jnp.ones((2, 2))},
        "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
    }
    config = optim_config(
        lr=40.0,
        momentum=0.0,
        lr_by_path=(("prompter/mask_generator/.*", 1.0), ("head/.*", 0.5)),
        schedule="constant",
    )
    tx, schedules = optim.build(config, params, total_steps=10, steps_per_epoch=5)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["prompter"]["mask_generator"]["kernel"], -1.0)
    np.testing.assert_allclose(updates["prompter"]["pad"], -40.0)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["head"]["bias"], -0.5)
    assert sorted(schedules) == ["default", "head/.*", "prompter/mask_generator/.*"]


def test_sgd_weight_decay_is_coupled_and_skips_biases():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    config = optim_config(lr=0.1, momentum=0.0, weight_decay=0.5, schedule="constant")
    tx, _ = optim.build(config, params, total_steps=10, steps_per_epoch=5)
    grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    updates, _ = tx.update(grads, tx.init(params), params)
    # kernel: -lr * (g + wd * w) = -0.1 * (1 + 1) ; bias: -lr * g
    np.testing.assert_allclose(updates["kernel"], -0.2, rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1, rtol=1e-6)


def test_gradient_clipping():
    params = {"kernel": jnp.zeros((2, 2))}
    config = optim_config(lr=1.0, momentum=0.0, grad_clip_norm=1.0, schedule="constant")
    tx, _ = optim.build(config, params, total_steps=10, steps_per_epoch=5)
    grads = {"kernel": jnp.full((2, 2), 10.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_warmup_epochs_add_to_warmup_steps():
    params = {"kernel": jnp.zeros((2, 2))}
    config = optim_config(lr=1.0, warmup_steps=5, warmup_epochs=1.0)
    _, schedules = optim.build(config, params, total_steps=100, steps_per_epoch=10)
    # Warmup of 5 + 10 steps: halfway at step 7.5, full at 15.
    assert float(schedules["default"](15)) == pytest.approx(1.0)
    assert float(schedules["default"](6)) == pytest.approx(6 / 15)
