"""E2VPT: effective and efficient visual prompt tuning (Han et al., ICCV 2023; official code
ChengHan111/E2VPT, transfer type ``P_VK``: ``src/models/vit_prompt/vit_prompt_VK.py``, the
attention of ``src/models/vit_backbones/vit_changeVK.py``, pruning in ``src/engine/trainer.py``
and ``tune_vtab_PruningRewind_CVK.py``; defaults from ``src/configs/config.py``).

Two kinds of prompts in a frozen ViT, each option named after its official ``MODEL.P_VK`` key:

- Visual prompts: VPT's tokens (``jprompt.methods.vpt``: init ``U(-v, v)``, ``v = sqrt(6 / (3
  P^2 + d))``, optional projection, prompt dropout ``dropout`` = ``DROPOUT_P``, placement after
  the CLS token without position embedding), ``num_tokens`` = ``NUM_TOKENS_P`` (5) of them,
  deep (``deep`` = ``DEEP_P``, the default) or shallow.
- Key-value prompts: each layer's attention (every layer with ``kv_deep`` = ``DEEP``, the
  default; the first alone without) prepends ``kv_tokens`` = ``NUM_TOKENS`` (5) learned vectors
  per head, ``(H, m, D/H)``, to its keys and to its values after their projections (the
  official ``LAYER_BEHIND=True``, ``QUERY_PROMPT_MODE=0``); the queries and the sequence stay
  as they are. ``share_kv`` (``SHARE_PARAM_KV``, default True) uses one array for both keys and
  values; False gives each its own. ``kv_init`` is ``ORIGIN_INIT``: ``kaiming`` (2, the
  default: torch's ``kaiming_uniform_`` on the ``(H, m, D/H)`` array, whose fan-in is
  ``m * D/H``: ``U(-sqrt(6 / (m D/H)), +)``), ``uniform`` (0: ``U(-v, v)``, ``v = sqrt(6 / (3 P^2
  + 16))``, the official constant 16) or ``trunc_normal`` (1: std 0.02 cut at +-2).
  ``kv_dropout`` (``DROPOUT``) drops the key and the value prompts with independent masks per
  example, layer and element, also where they share one array (the official code calls its
  dropout on each).

Pruning masks (``MASK_CLS_TOKEN=True``, the official default): one token mask ``(P, 1)`` and one
piece mask ``(P, S)``, S = ``pieces`` = ``CLS_TOKEN_P_PIECES_NUM`` (16), multiply every visual
prompt set (the shallow one and each deep layer's, after dropout): token p's element d by
``piece_mask[p, d % S] * token_mask[p]``. The official ``mask.repeat((1, D / S))`` tiles the S
pieces along the width, so segment s is the strided set of dimensions ``{s, s + S, s + 2S, ...}``,
not a contiguous block. The key-value prompts are not masked (``MASK_CLS_TOKEN_ON_VK=False``).

The pruning procedure (what the official ``tune_vtab_PruningRewind_CVK.py`` runs):

1. Train with ``rewind=False``: the masks start at 1 and are trainable parameters (their names
   contain "prompt", so the official code trains, and weight-decays, them with the prompts).
   The token mask is stored ``(P, 1)`` (it broadcasts over the width) so that
   ``jprompt.train.optim``, which decays arrays of two or more dimensions, decays it too.
2. ``importance_scores``: the gradient of each batch's mean cross-entropy with respect to the
   masks, averaged over the batches of the training set, the model in eval mode (the official
   pass also calls ``optimizer.step()``, at the warmup schedule's first learning rate, 0).
3. ``rewind_grid``: the candidate pruning settings. Counts of tokens from ``prune_counts(P,
   PRUNE_PERCENTS, MIN_TOKENS)``, of pieces per token from ``prune_counts(S, PRUNE_PERCENTS,
   MIN_PIECES)`` (the official ``determine_mask_sequence``); for each count, the tokens with the
   lowest scores (``pruned_tokens``) and, in every token, the pieces with the lowest scores
   (``pruned_pieces``), ties broken by index (``what_tokens_to_mask``,
   ``what_tokens_pieces_to_mask``; ``MASK_RESERVE=False``).
4. Rewind: train again from a fresh initialisation with ``rewind=True`` and one setting's
   ``pruned_tokens`` / ``pruned_pieces``: the masks are then fixed (in the frozen tree, not
   trained), 0 at the pruned tokens and pieces and 1 elsewhere. Pruned tokens stay in the
   sequence as zero vectors, as officially. With the first run's seed the prompts restart from
   that run's initial values (the official rebuild draws them unseeded). The official script
   trains every setting of the grid and keeps the one with the best final validation accuracy
   (ties: more pruned tokens).

Differences from the official code: the shallow and the deep visual prompts are drawn as one
``(L, P, D)`` array (the same distribution as the official two draws); the key-value prompts'
official position before the keys changes nothing (attention treats keys as a set). The
official ``QUERY_PROMPT_MODE`` 1-3 and ``SHARED_ACCROSS`` are ablations and not offered.

Trainable ``{"prompter": {"tokens", ["proj"], "kv" | "keys" + "values", ["token_mask",
"piece_mask"]}, "head"}``; frozen ``{"backbone", ["prompt_masks"]}``. The head is VPT's.
"""

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jprompt.methods import vpt

KV_INITS = ("kaiming", "uniform", "trunc_normal")
# The official CLS_TOKEN_MASK_PERCENT / CLS_TOKEN_PIECE_MASK_PERCENT, MIN_NUMBER_CLS_TOKEN and
# MIN_NUMBER_CLS_TOKEN_PIECE.
PRUNE_PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90)
MIN_TOKENS = 1
MIN_PIECES = 4
# The official ORIGIN_INIT=0 bound uses 16 where VPT's has the prompt width.
KV_UNIFORM_WIDTH = 16
TRUNC_NORMAL_STD = 0.02


@dataclasses.dataclass(frozen=True)
class E2VPT(vpt.VisualPromptTuning):
    num_tokens: int = 5
    deep: bool = True
    kv_tokens: int = 5
    kv_deep: bool = True
    share_kv: bool = True
    kv_init: str = "kaiming"
    kv_dropout: float = 0.0
    pieces: int = 16
    rewind: bool = False
    pruned_tokens: tuple[int, ...] = ()
    # Per visual prompt token, the pieces pruned in it; () prunes none.
    pruned_pieces: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        # Config values may come as lists: keep the method hashable.
        object.__setattr__(self, "pruned_tokens", tuple(int(t) for t in self.pruned_tokens))
        pieces = tuple(tuple(int(s) for s in p) for p in self.pruned_pieces)
        object.__setattr__(self, "pruned_pieces", pieces)
        if self.prompt_init != "uniform":
            raise ValueError(
                f"E2VPT's visual prompts start uniform (prompt_init='uniform'), not "
                f"{self.prompt_init!r}"
            )
        if self.kv_tokens < 1:
            raise ValueError(f"kv_tokens must be >= 1, got {self.kv_tokens}")
        if self.kv_init not in KV_INITS:
            raise ValueError(f"unknown kv_init {self.kv_init!r}; valid choices: {KV_INITS}")
        if not 0.0 <= self.kv_dropout < 1.0:
            raise ValueError(f"kv_dropout must be in [0, 1), got {self.kv_dropout}")
        width = self.backbone.module.hidden_size
        if self.pieces < 1 or width % self.pieces:
            raise ValueError(
                f"pieces={self.pieces} must divide the backbone's width {width} (the official "
                "piece mask tiles the width in width / pieces repeats)"
            )
        if not self.rewind and (self.pruned_tokens or self.pruned_pieces):
            raise ValueError(
                "pruned_tokens / pruned_pieces take effect in the rewind stage: set rewind=True"
            )
        if any(not 0 <= t < self.num_tokens for t in self.pruned_tokens):
            raise ValueError(
                f"pruned_tokens {self.pruned_tokens} must be in [0, num_tokens={self.num_tokens})"
            )
        if self.pruned_pieces and len(self.pruned_pieces) != self.num_tokens:
            raise ValueError(
                f"pruned_pieces gives {len(self.pruned_pieces)} tokens' pieces; give one tuple "
                f"per token (num_tokens={self.num_tokens}) or ()"
            )
        if any(not 0 <= s < self.pieces for p in self.pruned_pieces for s in p):
            raise ValueError(f"pruned_pieces must be in [0, pieces={self.pieces})")

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """``(L, H, m, D/H)``: every layer's key-value prompts, or the first layer's."""
        module = self.backbone.module
        layers = module.depth if self.kv_deep else 1
        head_dim = module.hidden_size // module.num_heads
        return (layers, module.num_heads, self.kv_tokens, head_dim)

    def init(self, rng, backbone_params):
        vpt_rng, kv_rng = jax.random.split(rng)
        trained, frozen = super().init(vpt_rng, backbone_params)
        prompter = trained["params"]["prompter"]
        names = ("kv",) if self.share_kv else ("keys", "values")
        for name, key in zip(names, jax.random.split(kv_rng, len(names)), strict=True):
            prompter[name] = init_kv(
                key, self.kv_shape, self.kv_init, self.backbone.module.patch_size
            )
        masks = prompt_masks(self.num_tokens, self.pieces, self.pruned_tokens, self.pruned_pieces)
        if self.rewind:
            frozen["prompt_masks"] = masks
        else:
            prompter.update(masks)
        return trained, frozen

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        del epoch
        params = trained["params"]
        prompter = params["prompter"]
        batch = images.shape[0]
        prompt_rng, kv_rng = (None, None) if rng is None else jax.random.split(rng)
        tokens = self.prompts(prompter, batch, rng=prompt_rng, train=train)
        masks = frozen["prompt_masks"] if self.rewind else prompter
        tokens = apply_masks(tokens, masks["token_mask"], masks["piece_mask"])
        kind = "deep_prompts" if self.deep else "prompt_tokens"
        features, out = self.backbone.features(
            frozen["backbone"],
            images,
            prompt_position="after_cls",
            kv_prompts=self.kv_prompts(prompter, batch, rng=kv_rng, train=train),
            **{kind: tokens},
        )
        return self.head_logits(params, frozen, features), out

    def kv_prompts(self, prompter: dict, batch: int, *, rng, train: bool) -> tuple:
        """``(keys, values)`` as the backbone takes them, each ``(L, B, H, m, D/H)``."""
        keys, values = (
            (prompter["kv"],) * 2 if self.share_kv else (prompter["keys"], prompter["values"])
        )
        pair = [
            jnp.broadcast_to(p[:, None], (p.shape[0], batch, *p.shape[1:])) for p in (keys, values)
        ]
        if train and self.kv_dropout > 0.0:
            if rng is None:
                raise ValueError("key-value prompt dropout needs an rng while training")
            pair = [
                vpt.prompt_dropout(key, p, self.kv_dropout)
                for key, p in zip(jax.random.split(rng), pair, strict=True)
            ]
        return tuple(pair)


def init_kv(rng: jax.Array, shape: tuple[int, ...], kind: str, patch_size: int) -> jax.Array:
    """``(L, H, m, D/H)`` key-value prompts, each layer's ``(H, m, D/H)`` as ``ORIGIN_INIT``."""
    if kind == "kaiming":
        # torch's fan-in of an (H, m, D/H) tensor: size(1) * size(2); gain sqrt(2) (a = 0).
        bound = math.sqrt(6.0 / (shape[-2] * shape[-1]))
    elif kind == "uniform":
        bound = math.sqrt(6.0 / (3 * patch_size**2 + KV_UNIFORM_WIDTH))
    else:
        cut = 2.0 / TRUNC_NORMAL_STD  # timm's trunc_normal_ cuts at +-2, absolute
        return TRUNC_NORMAL_STD * jax.random.truncated_normal(rng, -cut, cut, shape, jnp.float32)
    return vpt.symmetric_uniform(rng, shape, bound)


def prompt_masks(
    num_tokens: int,
    pieces: int,
    pruned_tokens: Iterable[int] = (),
    pruned_pieces: Iterable[Iterable[int]] = (),
) -> dict:
    """``{"token_mask": (P, 1), "piece_mask": (P, S)}``: 1, and 0 at the pruned tokens and at
    the pruned pieces of each token (``pruned_pieces[p]``: token p's)."""
    token_mask = np.ones((num_tokens, 1), np.float32)
    token_mask[list(pruned_tokens)] = 0.0
    piece_mask = np.ones((num_tokens, pieces), np.float32)
    for token, token_pieces in enumerate(pruned_pieces):
        piece_mask[token, list(token_pieces)] = 0.0
    return {"token_mask": jnp.asarray(token_mask), "piece_mask": jnp.asarray(piece_mask)}


def apply_masks(tokens: jax.Array, token_mask: jax.Array, piece_mask: jax.Array) -> jax.Array:
    """``(..., P, D)`` prompts times the masks: element d of token p by ``piece_mask[p, d % S]``,
    then by ``token_mask[p]`` (the official ``repeat`` tiles the S pieces along D)."""
    repeats = tokens.shape[-1] // piece_mask.shape[-1]
    return tokens * jnp.tile(piece_mask, (1, repeats)) * token_mask


def importance_scores(method: E2VPT, trained: dict, frozen: dict, batches) -> dict:
    """``{"token_mask": (P, 1), "piece_mask": (P, S)}``: over ``batches`` of ``(images,
    labels)``, the mean of each batch's gradient of its mean cross-entropy with respect to the
    trained masks, the model in eval mode (the official ``calculate_importance``)."""
    if method.rewind:
        raise ValueError("importance scores need the trained masks of a run with rewind=False")
    params = trained["params"]
    masks = {name: params["prompter"][name] for name in ("token_mask", "piece_mask")}

    def loss(masks, images, labels):
        prompter = {**params["prompter"], **masks}
        logits, _ = method.apply(
            {**trained, "params": {**params, "prompter": prompter}}, frozen, images
        )
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1).mean()

    grad = jax.jit(jax.grad(loss))
    total, count = None, 0
    for images, labels in batches:
        g = grad(masks, jnp.asarray(images), jnp.asarray(labels))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if not count:
        raise ValueError("importance_scores needs at least one batch")
    return jax.tree.map(lambda t: t / count, total)


def prune_counts(total: int, percents=PRUNE_PERCENTS, minimum: int = 0) -> tuple[int, ...]:
    """The official ``determine_mask_sequence``'s counts to prune out of ``total``: for each
    percent in order ``int(total * percent / 100)``, until a count would leave fewer than
    ``minimum`` (> 0): that one becomes ``total - minimum`` and ends the list. Distinct, sorted
    (the official mask files are named by count, so repeated counts are one setting)."""
    counts = []
    for percent in percents:
        count = int(total * percent / 100)
        if minimum > 0 and count > total - minimum:
            counts.append(total - minimum)
            break
        counts.append(count)
    return tuple(sorted(set(counts)))


def lowest(scores, count: int) -> tuple[int, ...]:
    """The indices of the ``count`` lowest ``scores``, ties by index, sorted: the official
    greedy masking (``sorted`` ascending, stable, in steps that each add the lowest not yet
    masked) has masked exactly these once its steps add up to ``count``."""
    order = np.argsort(np.asarray(scores, np.float64), kind="stable")
    return tuple(sorted(int(i) for i in order[:count]))


def rewind_grid(scores: dict, percents=PRUNE_PERCENTS) -> dict:
    """``{(tokens, pieces): {"pruned_tokens", "pruned_pieces"}}``: every rewind setting the
    official script trains, for ``scores`` from ``importance_scores``: ``tokens`` pruned of the
    P visual prompts, ``pieces`` pruned in each of them (module docstring, step 3)."""
    token_scores = np.asarray(scores["token_mask"]).reshape(-1)
    piece_scores = np.asarray(scores["piece_mask"])
    num_tokens, num_pieces = piece_scores.shape
    grid = {}
    for tokens in prune_counts(num_tokens, percents, MIN_TOKENS):
        for pieces in prune_counts(num_pieces, percents, MIN_PIECES):
            grid[tokens, pieces] = {
                "pruned_tokens": lowest(token_scores, tokens),
                "pruned_pieces": tuple(lowest(row, pieces) for row in piece_scores),
            }
    return grid
