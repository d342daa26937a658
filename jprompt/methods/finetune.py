"""Full fine-tuning: every backbone parameter and a new head train; nothing is frozen."""

import dataclasses

from jprompt.methods import heads
from jprompt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class FineTune(Method):
    head_init: str = "zeros"

    def init(self, rng, backbone_params):
        head = heads.init_linear_head(
            rng, self.backbone.feature_dim, self.num_classes, self.head_init
        )
        return {"params": {"backbone": backbone_params, "head": head}}, {}

    def apply(self, trained, frozen, images, *, rng, train, epoch=0):
        del frozen, epoch
        params = trained["params"]
        features, out = self.backbone.features(params["backbone"], images, rng=rng, train=train)
        return heads.apply_linear_head(params["head"], features), out
