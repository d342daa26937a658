"""Gumbel-softmax: simplex samples, exact straight-through one-hots, annealing, the right law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt.methods import gumbel

LOGITS = jnp.array([1.0, 0.0, -1.0, 2.0])


def batch_logits(n=256, k=5, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, k)) * 2


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_soft_samples_lie_on_the_simplex(tau):
    logits = batch_logits()
    y = np.asarray(gumbel.gumbel_softmax(jax.random.PRNGKey(1), logits, tau, hard=False))
    assert y.shape == (256, 5)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    assert (y >= 0).all() and (y <= 1).all()
    # Genuinely soft: not one-hot at tau >= 1.
    if tau >= 1:
        assert y.max(-1).min() < 0.9


def test_soft_sample_is_softmax_of_logits_plus_gumbel_noise_over_tau():
    rng, logits, tau = jax.random.PRNGKey(3), batch_logits(), 0.7
    noise = jax.random.gumbel(rng, logits.shape)
    expected = jax.nn.softmax((logits + noise) / tau, axis=-1)
    got = gumbel.gumbel_softmax(rng, logits, tau, hard=False)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_hard_sample_is_exactly_one_hot_with_the_soft_gradient():
    rng, logits, tau = jax.random.PRNGKey(2), batch_logits(), 0.5
    hard = np.asarray(gumbel.gumbel_softmax(rng, logits, tau, hard=True))
    soft = np.asarray(gumbel.gumbel_softmax(rng, logits, tau, hard=False))
    assert set(np.unique(hard)) == {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(-1), 1.0)  # exactly, not approximately
    np.testing.assert_array_equal(hard.argmax(-1), soft.argmax(-1))

    weights = jax.random.normal(jax.random.PRNGKey(4), logits.shape)

    def objective(hard_flag):
        return lambda z: jnp.sum(weights * gumbel.gumbel_softmax(rng, z, tau, hard=hard_flag))

    grad_hard = jax.grad(objective(True))(logits)
    grad_soft = jax.grad(objective(False))(logits)
    assert float(jnp.abs(grad_soft).max()) > 1e-3  # a real gradient, not zero
    np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-6, atol=1e-7)


def test_soft_sample_approaches_the_hard_one_as_temperature_falls():
    rng, logits = jax.random.PRNGKey(5), batch_logits(n=100, k=4)
    hard = gumbel.gumbel_softmax(rng, logits, 1.0, hard=True)  # the argmax is tau-independent
    gaps = []
    for tau in (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003):
        soft = gumbel.gumbel_softmax(rng, logits, tau, hard=False)
        gaps.append(float(jnp.abs(soft - hard).max()))
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[0] > 0.5 and gaps[-1] < 1e-3, gaps


def test_temperature_schedule():
    assert float(gumbel.temperature(0)) == 5.0
    assert float(gumbel.temperature(1)) == pytest.approx(4.9, rel=1e-6)
    assert float(gumbel.temperature(10)) == pytest.approx(5 * 0.98**10, rel=1e-6)
    assert float(gumbel.temperature(100)) == pytest.approx(5 * 0.98**100, rel=1e-5)
    assert float(gumbel.temperature(3, tau0=2.0, decay=0.9)) == pytest.approx(2 * 0.9**3, rel=1e-6)
    # Inside jit, from the int32 step counter's epoch.
    jitted = jax.jit(lambda step: gumbel.temperature(step // 4))
    assert float(jitted(jnp.int32(41))) == pytest.approx(5 * 0.98**10, rel=1e-6)
    assert gumbel.temperature(jnp.int32(2)).dtype == jnp.float32


def test_samples_are_deterministic_in_the_rng():
    logits = batch_logits()
    for hard in (True, False):
        a = gumbel.gumbel_softmax(jax.random.PRNGKey(7), logits, 1.0, hard=hard)
        b = gumbel.gumbel_softmax(jax.random.PRNGKey(7), logits, 1.0, hard=hard)
        c = gumbel.gumbel_softmax(jax.random.PRNGKey(8), logits, 1.0, hard=hard)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("tau", [0.5, 5.0])
def test_choice_frequencies_follow_softmax_of_the_logits(tau):
    # Gumbel-max: argmax(logits + g) ~ Categorical(softmax(logits)), whatever the temperature.
    n = 200_000
    logits = jnp.broadcast_to(LOGITS, (n, 4))
    hard = gumbel.gumbel_softmax(jax.random.PRNGKey(0), logits, tau, hard=True)
    frequencies = np.asarray(hard.mean(0))
    expected = np.asarray(jax.nn.softmax(LOGITS))
    # Standard error is at most 0.0012 at n=200k; the rng is fixed, so this cannot flake.
    np.testing.assert_allclose(frequencies, expected, atol=0.006)


def test_axis_argument():
    logits = batch_logits(n=3, k=6).T  # choices along axis 0
    rng = jax.random.PRNGKey(9)
    along_0 = gumbel.gumbel_softmax(rng, logits, 1.0, hard=True, axis=0)
    np.testing.assert_array_equal(along_0.sum(0), 1.0)
    soft = gumbel.gumbel_softmax(rng, logits, 1.0, hard=False, axis=0)
    np.testing.assert_allclose(soft.sum(0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(jnp.argmax(along_0, 0), jnp.argmax(soft, 0))


def test_argmax_one_hot_for_evaluation():
    logits = jnp.array([[0.1, 3.0, -1.0], [2.0, 2.0, 0.0], [-5.0, -6.0, -4.0]])
    expected = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)  # ties: the first
    np.testing.assert_array_equal(gumbel.argmax_one_hot(logits), expected)
    np.testing.assert_array_equal(gumbel.argmax_one_hot(logits.T, axis=0), expected.T)
    assert gumbel.argmax_one_hot(logits).dtype == jnp.float32
