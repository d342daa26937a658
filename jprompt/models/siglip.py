"""SigLIP's image tower (Zhai et al. 2023, big_vision) as a prompt-ready backbone.

SigLIP's ViTs have no class token: the encoded patch tokens are pooled by a multihead attention
pooling head (big_vision's ``MAPHead``): a learned probe (1, 1, D) attends to them (flax's
``MultiHeadDotProductAttention``), then ``probe + MLP(LayerNorm(probe))``. The tower has no
projection after it (the SigLIP models' image ``out_dim`` is None), so the pooled feature is the
image embedding SigLIP's zero-shot logits compare with text embeddings.

``ImageTower`` wraps ``jprompt.models.vit.VisionTransformer`` (``class_token=False``) in the
same scope, so the parameter tree is big_vision's image tower after ``vit_checkpoint.convert``
(``embedding``, ``Transformer/...``) plus big_vision's head, loaded by name
(``siglip_checkpoint``)::

    MAPHead_0/{probe (1, 1, D), MultiHeadDotProductAttention_0/{query,key,value,out},
               LayerNorm_0, MlpBlock_0/{Dense_0, Dense_1}}

Prompts enter the encoder exactly as in the ViT (call arguments, passed through). The MAP head
reads the patch tokens alone, prompt tokens excluded: VPT and PGN read their prompts only
through the frozen encoder (VPT's pooled variants average the patch tokens without the prompts,
as ``vit``'s "gap" does), and a head that attended to the prompt tokens directly would let them
act as extra pooled features instead of as prompts. Inputs are pixels in [-1, 1] (big_vision's
``value_range(-1, 1)``); MLPs use the tanh GELU (big_vision's ``nn.gelu``), LayerNorm eps 1e-6.

The text tower (big_vision's ``text_transformer``) embeds the token ids (``Embed_0``), adds a
learned position embedding, runs the same bidirectional blocks (no causal mask), takes the last
token (with big_vision's "sticky" EOS it is always an EOS or padding of EOS) after
``encoder_norm`` and projects it with ``head`` (a Dense with bias). Its tree is big_vision's
with ``Encoder_0`` named ``Transformer`` and the position embedding inside it, as in the ViT.
``sigmoid_logits`` is SigLIP's zero-shot head: ``exp(t) * cos(image, text) + b``, whose sigmoid
is the probability that text and image match.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jprompt.models import vit

NORMALIZATION = "minus_one_to_one"  # big_vision's value_range(-1, 1)
ACTIVATION = "gelu_tanh"  # big_vision's MlpBlock: flax's nn.gelu
STORAGE = "gs://big_vision/siglip/"  # where big_vision publishes the files (two_towers.py)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A SigLIP image tower: big_vision's ``decode_variant`` sizes, the resolution it was
    trained at and its published file (``STORAGE + file``)."""

    patch_size: int
    hidden_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    image_size: int
    file: str = ""


_B, _L, _SO400M = (768, 12, 3072, 12), (1024, 24, 4096, 16), (1152, 27, 4304, 16)
# The English WebLI models of big_vision's VANITY_NAMES; "tiny4" is for tests and demos only.
VARIANTS: dict[str, Variant] = {
    "siglip_b16_224": Variant(16, *_B, 224, "webli_en_b16_224_63724782.npz"),
    "siglip_b16_256": Variant(16, *_B, 256, "webli_en_b16_256_60500360.npz"),
    "siglip_b16_384": Variant(16, *_B, 384, "webli_en_b16_384_68578854.npz"),
    "siglip_b16_512": Variant(16, *_B, 512, "webli_en_b16_512_68580893.npz"),
    "siglip_l16_256": Variant(16, *_L, 256, "webli_en_l16_256_60552751.npz"),
    "siglip_l16_384": Variant(16, *_L, 384, "webli_en_l16_384_63634585.npz"),
    "siglip_so400m14_224": Variant(14, *_SO400M, 224, "webli_en_so400m_224_57633886.npz"),
    # 384 is no multiple of 14: big_vision's VALID patch conv drops the last 6 pixel rows and
    # columns (a 27 x 27 grid), as ``vit.PatchEmbedding`` does.
    "siglip_so400m14_384": Variant(14, *_SO400M, 384, "webli_en_so400m_384_58765454.npz"),
    "siglip_tiny4": Variant(4, 32, 2, 64, 2, 16),
}
NAMES = tuple(VARIANTS)


@dataclasses.dataclass(frozen=True)
class TextVariant:
    """A SigLIP text tower (big_vision's SigLIP demo): its sizes, the width of the embedding it
    outputs, the token sequence length it was trained with and its vocabulary."""

    hidden_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    embed_dim: int  # the image tower's width: its MAP head output is not projected
    context_length: int = 64
    vocab_size: int = 32_000  # big_vision's "c4_en" SentencePiece model


_TEXT_B, _TEXT_L = TextVariant(*_B, 768), TextVariant(*_L, 1024)
TEXT_VARIANTS: dict[str, TextVariant] = {
    **{name: _TEXT_B for name in NAMES if name.startswith("siglip_b16")},
    **{name: _TEXT_L for name in NAMES if name.startswith("siglip_l16")},
    "siglip_so400m14_224": TextVariant(*_SO400M, 1152, context_length=16),
    "siglip_so400m14_384": TextVariant(*_SO400M, 1152),
    "siglip_tiny4": TextVariant(24, 2, 48, 2, 32, context_length=8, vocab_size=64),
}


def image_tower(name: str, **overrides: Any) -> "ImageTower":
    """The image tower of the SigLIP model ``name`` (one of ``NAMES``) without a classifier;
    ``overrides`` replace fields of its ``VisionTransformer`` (dtype, remat, dropout_rate...)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown SigLIP backbone {name!r}; valid choices: {list(NAMES)}")
    spec = VARIANTS[name]
    fields = dict(
        num_classes=0,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        depth=spec.depth,
        mlp_dim=spec.mlp_dim,
        num_heads=spec.num_heads,
        pool="gap",  # the encoder's own pooling, unused: the MAP head replaces it
        class_token=False,
        activation=ACTIVATION,
    )
    return ImageTower(vit.VisionTransformer(**{**fields, **overrides}))


def text_tower(name: str, **overrides: Any) -> "TextTower":
    """The text tower of the SigLIP model ``name``; ``overrides`` replace any of its fields."""
    spec = TEXT_VARIANTS[name]
    fields = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        depth=spec.depth,
        mlp_dim=spec.mlp_dim,
        num_heads=spec.num_heads,
        embed_dim=spec.embed_dim,
    )
    return TextTower(**{**fields, **overrides})


def sigmoid_logits(image_features, text_features, log_temperature, bias):
    """SigLIP's pairwise logits ``(B, T)``: ``exp(t)`` times the cosine of each image and text
    feature, plus ``b`` (the file's ``t`` and ``b``); big_vision adds 1e-8 to both norms."""

    def normalize(x):
        return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)

    cosine = normalize(image_features) @ normalize(text_features).T
    return jnp.exp(log_temperature) * cosine + bias


class MAPHead(nn.Module):
    """big_vision's multihead attention pooling: (B, N, D) tokens -> (B, D)."""

    num_heads: int
    mlp_dim: int
    activation: str = ACTIVATION
    layernorm_epsilon: float = vit.LAYERNORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        probe = self.param(
            "probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]), jnp.float32
        )
        probe = jnp.tile(probe.astype(self.dtype), (x.shape[0], 1, 1))
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
        )(probe, x.astype(self.dtype))
        y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype)(x)
        x = x + vit.MlpBlock(self.mlp_dim, activation=self.activation, dtype=self.dtype)(
            y, deterministic=True
        )
        return x[:, 0]


class ImageTower(nn.Module):
    """SigLIP's image tower, ``apply`` returning ``(features, out)`` as ``VisionTransformer``
    does without a head: ``out["features"]`` is the MAP-pooled (B, D) feature and
    ``out["encoded"]`` the encoder's (B, seq, D) sequence, prompts included. It passes its
    keyword arguments on to the ``VisionTransformer`` (``prompt_tokens``, ``deep_prompts``,
    ``prompt_position``, ``pixel_prompt``, ``train``...) and exposes the fields prompt methods
    read."""

    encoder: vit.VisionTransformer

    def setup(self):
        nn.share_scope(self, self.encoder)  # the encoder's parameters sit at the top level

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def depth(self) -> int:
        return self.encoder.depth

    @property
    def num_heads(self) -> int:
        return self.encoder.num_heads

    @property
    def dropout_rate(self) -> float:
        return self.encoder.dropout_rate

    @property
    def attention_dropout_rate(self) -> float:
        return self.encoder.attention_dropout_rate

    @property
    def num_prefix_tokens(self) -> int:
        return 0  # no class token, no registers

    @property
    def pool(self) -> str:
        return "map"

    @property
    def feature_dim(self) -> int:
        return self.encoder.hidden_size

    @nn.compact
    def __call__(self, images, *, prompt_position: str = "after_cls", **call):
        # ``call``: the encoder's other arguments (prompts, ``train``), whatever they are.
        _, out = self.encoder(images, prompt_position=prompt_position, **call)
        encoded = out["encoded"]
        num_patches = (images.shape[1] // self.patch_size) * (images.shape[2] // self.patch_size)
        # Without a class token, "after_cls" prompts lead the sequence and "end" prompts close it.
        start = encoded.shape[1] - num_patches if prompt_position == "after_cls" else 0
        patches = encoded[:, start : start + num_patches]
        encoder = self.encoder
        pooled = MAPHead(
            num_heads=encoder.num_heads,
            mlp_dim=encoder.mlp_dim,
            activation=encoder.activation,
            layernorm_epsilon=encoder.layernorm_epsilon,
            dtype=encoder.dtype,
            name="MAPHead_0",
        )(patches)
        return pooled, {"features": pooled, "encoded": encoded}


class TextTower(nn.Module):
    """SigLIP's text tower: ``(T, L)`` token ids -> ``(T, embed_dim)`` text features."""

    vocab_size: int
    hidden_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    embed_dim: int
    activation: str = ACTIVATION
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token_ids):
        x = nn.Embed(self.vocab_size, self.hidden_size, name="Embed_0")(token_ids)
        length = x.shape[1]
        _, last = vit.Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            activation=self.activation,
            dtype=self.dtype,
            name="Transformer",
        )(x.astype(self.dtype), readout_rows=((length - 1, length),), train=False)
        return nn.Dense(self.embed_dim, dtype=self.dtype, name="head")(last[:, 0])
