"""Masked evaluation over global arrays: every example of a split counted exactly once.

The input pipeline pads the last batch (and gives every process the same number of batches);
the per-example mask keeps padding out of every metric.
"""

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from jprompt.methods.base import Method
from jprompt.train import sharding
from jprompt.train.metrics import Classification


def make_eval_step(method: Method) -> Callable:
    """``(trained, frozen, batch, rng) -> Classification`` metrics of one batch."""

    def eval_step(trained, frozen, batch, rng):
        logits, _ = method.apply(trained, frozen, batch["image"], rng=rng, train=False)
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return Classification.single_from_model_output(
            loss=loss, logits=logits, labels=batch["label"], mask=batch["mask"]
        )

    return eval_step


def evaluate(
    eval_step: Callable,
    trained,
    frozen,
    batches: Iterable[dict],
    *,
    mesh,
    rng: jax.Array,
) -> dict[str, float]:
    """Run ``eval_step`` (jitted) over host-local ``batches``; return the merged metrics.

    ``rng`` feeds methods that are random at evaluation too (VP's random patch); each batch gets
    its own fold.
    """
    merged = None
    for index, local_batch in enumerate(batches):
        batch = sharding.to_global_batch(local_batch, mesh)
        update = eval_step(trained, frozen, batch, jax.random.fold_in(rng, index))
        merged = update if merged is None else merged.merge(update)
    if merged is None:
        raise ValueError("evaluation split produced no batches")
    return {name: float(value) for name, value in merged.compute().items()}
