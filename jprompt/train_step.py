"""One training step: ``make_train_step(method, tx, steps_per_epoch)``, the function the trainer
jits with its state donated.

Only the method's trainable tree gets gradients; the frozen backbone parameters are an argument
the step reads and never differentiates. This module needs no input pipeline, so benchmarks and
other JAX code can build the trainer's exact step where TensorFlow is not installed (accelerator
images often ship without it).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jprompt.methods.base import Method
from jprompt.metrics import Training


def make_train_step(
    method: Method, tx: optax.GradientTransformation, steps_per_epoch: int
) -> Callable:
    """``(state, frozen, batch, rng) -> (state, metrics)``; gradients only for trained params."""

    def train_step(state, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        epoch = state["step"] // steps_per_epoch
        trained = state["trained"]

        def loss_fn(params):
            logits, aux = method.apply(
                {**trained, "params": params},
                frozen,
                batch["image"],
                rng=rng,
                train=True,
                epoch=epoch,
            )
            logits = logits.astype(jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return losses.mean(), (logits, aux)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, aux)), grads = grad_fn(trained["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], trained["params"])
        new_trained = {
            **trained,
            **aux.get("mutable", {}),
            "params": optax.apply_updates(trained["params"], updates),
        }
        metrics = Training.single_from_model_output(
            loss=loss,
            logits=logits,
            labels=batch["label"],
            images=batch["image"],
            step=state["step"] + 1,
        )
        new_state = {"step": state["step"] + 1, "trained": new_trained, "opt_state": opt_state}
        return new_state, metrics

    return train_step
