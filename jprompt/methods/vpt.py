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

Self-Prompt Tuning init (``prompt_init="spt"``; Wang et al., ICML 2024, official code
WangYZ1608/Self-Prompt-Tuning, ``prompt_generator`` in train.py / train_MAE.py): the tokens start
as token prototypes of downstream training images instead of the uniform draw. ``init`` sees no
data, so it draws the uniform tokens and the trainer (``init_images``/``init_from_images``)
replaces them once before step 0 with ``spt_prompts(method, trained, frozen, images, rng)``,
which runs the frozen backbone without prompts, in eval mode, on ``images``: the first
``spt_images`` images the training iterator yields (0: as many as the training split has), so
through the training transform as officially, but from one shuffled epoch where the official
sampler draws with replacement (its MoCo script uses 1 image). The prototypes of each layer's
set are drawn from the tokens that layer's prompts sit among:

- layer 0 (the shallow set, and deep's first): the patch embeddings, before the position
  embedding and without the CLS token (the official ``patch_embed`` output);
- deep layer i >= 1: block i-1's output (block i's input) without the CLS token (and any
  register tokens).

``spt_sample`` picks the prototypes per layer, independently: ``random`` (the official default)
takes ``num_tokens`` distinct tokens uniformly from all images' tokens of that layer;
``mean_pooling`` / ``max_pooling`` (deep only, as officially) first pool each image's sequence of
L tokens in ``num_tokens - 1`` windows of ``L // (num_tokens - 1)`` tokens plus a last window of
the final ``L % window`` tokens (the whole sequence when that is 0, as the official slice
``x[:, -0:]`` does), then take ``num_tokens`` distinct pooled vectors of all images uniformly.
Differences: the official draws come from torch's generator (these from ``rng``); its
``kmeans`` sampling reads cluster centres computed offline by code that is not released, so it is
not offered. The prototypes are stored at the backbone's width, so ``project_dim`` must be -1.

Trainable ``{"prompter": {"tokens", ["proj"]}, "head": ...}``; frozen ``{"backbone": ...}``.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jprompt.methods.base import Method

PROMPT_INITS = ("uniform", "spt")
SPT_SAMPLES = ("random", "mean_pooling", "max_pooling")
# Images per forward pass of spt_prompts: bounds its memory at any number of images.
SPT_CHUNK = 64


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
    prompt_init: str = "uniform"
    spt_sample: str = "random"
    # Images spt_prompts runs on; 0 = as many as the training split has (the official code).
    spt_images: int = 0

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.project_dim != -1 and self.project_dim < 1:
            raise ValueError(
                f"project_dim must be -1 (no projection) or >= 1, got {self.project_dim}"
            )
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(
                f"unknown prompt_init {self.prompt_init!r}; valid choices: {PROMPT_INITS}"
            )
        if self.spt_sample not in SPT_SAMPLES:
            raise ValueError(
                f"unknown spt_sample {self.spt_sample!r}; valid choices: {SPT_SAMPLES}"
            )
        if self.spt_images < 0:
            raise ValueError(
                f"spt_images must be >= 0 (0 = the training split's size), got {self.spt_images}"
            )
        if self.prompt_init == "spt" and self.project_dim > 0:
            raise ValueError(
                "prompt_init='spt' stores token prototypes at the backbone's width: set "
                f"project_dim=-1, not {self.project_dim}"
            )
        if self.spt_sample != "random" and not self.deep:
            raise ValueError(
                f"spt_sample={self.spt_sample!r} pools deep layers' tokens; shallow SPT samples "
                "patch embeddings at random (spt_sample='random'), as the official code"
            )
        if self.spt_sample != "random" and self.num_tokens < 2:
            raise ValueError(
                f"spt_sample={self.spt_sample!r} pools in num_tokens - 1 windows: set "
                f"num_tokens >= 2, not {self.num_tokens}"
            )

    @property
    def init_images(self) -> int | None:
        return self.spt_images if self.prompt_init == "spt" else None

    def init_from_images(self, trained: dict, frozen: dict, images, rng: jax.Array) -> dict:
        return spt_prompts(self, trained, frozen, images, rng)

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


def spt_prompts(
    method: VisualPromptTuning, trained: dict, frozen: dict, images, rng: jax.Array
) -> dict:
    """``trained`` with the prompt tokens replaced by SPT prototypes of ``images`` (B, H, W, 3),
    preprocessed as for training; see the module docstring. The backbone runs on
    ``SPT_CHUNK`` images at a time and only the chosen prototypes are kept."""
    images = np.asarray(images)
    module = method.backbone.module
    layers = module.depth if method.deep else 1
    num_patches = (images.shape[1] // module.patch_size) * (images.shape[2] // module.patch_size)
    per_image = num_patches if method.spt_sample == "random" else method.num_tokens
    if method.spt_sample != "random" and method.num_tokens - 1 > num_patches:
        raise ValueError(
            f"spt_sample={method.spt_sample!r} pools {num_patches} tokens in num_tokens - 1 "
            f"windows: set num_tokens <= {num_patches + 1}, not {method.num_tokens}"
        )
    total = images.shape[0] * per_image
    if total < method.num_tokens:
        raise ValueError(
            f"SPT needs num_tokens={method.num_tokens} distinct prototypes but {images.shape[0]} "
            f"image(s) give {total} per layer: pass more images"
        )
    # Which (image, candidate) each layer's prompt takes: distinct, uniform over all images'.
    picks = np.stack(
        [
            np.asarray(jax.random.choice(key, total, (method.num_tokens,), replace=False))
            for key in jax.random.split(rng, layers)
        ]
    )
    image_of, candidate_of = np.divmod(picks, per_image)
    run = jax.jit(functools.partial(_spt_candidates, method))
    tokens = np.zeros((layers, method.num_tokens, module.hidden_size), np.float32)
    for start in range(0, images.shape[0], SPT_CHUNK):
        layer, slot = np.nonzero((image_of >= start) & (image_of < start + SPT_CHUNK))
        if layer.size:
            found = np.asarray(run(frozen["backbone"], images[start : start + SPT_CHUNK]))
            tokens[layer, slot] = found[
                layer, image_of[layer, slot] - start, candidate_of[layer, slot]
            ]
    params = trained["params"]
    prompter = {**params["prompter"], "tokens": jnp.asarray(tokens if method.deep else tokens[0])}
    return {**trained, "params": {**params, "prompter": prompter}}


def _spt_candidates(method: VisualPromptTuning, backbone_params: dict, images) -> jax.Array:
    """``(layers, B, C, D)``: each layer's prototype candidates per image, the tokens among
    which that layer's prompts sit (or their window pools), from the backbone without prompts."""
    module = method.backbone.module
    layers = module.depth if method.deep else 1
    names = {"embedding"} | {f"encoderblock_{i}" for i in range(layers - 1)}

    def wanted(mdl, method_name):
        return method_name == "__call__" and mdl.name in names

    _, state = module.apply({"params": backbone_params}, images, capture_intermediates=wanted)
    captured = state["intermediates"]
    prefix = module.num_prefix_tokens  # CLS and register tokens
    tokens = [captured["embedding"]["__call__"][0]]  # no CLS, no position embedding yet
    for i in range(layers - 1):
        tokens.append(captured["Transformer"][f"encoderblock_{i}"]["__call__"][0][:, prefix:])
    tokens = jnp.stack(tokens).astype(jnp.float32)
    if method.spt_sample == "random":
        return tokens
    return window_pools(tokens, method.num_tokens, method.spt_sample)


def window_pools(tokens: jax.Array, num_tokens: int, sample: str) -> jax.Array:
    """``(..., L, D)`` -> ``(..., num_tokens, D)``: SPT's official pooling windows (module
    docstring), ``sample`` ``mean_pooling`` or ``max_pooling``."""
    pool = jnp.mean if sample == "mean_pooling" else jnp.max
    length = tokens.shape[-2]
    window = length // (num_tokens - 1)
    remain = length % window
    pools = [
        pool(tokens[..., i * window : (i + 1) * window, :], axis=-2) for i in range(num_tokens - 1)
    ]
    pools.append(pool(tokens[..., -remain:, :], axis=-2))  # remain == 0: the whole sequence
    return jnp.stack(pools, axis=-2)
