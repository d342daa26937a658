"""Backbones by name: the module, its parameters, and the input space it expects.

A ``Backbone`` pairs a Linen module built without a classification head with the facts the rest
of the system needs: the image size it runs at, the pixel normalization its checkpoints were
trained with (which the input pipeline applies) and the width of its features.
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict

from jprompt.models import vit, vit_checkpoint

NAMES = vit.NAMES

# vit_jax and big_vision checkpoints expect pixels in [-1, 1].
VIT_NORMALIZATION = "minus_one_to_one"


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    module: vit.VisionTransformer
    image_size: int
    normalization: str

    @property
    def feature_dim(self) -> int:
        return self.module.representation_size or self.module.hidden_size

    def features(self, params, images, *, rng=None, train=False, **prompts):
        """Pooled pre-logits features ``(B, feature_dim)`` and the dict of intermediates.

        ``prompts`` are passed to the module (``prompt_tokens=``, ``deep_prompts=``,
        ``prompt_position=``). ``train`` switches the backbone's own dropout on, for fine-tuning.
        """
        rngs = {"dropout": rng} if train and rng is not None else {}
        _, out = self.module.apply({"params": params}, images, train=train, rngs=rngs, **prompts)
        return out["pre_logits"], out


def build(config: ConfigDict, *, image_size: int, rng: jax.Array) -> tuple[Backbone, dict]:
    """The backbone named by ``config.name`` and its parameters.

    ``config.checkpoint``: an ``.npz`` in vit_jax or big_vision naming (local or ``gs://``); the
    position embedding is resampled to ``image_size`` and any head is dropped. Empty: random
    initialisation from ``rng`` (for tests and from-scratch training).
    """
    if config.name not in NAMES:
        raise ValueError(f"unknown backbone {config.name!r}; valid choices: {list(NAMES)}")
    module = vit.create(
        config.name,
        num_classes=0,
        pool=config.pool,
        dropout_rate=config.dropout_rate,
        representation_size=config.representation_size or None,
    )
    if image_size % module.patch_size:
        raise ValueError(
            f"image size {image_size} is not a multiple of {config.name}'s patch size "
            f"{module.patch_size}"
        )
    backbone = Backbone(config.name, module, image_size, VIT_NORMALIZATION)
    if config.checkpoint:
        logging.info("Loading %s weights from %s", config.name, config.checkpoint)
        params = vit_checkpoint.load_pretrained(config.checkpoint, module, image_size=image_size)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    else:
        logging.warning(
            "No checkpoint given: %s starts from a RANDOM initialisation, which only makes "
            "sense for training from scratch (set backbone.checkpoint to a .npz file)",
            config.name,
        )
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = jax.jit(module.init)(rng, dummy)["params"]
    return backbone, params
