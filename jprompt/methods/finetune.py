"""Full fine-tuning: every backbone parameter and the head train (a zero-shot head stays fixed)."""

import dataclasses

from jprompt.methods.base import Method


@dataclasses.dataclass(frozen=True)
class FineTune(Method):
    def init(self, rng, backbone_params):
        head, head_frozen = self.init_head(rng)
        return {"params": {"backbone": backbone_params, **head}}, head_frozen

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        del epoch
        params = trained["params"]
        features, out = self.backbone.features(params["backbone"], images, rng=rng, train=train)
        return self.head_logits(params, frozen, features), out
