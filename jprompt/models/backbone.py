"""What a backbone is: a Linen image module and the facts the rest of the system needs.

``Backbone`` pairs a module built without a classification head with the image size it runs at,
the pixel normalization its weights expect (a ``jprompt.data.normalization`` name, which the
input pipeline applies) and the width of its features. CLIP backbones (and SigLIP ones built
for a zero-shot head) also carry their text tower (``text``), from which a zero-shot head is
computed once; only the image tower's parameters
go to the training step. A ViT loaded for a label mapping carries its checkpoint's classifier
(``source_head``: ``{"kernel": (feature_dim, S), "bias": (S,)}``, e.g. ImageNet's), which the
method puts in its frozen tree; it is read only when asked for, as it can be large (IN-21k:
16.8M values for ViT-B).

Building one from a name and a checkpoint is ``jprompt.models.backbones``; this module reads no
checkpoint, so prompt methods import it without the checkpoint readers. From your own code::

    module = vit.create("vit_b16")
    backbone = Backbone("vit_b16", module, image_size=224, normalization="minus_one_to_one")
"""

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from jprompt.models import clip, vit

TEXT_BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A text tower (CLIP's, or SigLIP's) with its parameters, log logit scale and tokenizer,
    for computing zero-shot heads."""

    module: clip.TextTransformer | nn.Module
    params: dict
    logit_scale: float
    # ``(texts) -> (T, L)`` token ids; None: CLIP's BPE tokenizer (``clip_tokenizer``).
    tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None

    def encode(self, token_ids: np.ndarray) -> np.ndarray:
        """``(T, L)`` token ids -> ``(T, E)`` text features, in batches."""
        encode = jax.jit(lambda params, ids: self.module.apply({"params": params}, ids))
        parts = [
            np.asarray(encode(self.params, token_ids[i : i + TEXT_BATCH_SIZE]))
            for i in range(0, len(token_ids), TEXT_BATCH_SIZE)
        ]
        return np.concatenate(parts, axis=0)


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    module: vit.VisionTransformer
    image_size: int
    normalization: str
    text: TextEncoder | None = dataclasses.field(default=None, compare=False, repr=False)
    source_head: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def feature_dim(self) -> int:
        return self.module.feature_dim

    def features(self, params, images, *, rng=None, train=False, **prompts):
        """Pooled features ``(B, feature_dim)`` (the CLS token or the patch mean, after the
        final LayerNorm and any projection: what a head sees) and the dict of intermediates.

        ``prompts`` are passed to the module (``prompt_tokens=``, ``deep_prompts=``,
        ``prompt_position=``, ``pixel_prompt=``). ``train`` switches the backbone's own dropout
        on, for fine-tuning; that needs ``rng``.
        """
        dropout = self.module.dropout_rate or self.module.attention_dropout_rate
        if train and dropout and rng is None:
            raise ValueError(
                f"{self.name}'s dropout (rate {dropout}) needs an rng while training: pass "
                "rng=, or train=False"
            )
        rngs = {"dropout": rng} if train and rng is not None else {}
        _, out = self.module.apply({"params": params}, images, train=train, rngs=rngs, **prompts)
        return out["features"], out
