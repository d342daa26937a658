"""Linear probe: a linear classifier on the frozen backbone's pooled features.

With ``cache_features`` the trainer computes each image's features once and trains the head on
them (``caches_features``; ``jprompt.train.feature_cache``): its steps run ``on_features()``,
this probe without the backbone, whose input is those features.

With a zero-shot head (CLIP) nothing trains: ``ZeroShot`` is that case under its own name, so a
run's results say what was measured (the untuned zero-shot accuracy).
"""

import dataclasses

import jax

from jprompt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class LinearProbe(Method):
    """``cache_features``: train from features computed once per image (no augmentation)
    instead of running the backbone at every step."""

    cache_features: bool = False

    @property
    def caches_features(self) -> bool:
        return self.cache_features

    def init(self, rng, backbone_params):
        head, head_frozen = self.init_head(rng)
        return {"params": head}, {"backbone": backbone_params, **head_frozen}

    def features(self, frozen, images) -> tuple[jax.Array, dict]:
        """The frozen backbone's features ``(B, feature_dim)``, all the head sees, and its
        intermediates."""
        features, out = self.backbone.features(frozen["backbone"], images)
        # Nothing upstream of the head needs a gradient; make that explicit for XLA.
        return jax.lax.stop_gradient(features), out

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        del rng, train, epoch  # The backbone runs in inference mode; the head is deterministic.
        features, out = self.features(frozen, images)
        return self.head_logits(trained["params"], frozen, features), out

    def on_features(self) -> "ProbeHead":
        """This probe's head alone, applied to features ``features()`` computed beforehand."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ProbeHead(**fields)


@dataclasses.dataclass(frozen=True)
class ProbeHead(LinearProbe):
    """A linear probe whose input is the backbone's features ``(B, feature_dim)`` instead of
    images. Its trees are the probe's, so the two share checkpoints."""

    def apply(self, trained, frozen, features, *, rng=None, train=False, epoch=0):
        del rng, train, epoch
        return self.head_logits(trained["params"], frozen, features), {}


@dataclasses.dataclass(frozen=True)
class ZeroShot(LinearProbe):
    """The frozen backbone and its zero-shot text head, untouched: nothing to train."""

    def __post_init__(self):
        if self.zeroshot is None:
            raise ValueError(
                "the zeroshot method needs a zero-shot head: set config.head.name='zeroshot' "
                "and a CLIP backbone"
            )
