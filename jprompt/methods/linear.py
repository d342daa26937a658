"""Linear probe: a linear classifier on the frozen backbone's pre-logits features."""

import dataclasses

import jax

from jprompt.methods import heads
from jprompt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class LinearProbe(Method):
    head_init: str = "zeros"

    def init(self, rng, backbone_params):
        head = heads.init_linear_head(
            rng, self.backbone.feature_dim, self.num_classes, self.head_init
        )
        return {"params": {"head": head}}, {"backbone": backbone_params}

    def apply(self, trained, frozen, images, *, rng, train, epoch=0):
        del rng, train, epoch  # The backbone runs in inference mode; the head is deterministic.
        features, out = self.backbone.features(frozen["backbone"], images)
        # Nothing upstream of the head needs a gradient; make that explicit for XLA.
        features = jax.lax.stop_gradient(features)
        return heads.apply_linear_head(trained["params"]["head"], features), out
