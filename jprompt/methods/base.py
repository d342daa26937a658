"""The contract every method follows, and what the trainer relies on.

A method splits the backbone's parameters into a trainable tree and a frozen tree and maps
``(trained, frozen, images)`` to logits:

    trained, frozen = method.init(rng, backbone_params)
    logits, aux = method.apply(trained, frozen, images, rng=rng, train=True, epoch=epoch)

``trained`` is ``{"params": ...}`` plus, for methods with BatchNorm, ``{"batch_stats": ...}``.
Only ``trained["params"]`` is differentiated and optimised; ``frozen`` is passed to the jitted
step as its own argument and never differentiated, so no weight gradient of the backbone is ever
computed. ``aux`` may hold ``"mutable"``: updated non-parameter collections (BatchNorm
statistics) that the trainer writes back into ``trained``. Randomness comes only from ``rng``.
``epoch`` (a scalar array, the 0-based epoch of the current step while training, 0 at
evaluation) lets methods follow per-epoch schedules such as AdaViPro's Gumbel temperature.
"""

import abc
import dataclasses

import jax

from jprompt.models.backbones import Backbone


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
    """Base class: holds the backbone and the number of classes; subclasses add their options."""

    backbone: Backbone
    num_classes: int

    @abc.abstractmethod
    def init(self, rng: jax.Array, backbone_params: dict) -> tuple[dict, dict]:
        """Returns ``(trained, frozen)``."""

    @abc.abstractmethod
    def apply(
        self,
        trained: dict,
        frozen: dict,
        images: jax.Array,
        *,
        rng: jax.Array,
        train: bool,
        epoch: jax.Array | int = 0,
    ) -> tuple[jax.Array, dict]:
        """Returns ``(logits, aux)``."""
