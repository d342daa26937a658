"""Classification metrics as ``clu.metrics`` collections, computed inside jit.

Every metric takes an optional per-example ``mask`` so that padded batches (evaluation, and
training with ``drop_last=False``) count only their real examples; ``num_examples`` makes that
count visible in the results.
"""

import flax
import jax.numpy as jnp
from clu import metrics


@flax.struct.dataclass
class TopFiveAccuracy(metrics.Average):
    """Fraction of examples whose label is among the five largest logits (all, if fewer)."""

    @classmethod
    def from_model_output(cls, *, logits, labels, **kwargs):
        k = min(5, logits.shape[-1])
        label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
        # Rank = number of classes scoring strictly higher than the label.
        rank = (logits > label_logit).sum(axis=-1)
        metric = super().from_model_output(values=(rank < k).astype(jnp.float32), **kwargs)
        return cls(**vars(metric))


@flax.struct.dataclass
class NumExamples(metrics.Metric):
    """How many (unmasked) examples were seen."""

    count: jnp.ndarray

    @classmethod
    def from_model_output(cls, *, labels, mask=None, **_):
        if mask is None:
            return cls(count=jnp.asarray(labels.shape[0], jnp.int32))
        return cls(count=mask.astype(jnp.int32).sum())

    @classmethod
    def empty(cls):
        return cls(count=jnp.array(0, jnp.int32))

    def merge(self, other):
        return type(self)(count=self.count + other.count)

    def compute(self):
        return self.count


@flax.struct.dataclass
class Classification(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    top5_accuracy: TopFiveAccuracy
    num_examples: NumExamples


NO_STEP = jnp.iinfo(jnp.int32).max  # FirstNonFiniteStep's value while every step was finite


def first_nonfinite_step(output: str) -> type[metrics.Metric]:
    """A metric holding the first ``step`` at which model output ``output`` held a NaN or Inf
    (``NO_STEP`` if none): the training loop reports exactly where things went wrong, however
    many steps it merges between its checks. ``output`` is per example; masked examples are
    padding and not looked at."""

    @flax.struct.dataclass
    class FirstNonFiniteStep(metrics.Metric):
        step: jnp.ndarray

        @classmethod
        def from_model_output(cls, *, step, mask=None, **model_output):
            finite = jnp.isfinite(model_output[output])
            if mask is not None:
                finite = finite | (mask == 0).reshape(mask.shape + (1,) * (finite.ndim - 1))
            return cls(step=jnp.where(finite.all(), NO_STEP, step).astype(jnp.int32))

        @classmethod
        def empty(cls):
            return cls(step=jnp.array(NO_STEP, jnp.int32))

        def merge(self, other):
            return type(self)(step=jnp.minimum(self.step, other.step))

        def compute(self):
            return self.step

    return FirstNonFiniteStep


@flax.struct.dataclass
class Training(metrics.Collection):
    """``Classification``'s metrics of training steps (``loss`` of each example, so a window's
    mean weighs a partial batch by its size), and the first step with non-finite values.

    (Written out: clu collections take their fields from the class's own annotations.)
    """

    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    top5_accuracy: TopFiveAccuracy
    num_examples: NumExamples
    first_nonfinite_input_step: first_nonfinite_step("images")
    first_nonfinite_loss_step: first_nonfinite_step("loss")
