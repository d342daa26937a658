r"""Gumbel-softmax sampling of discrete choices, as pure functions of ``(rng, logits, tau)``.

The Gumbel-max trick: with ``g_i = -log(-log(u_i))``, ``u_i ~ U(0, 1)`` i.i.d., the index
``argmax_i (logits_i + g_i)`` is distributed exactly as ``Categorical(softmax(logits))``. The
argmax has no useful gradient, so the Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017)
relaxes it to

    y = softmax((logits + g) / tau),

a point of the probability simplex that tends to the one-hot ``argmax`` sample as the temperature
``tau -> 0`` and to the uniform vector as ``tau -> inf``. ``hard=True`` is the straight-through
estimator: the forward value is the exact one-hot vector of ``argmax y`` (the same choice as the
Gumbel-max sample), while the gradient is that of the soft ``y``:

    y_hard = one_hot(argmax y) + (y - stop_gradient(y)).

The bracket is exactly zero in the forward pass, so the sample is exactly one-hot, not merely
close to it. At evaluation a method takes the most likely choice, ``argmax_one_hot(logits)``,
with no noise. AdaViPro anneals the temperature per epoch: ``temperature(epoch)``.
"""

import jax
import jax.numpy as jnp


def gumbel_softmax(
    rng: jax.Array, logits: jax.Array, temperature, *, hard: bool, axis: int = -1
) -> jax.Array:
    """A Gumbel-softmax sample over ``axis`` of ``logits`` (any batch shape).

    ``temperature`` may be a Python float or a traced scalar. ``hard=False``: the relaxed sample
    ``softmax((logits + g) / temperature)``, entries in (0, 1) summing to 1. ``hard=True``: the
    one-hot of its argmax forward, the relaxed sample's gradient backward (straight-through).
    The same ``rng`` always gives the same sample.
    """
    logits = jnp.asarray(logits)
    dtype = logits.dtype if jnp.issubdtype(logits.dtype, jnp.floating) else jnp.float32
    noise = jax.random.gumbel(rng, logits.shape, dtype)
    soft = jax.nn.softmax((logits.astype(dtype) + noise) / temperature, axis=axis)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(
        jnp.argmax(soft, axis=axis), soft.shape[axis], dtype=soft.dtype, axis=axis
    )
    # Forward: one_hot + 0 exactly. Backward: d(soft).
    return one_hot + (soft - jax.lax.stop_gradient(soft))


def temperature(epoch, tau0: float = 5.0, decay: float = 0.98) -> jax.Array:
    """The annealed temperature ``tau0 * decay ** epoch`` (AdaViPro: 5 and 0.98).

    ``epoch`` may be a Python number or a traced integer/float array (the 0-based epoch inside a
    jitted step); the result is a float32 array.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    return jnp.float32(tau0) * jnp.power(jnp.float32(decay), epoch)


def argmax_one_hot(logits: jax.Array, axis: int = -1) -> jax.Array:
    """The deterministic choice for evaluation: one-hot of ``argmax`` over ``axis`` (ties go to
    the first index)."""
    logits = jnp.asarray(logits)
    dtype = logits.dtype if jnp.issubdtype(logits.dtype, jnp.floating) else jnp.float32
    return jax.nn.one_hot(jnp.argmax(logits, axis=axis), logits.shape[axis], dtype=dtype, axis=axis)
