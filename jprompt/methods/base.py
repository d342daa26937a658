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

Heads: every method ends in the same head, chosen when the method is built. By default a linear
head (initialised by ``head_init``) trains next to the method, in ``trained["params"]["head"]``;
given ``zeroshot`` (a CLIP text classifier) the head is frozen instead, in
``frozen["zeroshot_head"]``, as in the VP and PGN papers' CLIP setting.
"""

import abc
import dataclasses

import jax

from jprompt.methods import heads
from jprompt.models.backbones import Backbone


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
    """Base class: holds the backbone and the number of classes; subclasses add their options."""

    backbone: Backbone
    num_classes: int
    head_init: str = "zeros"
    zeroshot: heads.ZeroShotHead | None = None

    def init_head(self, rng: jax.Array) -> tuple[dict, dict]:
        """``(trainable, frozen)`` entries for the head, to merge into the method's trees."""
        if self.zeroshot is None:
            head = heads.init_linear_head(
                rng, self.backbone.feature_dim, self.num_classes, self.head_init
            )
            return {"head": head}, {}
        if self.zeroshot.num_classes != self.num_classes:
            raise ValueError(
                f"the zero-shot head has {self.zeroshot.num_classes} classes but the dataset "
                f"has {self.num_classes}"
            )
        return {}, {"zeroshot_head": self.zeroshot.variables()}

    def head_logits(self, params: dict, frozen: dict, features: jax.Array) -> jax.Array:
        return heads.head_logits(params, frozen, features)

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
