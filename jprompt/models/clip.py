"""CLIP (Radford et al. 2021): the image tower as a prompt-ready ViT, and the text tower.

The image tower is ``jprompt.models.vit.VisionTransformer`` with CLIP's options: patch conv
without bias, class token, learned position embedding, ``ln_pre`` (``Transformer/pre_norm``),
quick_gelu blocks with LayerNorm eps 1e-5, ``ln_post`` (``Transformer/encoder_norm``; it is
per-token, so normalizing the sequence and taking the class token equals OpenAI's
``ln_post(x[:, 0])``) and the bias-free projection ``proj``. It therefore takes prompts exactly
as the ViT does, and they enter as the papers put them: after the position embedding was added
and before ``ln_pre``, PGN tokens at the end of the sequence, VPT tokens after the class token.

The text tower embeds the 77 token ids, adds a position embedding, runs a causal transformer of
the same blocks, applies ``ln_final`` (``Transformer/encoder_norm``) and projects the features
at the end-of-text token (the largest id in each row, as OpenAI's code finds it) with the
bias-free ``text_projection``. ``logit_scale`` is a scalar next to the two towers::

    {"image": <VisionTransformer tree>, "text": <TextTransformer tree>, "logit_scale": ()}

``jprompt.models.clip_checkpoint`` maps OpenAI / open_clip / Hugging Face weights onto it.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jprompt.models import vit

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
LAYERNORM_EPS = 1e-5
HEAD_WIDTH = 64  # CLIP's attention heads are 64 wide in both towers
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature
# The MLP activation of OpenAI's models (and open_clip's ``-quickgelu`` ones) in both towers;
# open_clip's other models use the exact GELU ("gelu_exact"), also in both (one ``act_layer``).
ACTIVATION = "quick_gelu"


@dataclasses.dataclass(frozen=True)
class Variant:
    embed_dim: int
    image_size: int
    patch_size: int
    image_width: int
    image_depth: int
    text_width: int
    text_depth: int


# From the published OpenAI models; "tiny4" is for tests and offline demos only.
VARIANTS = {
    "b32": Variant(512, 224, 32, 768, 12, 512, 12),
    "b16": Variant(512, 224, 16, 768, 12, 512, 12),
    "l14": Variant(768, 224, 14, 1024, 24, 768, 12),
    "tiny4": Variant(32, 32, 4, 64, 2, 32, 2),
    "tiny8": Variant(32, 32, 8, 64, 2, 32, 2),
}
NAMES = tuple(f"clip_{variant}" for variant in VARIANTS)


def variant(name: str) -> Variant:
    if name not in NAMES:
        raise ValueError(f"unknown CLIP backbone {name!r}; valid choices: {list(NAMES)}")
    return VARIANTS[name.removeprefix("clip_")]


def _heads(width: int) -> int:
    # The tiny variant is narrower than one 64-wide head; give it two.
    return max(width // HEAD_WIDTH, 2)


def image_tower(name: str, **overrides: Any) -> vit.VisionTransformer:
    """CLIP ``name``'s image tower; ``overrides`` replace module fields (e.g. ``dtype``)."""
    v = variant(name)
    fields = dict(
        num_classes=0,
        patch_size=v.patch_size,
        hidden_size=v.image_width,
        depth=v.image_depth,
        mlp_dim=4 * v.image_width,
        num_heads=_heads(v.image_width),
        pool="tok",
        patch_bias=False,
        pre_norm=True,
        layernorm_epsilon=LAYERNORM_EPS,
        activation=ACTIVATION,
        projection_dim=v.embed_dim,
    )
    return vit.VisionTransformer(**{**fields, **overrides})


def text_tower(name: str, **overrides: Any) -> "TextTransformer":
    v = variant(name)
    fields = dict(
        width=v.text_width,
        depth=v.text_depth,
        num_heads=_heads(v.text_width),
        embed_dim=v.embed_dim,
    )
    return TextTransformer(**{**fields, **overrides})


class TextTransformer(nn.Module):
    """``apply(params, token_ids (B, 77)) -> (B, embed_dim)`` text features (not normalized)."""

    width: int
    depth: int
    num_heads: int
    embed_dim: int
    vocab_size: int = VOCAB_SIZE
    activation: str = ACTIVATION
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token_ids):
        if token_ids.ndim != 2 or token_ids.shape[1] != CONTEXT_LENGTH:
            raise ValueError(
                f"expected token ids of shape (B, {CONTEXT_LENGTH}), got {token_ids.shape}"
            )
        x = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(stddev=0.02),
            name="token_embedding",
        )(token_ids).astype(self.dtype)
        x, _ = vit.Encoder(
            depth=self.depth,
            mlp_dim=4 * self.width,
            num_heads=self.num_heads,
            layernorm_epsilon=LAYERNORM_EPS,
            activation=self.activation,
            causal=True,
            dtype=self.dtype,
            name="Transformer",
        )(x, train=False)
        end_of_text = x[jnp.arange(x.shape[0]), jnp.argmax(token_ids, axis=-1)]
        return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name="text_projection")(
            end_of_text
        )


def init_params(name: str, rng: jax.Array, *, image_size: int | None = None) -> dict:
    """Random CLIP parameters ``{"image", "text", "logit_scale"}`` (for tests and demos)."""
    image_size = image_size or variant(name).image_size
    image_rng, text_rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, CONTEXT_LENGTH), jnp.int32)
    return {
        "image": jax.jit(image_tower(name).init)(image_rng, images)["params"],
        "text": jax.jit(text_tower(name).init)(text_rng, tokens)["params"],
        "logit_scale": jnp.asarray(LOGIT_SCALE_INIT, jnp.float32),
    }


def normalize(features: jax.Array) -> jax.Array:
    """Unit L2 norm along the last axis, as CLIP compares features by cosine."""
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def logits(image_features, text_features, logit_scale) -> jax.Array:
    """CLIP's image-to-text logits: ``exp(logit_scale) * cosine``, shape (B_image, B_text)."""
    cosine = normalize(image_features) @ normalize(text_features).T
    return jnp.exp(logit_scale) * cosine
