"""Learning-rate schedules, parameter groups and weight decay of jprompt.train.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jprompt.train import config_lib, optim


def optim_config(**overrides):
    config = config_lib.base_config(
        backbone="vit_tiny4", dataset="jprompt_shapes/colors", demo=True
    )
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
    with pytest.raises(ValueError, match=r"^unknown optim.name 'lamb'; valid choices: \('sgd'"):
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


def test_warmup_rules_restate_the_official_vp_and_pgn_schedules():
    # VP (hjbahng/visual_prompting utils.cosine_lr): step s < W gets base * (s + 1) / W, then
    # 0.5 * (1 + cos(pi * (s - W) / (S - W))) * base.
    base, warmup, total = 40.0, 10, 50
    vp = optim.warmup_cosine(base_lr=base, total_steps=total, warmup_steps=warmup, warmup_rule="vp")
    for s in range(total):
        if s < warmup:
            expected = base * (s + 1) / warmup
        else:
            expected = 0.5 * (1 + np.cos(np.pi * (s - warmup) / (total - warmup))) * base
        assert float(vp(s)) == pytest.approx(expected, rel=1e-5, abs=1e-5), s
    # PGN (jochemloedeman/PGN CosineWithWarmup, stepped per epoch, eta_min = lr / 100): epoch 0
    # and 1 at lr / W, epoch e < W at e * lr / W, epoch W at lr, then cosine to lr / 100.
    lr, warmup_epochs, epochs, per_epoch = 0.1, 50, 100, 3
    pgn = optim.warmup_cosine(
        base_lr=lr,
        total_steps=epochs * per_epoch,
        warmup_steps=warmup_epochs * per_epoch,
        end_lr_factor=0.01,
        steps_per_epoch=per_epoch,
        warmup_rule="pgn",
    )
    eta = lr / 100
    for e in range(epochs):
        if e < warmup_epochs:
            expected = max(e, 1) * lr / warmup_epochs
        else:
            progress = (e - warmup_epochs) / (epochs - warmup_epochs)
            expected = eta + (lr - eta) * (1 + np.cos(np.pi * progress)) / 2
        for step in (e * per_epoch, e * per_epoch + per_epoch - 1):
            assert float(pgn(step)) == pytest.approx(expected, rel=1e-5), (e, step)
    with pytest.raises(ValueError, match="unknown warmup_rule 'late'.*from_zero"):
        optim.warmup_cosine(base_lr=1, total_steps=1, warmup_steps=0, warmup_rule="late")
