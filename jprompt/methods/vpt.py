"""VPT: visual prompt tuning with learned tokens (Jia et al. 2022).

p learned tokens enter the frozen ViT right after the CLS token, AFTER the position embedding was
added, so they carry no position embedding: the sequence is ``1 + p + N`` long.

- Shallow (``deep=False``): tokens ``(p, D)``, inserted once before the first layer.
- Deep (``deep=True``): tokens ``(L, p, D)``; layer 0's set is inserted like the shallow tokens
  and before every layer i >= 1 the p prompt positions are overwritten with layer i's own set,
  discarding what the previous layer computed there.

Init, as in the official code: uniform in (-v, v) with ``v = sqrt(6 / (3 * P * P + d))``
(``init_bound``), P the patch size and d the width the tokens are stored at: D, or the projection
width ``project_dim`` when there is one (the official code uses the stored width). For ViT-B/16,
v = 0.0625. With ``project_dim > 0`` the stored ``(..., p, d)`` tokens go through one shared
``Linear(d -> D)``, the same for every layer's set: kernel He-normal with fan_out = D, bias
uniform in (-1/sqrt(d), 1/sqrt(d)) (PyTorch's default Linear bias, which the official code
keeps).

Prompt dropout (``dropout``) acts on the inserted tokens after the projection, only while
training, with an independent mask per example, per layer and per element, from ``rng``. The
backbone itself always runs in eval mode (its own dropout off), as the official code does.

Head: a linear classifier on the pooled features (the CLS token after the final LayerNorm),
initialised as in the official code (``head_init="vpt"``: He-normal fan_out, bias -log(99)).

Trainable ``{"prompter": {"tokens", ["proj"]}, "head": ...}``; frozen ``{"backbone": ...}``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from jprompt.methods.base import Method


def init_bound(patch_size: int, hidden_size: int) -> float:
    """``v = sqrt(6 / (3 * P * P + d))``: the VPT token init range (-v, v); 0.0625 for B/16."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + hidden_size))


def symmetric_uniform(rng: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    """Uniform in ``[-bound, bound)``. (``nn.initializers.uniform(s)`` samples ``[0, s)``.)"""
    return jax.random.uniform(rng, shape, jnp.float32, minval=-bound, maxval=bound)


def init_projection(rng: jax.Array, in_dim: int, out_dim: int) -> dict:
    """``Linear(in_dim -> out_dim)`` as the official code builds it: He-normal (fan_out) kernel,
    PyTorch's default bias ``U(-1/sqrt(in_dim), 1/sqrt(in_dim))``."""
    kernel_rng, bias_rng = jax.random.split(rng)
    std = math.sqrt(2.0 / out_dim)
    bound = 1.0 / math.sqrt(in_dim)
    return {
        "kernel": std * jax.random.normal(kernel_rng, (in_dim, out_dim), jnp.float32),
        "bias": symmetric_uniform(bias_rng, (out_dim,), bound),
    }


def prompt_dropout(rng: jax.Array, tokens: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, tokens.shape)
    return jnp.where(keep, tokens / (1.0 - rate), jnp.zeros_like(tokens))


@dataclasses.dataclass(frozen=True)
class VisualPromptTuning(Method):
    num_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0
    project_dim: int = -1
    head_init: str = "vpt"

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.project_dim != -1 and self.project_dim < 1:
            raise ValueError(
                f"project_dim must be -1 (no projection) or >= 1, got {self.project_dim}"
            )

    @property
    def token_dim(self) -> int:
        """The width the tokens are stored at: ``project_dim`` or the backbone's D."""
        return self.project_dim if self.project_dim > 0 else self.backbone.module.hidden_size

    @property
    def token_shape(self) -> tuple[int, ...]:
        shape = (self.num_tokens, self.token_dim)
        return (self.backbone.module.depth, *shape) if self.deep else shape

    def init(self, rng, backbone_params):
        token_rng, proj_rng, head_rng = jax.random.split(rng, 3)
        head, head_frozen = self.init_head(head_rng)
        bound = init_bound(self.backbone.module.patch_size, self.token_dim)
        prompter = {"tokens": symmetric_uniform(token_rng, self.token_shape, bound)}
        if self.project_dim > 0:
            prompter["proj"] = init_projection(
                proj_rng, self.project_dim, self.backbone.module.hidden_size
            )
        trained = {
            "prompter": prompter,
            **head,
        }
        return {"params": trained}, {"backbone": backbone_params, **head_frozen}

    def prompts(self, prompter: dict, batch: int, *, rng, train: bool) -> jax.Array:
        """The tokens as the backbone takes them: ``(B, p, D)``, or ``(L, B, p, D)`` if deep."""
        tokens = prompter["tokens"]
        if "proj" in prompter:
            tokens = tokens @ prompter["proj"]["kernel"] + prompter["proj"]["bias"]
        tokens = jnp.broadcast_to(
            jnp.expand_dims(tokens, -3), (*tokens.shape[:-2], batch, *tokens.shape[-2:])
        )
        if train and self.dropout > 0.0:
            if rng is None:
                raise ValueError("prompt dropout needs an rng while training")
            tokens = prompt_dropout(rng, tokens, self.dropout)
        return tokens

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        del epoch
        params = trained["params"]
        tokens = self.prompts(params["prompter"], images.shape[0], rng=rng, train=train)
        kind = "deep_prompts" if self.deep else "prompt_tokens"
        # The backbone runs in eval mode whatever ``train`` is: only the prompt dropout trains.
        features, out = self.backbone.features(
            frozen["backbone"], images, prompt_position="after_cls", **{kind: tokens}
        )
        return self.head_logits(params, frozen, features), out
