"""The contract every method follows, and what the trainer relies on.

A method splits the backbone's parameters into a trainable tree and a frozen tree and maps
``(trained, frozen, images)`` to logits:

    trained, frozen = method.init(rng, backbone_params)        # or from_arrays(...)
    logits, aux = method.apply(trained, frozen, images, rng=rng, train=True, epoch=epoch)
    logits, aux = method.apply(trained, frozen, images)        # evaluation

``trained`` is ``{"params": ...}`` plus, for methods with BatchNorm, ``{"batch_stats": ...}``.
Only ``trained["params"]`` is differentiated and optimised; ``frozen`` is passed to the jitted
step as its own argument and never differentiated, so no weight gradient of the backbone is ever
computed. ``aux["features"]`` is the pooled feature the head saw, beside the backbone's other
intermediates; ``aux`` may hold ``"mutable"``: updated non-parameter collections (BatchNorm
statistics) that the trainer writes back into ``trained``. Randomness comes only from ``rng``,
which may be left out where nothing is random (a method that needs it says so). ``epoch`` (a
scalar array, the 0-based epoch of the current step while training, 0 at evaluation) lets
methods follow per-epoch schedules such as AdaViPro's Gumbel temperature.

Heads: every method ends in the same head, chosen when the method is built. By default a linear
head (initialised by ``head_init``) trains next to the method, in ``trained["params"]["head"]``;
given ``zeroshot`` (a CLIP text classifier) the head is frozen instead, in
``frozen["zeroshot_head"]``, as in the VP and PGN papers' CLIP setting. Given ``label_mapping``
(``jprompt.methods.label_mapping``), the backbone checkpoint's own classifier
(``Backbone.source_head``) is the frozen ``frozen["source_head"]`` and its logits are mapped onto
the target classes: by ``frozen["label_mapping"]["index"]``, or by a trained
``trained["params"]["label_mapping"]`` layer (``fully_connected``).

What the trainer may use besides ``init`` and ``apply`` is declared here (``caches_features``,
``has_pictures``, ``has_token_weights``, ``init_images``), so that it never asks for a method's
class.
"""

import abc
import dataclasses
import difflib
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import traverse_util

from jprompt.methods import heads
from jprompt.methods.label_mapping import LabelMapping
from jprompt.models.backbone import Backbone


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
    """Base class: holds the backbone and the number of classes; subclasses add their options."""

    backbone: Backbone
    num_classes: int
    head_init: str = "zeros"
    zeroshot: heads.ZeroShotHead | None = None
    label_mapping: LabelMapping | None = None

    # ``visualize(trained, frozen, images, *, rng) -> {name: images}`` draws what the method does
    # to its inputs.
    has_pictures: ClassVar[bool] = False
    # ``token_weights(trained, images) -> (B, K, N)``: how each image mixes a token library.
    has_token_weights: ClassVar[bool] = False

    @property
    def caches_features(self) -> bool:
        """Whether the trainer computes each image's ``features(frozen, images)`` once and trains
        ``on_features()`` on them (the linear probe's feature cache) instead of ``apply``."""
        return False

    @property
    def init_images(self) -> int | None:
        """How many training images ``init_from_images`` needs after ``init`` (0: as many as the
        training split has), or None when ``init`` alone initialises the method."""
        return None

    def init_from_images(self, trained: dict, frozen: dict, images, rng: jax.Array) -> dict:
        """``trained`` after a data-dependent initialisation on ``images`` (B, H, W, 3),
        preprocessed as for training; the trainer calls it when ``init_images`` is not None."""
        del frozen, images, rng
        return trained

    def init_head(self, rng: jax.Array) -> tuple[dict, dict]:
        """``(trainable, frozen)`` entries for the head, to merge into the method's trees."""
        if self.label_mapping is not None:
            return self._init_label_mapping(rng)
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

    def _init_label_mapping(self, rng: jax.Array) -> tuple[dict, dict]:
        if self.zeroshot is not None:
            raise ValueError("a method takes a zero-shot head or a label mapping, not both")
        source = self.backbone.source_head
        if source is None:
            raise ValueError(
                f"the {self.label_mapping.name!r} label mapping needs the source head of "
                f"{self.backbone.name}'s checkpoint: build the backbone with source_head=True"
            )
        return self.label_mapping.variables(rng, source, self.num_classes)

    def head_logits(self, params: dict, frozen: dict, features: jax.Array) -> jax.Array:
        return heads.head_logits(params, frozen, features)

    @abc.abstractmethod
    def init(self, rng: jax.Array, backbone_params: dict) -> tuple[dict, dict]:
        """Returns ``(trained, frozen)``, the trainable arrays drawn from ``rng``."""

    def from_arrays(
        self,
        backbone_params: dict,
        params: dict,
        *,
        batch_stats: dict | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[dict, dict]:
        """``(trained, frozen)`` as ``init`` returns them, holding the given arrays.

        ``params`` is laid out as ``trained["params"]`` (``batch_stats`` as
        ``trained["batch_stats"]``), e.g. ``{"prompter": {"tokens": t}}`` for VPT or
        ``{"library": L}`` for PGN. Arrays left out are drawn from ``rng`` as ``init`` draws
        them; without ``rng`` every trainable array must be given. A path ``init`` does not
        create, or another shape, fails naming it.
        """
        trained, frozen = self.init(jax.random.PRNGKey(0) if rng is None else rng, backbone_params)
        given = {"params": params}
        if batch_stats is not None:
            given["batch_stats"] = batch_stats
        drawn = traverse_util.flatten_dict(trained, sep="/")
        new = traverse_util.flatten_dict(given, sep="/")
        problems = []
        for path, value in new.items():
            if path not in drawn:
                close = difflib.get_close_matches(path, list(drawn), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{path!r} is not an array of this method{hint}")
            elif jnp.shape(value) != drawn[path].shape:
                problems.append(
                    f"{path!r} has shape {jnp.shape(value)}, expected {drawn[path].shape}"
                )
        missing = sorted(set(drawn) - set(new)) if rng is None else []
        if missing:
            problems.append(f"no rng= to draw the arrays not given: {missing}")
        if problems:
            raise ValueError(f"{type(self).__name__}.from_arrays: " + "; ".join(problems))
        drawn.update({path: jnp.asarray(v, drawn[path].dtype) for path, v in new.items()})
        return traverse_util.unflatten_dict(drawn, sep="/"), frozen

    @abc.abstractmethod
    def apply(
        self,
        trained: dict,
        frozen: dict,
        images: jax.Array,
        *,
        rng: jax.Array | None = None,
        train: bool = False,
        epoch: jax.Array | int = 0,
    ) -> tuple[jax.Array, dict]:
        """Returns ``(logits, aux)``."""
