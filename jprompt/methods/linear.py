"""Linear probe: a linear classifier on the frozen backbone's pre-logits features.

With a zero-shot head (CLIP) nothing trains: ``ZeroShot`` is that case under its own name, so a
run's results say what was measured (the untuned zero-shot accuracy).
"""

import dataclasses

import jax

from jprompt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class LinearProbe(Method):
    def init(self, rng, backbone_params):
        head, head_frozen = self.init_head(rng)
        return {"params": head}, {"backbone": backbone_params, **head_frozen}

    def apply(self, trained, frozen, images, *, rng, train, epoch=0):
        del rng, train, epoch  # The backbone runs in inference mode; the head is deterministic.
        features, out = self.backbone.features(frozen["backbone"], images)
        # Nothing upstream of the head needs a gradient; make that explicit for XLA.
        features = jax.lax.stop_gradient(features)
        return self.head_logits(trained["params"], frozen, features), out


@dataclasses.dataclass(frozen=True)
class ZeroShot(LinearProbe):
    """The frozen backbone and its zero-shot text head, untouched: nothing to train."""

    def __post_init__(self):
        if self.zeroshot is None:
            raise ValueError(
                "the zeroshot method needs a zero-shot head: set config.head.name='zeroshot' "
                "and a CLIP backbone"
            )
