"""VFPT: the Fourier transform against the DFT by hand, which tokens it transforms and where they
go, VPT's parameters unchanged, gradients, bad options and the config."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_vpt import (
    LOGITS_TOL,
    abstract_params,
    count,
    images,
    load_config,
    make_backbone,
    pretrained,
)

from jprompt import methods
from jprompt.methods import heads, vfpt
from jprompt.train import trainer

P = 4  # prompt tokens, as in test_vpt (shared shapes compile once)


def build(backbone, name="vfpt", **options):
    return methods.build(name, backbone=backbone, num_classes=5, **options)


def dft_real(x, axes):
    """Re(DFT) over ``axes`` of a numpy array, as the sums of the definition."""
    out = x.astype(np.complex128)
    for axis in axes:
        n = x.shape[axis]
        k = np.arange(n)
        matrix = np.exp(-2j * np.pi * np.outer(k, k) / n)  # X_k = sum_j x_j e^(-2 pi i jk/n)
        out = np.moveaxis(np.tensordot(matrix, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out.real


def test_fourier_prompts_is_the_real_part_of_the_2d_dft():
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)  # (B, m, D)
    for name, axes in vfpt.FOURIER_AXES.items():
        got = np.asarray(vfpt.fourier_prompts(jnp.asarray(x), axes))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, dft_real(x, axes), rtol=1e-5, atol=1e-5, err_msg=name)
    # The official torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real, in numpy.
    official = np.fft.fft(np.fft.fft(x, axis=-1), axis=-2).real
    np.testing.assert_allclose(vfpt.fourier_prompts(jnp.asarray(x)), official, atol=1e-5)
    # Known values: the 2D DFT of a (2, 3) block of ones is 6 at frequency (0, 0), 0 elsewhere;
    # of a unit impulse at (0, 0), all ones.
    expected = np.zeros((2, 3))
    expected[0, 0] = 6
    np.testing.assert_allclose(vfpt.fourier_prompts(jnp.ones((2, 3))), expected, atol=1e-6)
    impulse = jnp.zeros((2, 3)).at[0, 0].set(1.0)
    np.testing.assert_allclose(vfpt.fourier_prompts(impulse), np.ones((2, 3)), atol=1e-6)


def test_the_first_floor_p_times_fraction_tokens_are_transformed_shallow():
    backbone, params = pretrained()
    method = build(backbone, num_tokens=P, fourier_fraction=0.6)  # floor(4 * 0.6) = 2
    assert method.num_fourier == 2
    trained, frozen = method.init(jax.random.PRNGKey(2), params)
    tokens = np.asarray(trained["params"]["prompter"]["tokens"])
    x = images()
    logits = jax.jit(lambda t, x: method.apply(t, frozen, x)[0])(trained, x)
    # What must enter right after the CLS token, as VPT's tokens do: the Fourier pair first.
    expected = np.concatenate([dft_real(tokens[:2], (0, 1)), tokens[2:]]).astype(np.float32)

    @jax.jit
    def by_hand(prompt_tokens):
        pooled, _ = backbone.module.apply({"params": params}, x, prompt_tokens=prompt_tokens)
        return heads.apply_linear_head(trained["params"]["head"], pooled)

    np.testing.assert_allclose(logits, by_hand(np.tile(expected, (4, 1, 1))), **LOGITS_TOL)
    # Not VPT's: the transform changes the output.
    assert np.abs(logits - by_hand(np.tile(tokens, (4, 1, 1)))).max() > 1e-3


def test_deep_each_layers_set_is_transformed_after_projection_and_dropout():
    backbone = make_backbone()
    options = dict(num_tokens=P, deep=True, project_dim=16, dropout=0.5)
    method = build(backbone, fourier_fraction=1.0, **options)
    plain = build(backbone, "vpt", **options)
    trained, _ = method.init(jax.random.PRNGKey(2), {})
    # The same parameters as VPT's for the same rng.
    jax.tree.map(np.testing.assert_array_equal, trained, plain.init(jax.random.PRNGKey(2), {})[0])
    prompter = trained["params"]["prompter"]
    rng = jax.random.PRNGKey(4)
    for train in (False, True):
        got = np.asarray(method.prompts(prompter, 3, rng=rng, train=train))
        vpt_prompts = np.asarray(plain.prompts(prompter, 3, rng=rng, train=train))
        assert got.shape == (2, 3, P, 64)  # (layers, B, p, D)
        if train:  # the dropout mask (the same for the same rng) acts before the FFT
            assert (vpt_prompts == 0).mean() > 0.3
        for layer in range(2):
            for b in range(3):
                expected = dft_real(vpt_prompts[layer, b], (0, 1))
                np.testing.assert_allclose(got[layer, b], expected, rtol=1e-4, atol=1e-4)


def test_fraction_zero_is_vpt_and_parameter_counts_equal_vpts():
    backbone = make_backbone()
    prompter = {"tokens": jax.random.normal(jax.random.PRNGKey(0), (2, P, 64))}
    method = build(backbone, num_tokens=P, deep=True, fourier_fraction=0.0)
    vpt_method = build(backbone, "vpt", num_tokens=P, deep=True)
    np.testing.assert_array_equal(
        method.prompts(prompter, 3, rng=None, train=False),
        vpt_method.prompts(prompter, 3, rng=None, train=False),
    )
    big = make_backbone("vit_b16", 224)
    backbone_params = abstract_params(big)
    for deep, project_dim in ((False, -1), (True, -1), (True, 64)):
        counts = []
        for name in ("vpt", "vfpt"):
            method = build(big, name, num_tokens=10, deep=deep, project_dim=project_dim)
            trained, _ = jax.eval_shape(method.init, jax.random.PRNGKey(0), backbone_params)
            counts.append(count(trained))
        assert counts[0] == counts[1]
    assert counts[1] == 12 * 10 * 64 + 64 * 768 + 768 + 768 * 5 + 5


def test_gradient_reaches_every_prompt_token_and_the_head_only():
    backbone, params = pretrained()
    method = build(backbone, num_tokens=P, deep=True, fourier_fraction=0.5)
    trained, frozen = method.init(jax.random.PRNGKey(2), params)
    x, labels = images(), jnp.array([0, 1, 2, 3])

    def loss(p):
        logits, _ = method.apply({"params": p}, frozen, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(loss))(trained["params"])
    assert set(grads) == {"prompter", "head"} and set(grads["prompter"]) == {"tokens"}
    tokens_grad = np.asarray(grads["prompter"]["tokens"])
    assert tokens_grad.shape == (2, P, 64)
    # Fourier tokens (0, 1) and plain ones (2, 3) all learn, in every layer's set.
    assert (np.abs(tokens_grad).max(axis=-1) > 0).all()
    assert np.abs(np.asarray(grads["head"]["kernel"])).max() > 0


def test_bad_options_fail_clearly():
    backbone = make_backbone()
    with pytest.raises(ValueError, match=r"fourier_fraction must be in \[0, 1\], got 1.5"):
        build(backbone, fourier_fraction=1.5)
    with pytest.raises(ValueError, match="unknown fourier_dims 'time'"):
        build(backbone, fourier_dims="time")
    with pytest.raises(ValueError, match="is 0 Fourier tokens: use at least 0.1, or 0"):
        build(backbone, num_tokens=10, fourier_fraction=0.05)


def test_recipe_of_the_config():
    config = load_config_vfpt("deep,fourier=1.0,dataset=vtab/dtd")
    assert config.method.name == "vfpt" and config.method.deep
    assert (config.method.fourier_fraction, config.method.fourier_dims) == (1.0, "all")
    assert config.method.dropout == 0.1 and config.method.head_init == "vpt"
    assert config.batch_size == 64 and config.optim.lr == pytest.approx(0.25 * 64 / 256)
    assert (config.optim.weight_decay, config.num_epochs, config.optim.warmup_epochs) == (
        1e-4,
        100,
        10,
    )
    assert config.input.drop_last is False and config.protocol == ""  # VPT's data, no card
    demo, vpt_demo = load_config_vfpt("demo"), load_config("demo")
    assert demo.method.fourier_fraction == 0.5
    for field in ("batch_size", "num_epochs", "optim", "input", "backbone"):
        assert demo[field] == vpt_demo[field], field


def load_config_vfpt(arg):
    return helpers.load_config("vfpt.py", arg)


def test_training_steps_keep_the_backbone_bit_identical(shapes_data_dir):
    config = helpers.shrink(load_config_vfpt("demo,deep"), shapes_data_dir)
    experiment = trainer.create_experiment(config)
    trained_before, state = helpers.train_with_frozen_backbone(experiment, 3)
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), b), state["trained"], trained_before
    )
    assert all(jax.tree.leaves(moved))
    assert state["trained"]["params"]["prompter"]["tokens"].shape == (2, 10, 64)
