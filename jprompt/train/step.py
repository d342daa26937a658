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
from jprompt.train.metrics import Training


def make_train_step(
    method: Method, tx: optax.GradientTransformation, steps_per_epoch: int
) -> Callable:
    """``(state, frozen, batch, rng) -> (state, metrics)``; gradients only for trained params.

    A batch with a ``"mask"`` (``drop_last=False``: the last batch of an epoch padded to full
    size) trains on its real examples only: the loss is their mean, as PyTorch's mean over the
    smaller batch, so loss and gradients equal those of a step on the real examples alone, and
    the metrics count only them.
    """

    def train_step(state, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        epoch = state["step"] // steps_per_epoch
        trained = state["trained"]
        mask = batch.get("mask")
        if mask is not None and "batch_stats" in trained:
            raise ValueError(
                "this method normalises each training batch with BatchNorm statistics "
                "(trained['batch_stats']), which the zero images padding a partial batch would "
                "change; train it with full batches only: config.input.drop_last=True"
            )

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
            if mask is None:
                return losses.mean(), (losses, logits, aux)
            # where, not a product: a padding row's non-finite loss must not reach the sum.
            real_sum = jnp.where(mask > 0, losses, 0.0).sum()
            return real_sum / mask.sum(), (losses, logits, aux)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (losses, logits, aux)), grads = grad_fn(trained["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], trained["params"])
        new_trained = {
            **trained,
            **aux.get("mutable", {}),
            "params": optax.apply_updates(trained["params"], updates),
        }
        metrics = Training.single_from_model_output(
            loss=losses,
            logits=logits,
            labels=batch["label"],
            images=batch["image"],
            mask=mask,
            step=state["step"] + 1,
        )
        new_state = {"step": state["step"] + 1, "trained": new_trained, "opt_state": opt_state}
        return new_state, metrics

    return train_step
