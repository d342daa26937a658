"""Vision Transformer (Flax Linen) with prompt tokens as call arguments.

The parameter tree is exactly the tree of the published vit_jax / AugReg ``.npz`` checkpoints
after vit_jax's pre-Linen rename, so those files load by name (see ``vit_checkpoint``)::

    embedding/{kernel (P, P, 3, D), bias}
    cls (1, 1, D)                                   only with pool="tok" (or class_token)
    registers (1, R, D)                             only with num_registers (DINOv2)
    Transformer/posembed_input/pos_embedding        (1, 1 + N, D) with cls, (1, N, D) without
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                                 LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1},
                                 LayerScale_{0,1}/scale (only with layerscale: DINOv2)
    Transformer/encoder_norm
    pre_logits/{kernel, bias}                       only with representation_size
    head/{kernel, bias}                             only with num_classes > 0

Input range: ``images`` are float ``(B, H, W, 3)``. The model applies no normalization itself;
the published vit_jax and big_vision checkpoints were trained on pixels scaled to [-1, 1]
(``x / 127.5 - 1``), so feed them images in that range.

Prompts are call arguments, never parameters, so the tree above stays identical to the
checkpoint (the frozen backbone) and prompt methods keep their own trainable tree:

- ``prompt_tokens`` (B, p, D): inserted AFTER the position embedding was added, so they carry no
  position embedding. ``prompt_position="after_cls"`` puts them right after the CLS token (at the
  start with pool="gap"), as VPT does; ``"end"`` appends them after the last patch, as PGN does.
  With register tokens (DINOv2), "after_cls" means after the CLS and the register tokens:
  ``[CLS, registers, prompts, patches]``. Neither registers nor prompts carry a position
  embedding and attention is blind to the order of such tokens, so the outputs are the same
  with the prompts before the registers; only the rows' bookkeeping depends on it.
- ``deep_prompts`` (depth, B, p, D): VPT-deep. ``deep_prompts[0]`` is inserted like
  ``prompt_tokens``; before each layer i >= 1 the p prompt positions are overwritten with
  ``deep_prompts[i]``, discarding the previous layer's outputs there (so they are never
  computed: those rows give that layer keys and values only).
- ``pixel_prompt`` (H, W, 3): VP's prompt, added to every image. The output is that of
  ``images + pixel_prompt``; the prompt is embedded once on its own (see ``PatchEmbedding``).
- ``kv_prompts`` ``(keys, values)``, each (L, B, H, m, D/H), L <= depth: E2VPT's key-value
  prompts. Layer i < L prepends ``keys[i]`` to its attention's keys and ``values[i]`` to its
  values, after their projections (so no bias is added to them); its queries are unchanged and
  so is the sequence every layer outputs. ``None`` leaves every result as without it.
"""

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# variant -> (hidden_size, depth, mlp_dim, num_heads); the real ones follow the ViT/AugReg papers.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),  # ViT-g (Zhai et al. 2022, "Scaling Vision Transformers")
    "tiny": (64, 2, 128, 2),  # for tests and offline demos only
}
REAL_PATCH_SIZES = (8, 14, 16, 32)
TINY_PATCH_SIZES = (2, 4, 8, 16)


def _patch_sizes(variant: str) -> tuple[int, ...]:
    return TINY_PATCH_SIZES if variant == "tiny" else REAL_PATCH_SIZES


NAMES: tuple[str, ...] = tuple(
    f"vit_{variant}{patch}" for variant in VARIANTS for patch in _patch_sizes(variant)
)

# "global_pool" is MAE's (its fine-tuning, and VPT's MAE runs): see VisionTransformer.
POOLS = ("tok", "gap", "global_pool")
# The transformer block's MLP: vit_jax's Dense-activation-Dense, or DINOv2's SwiGLU (ViT-g/14).
FFNS = ("mlp", "swiglu")
PROMPT_POSITIONS = ("after_cls", "end")
LAYERNORM_EPS = 1e-6  # vit_jax / big_vision; CLIP uses PyTorch's default 1e-5
# How self-attention is computed (``MultiHeadDotProductAttention``): jprompt's heads-major XLA
# computation, or ``jax.nn.dot_product_attention`` with that ``implementation``.
ATTENTIONS = ("heads_major", "xla", "cudnn")


# Sequence rows as static ``(start, stop)`` spans, e.g. ``((0, 1),)`` for the CLS token.
Rows = tuple[tuple[int, int], ...]


def rows_without(length: int, start: int, count: int) -> Rows:
    """The rows of a ``length``-row sequence outside ``[start, start + count)``."""
    return tuple(span for span in ((0, start), (start + count, length)) if span[0] < span[1])


def take_rows(x, rows: Rows | None):
    """``x[:, rows]`` for ``(B, T, ...)`` arrays; all of ``x`` for ``rows=None``."""
    if rows is None:
        return x
    return jnp.concatenate([x[:, start:stop] for start, stop in rows], axis=1)


def quick_gelu(x):
    """CLIP's sigmoid approximation of GELU; its checkpoints were trained with it."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x):
    """The erf GELU of PyTorch's ``nn.GELU()``, which PyTorch-trained ViTs (timm, torchvision,
    DINOv2, MAE) and VPT's official code compute; flax's ``nn.gelu`` is the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


# The MLP activation must be the one the checkpoint was trained with: the tanh approximation
# differs from the exact GELU by up to 4.7e-4 (at |x| = 2.7), enough to move a ViT's logits.
ACTIVATIONS = {"gelu_tanh": nn.gelu, "gelu_exact": gelu_exact, "quick_gelu": quick_gelu}
DEFAULT_ACTIVATION = "gelu_tanh"  # vit_jax and big_vision checkpoints were trained with it


def parse_name(name: str) -> tuple[str, int]:
    """``"vit_b16"`` -> ``("b", 16)``; ValueError for names outside ``NAMES``."""
    match = re.fullmatch(r"vit_([a-z]+)(\d+)", name)
    if match and match[1] in VARIANTS and int(match[2]) in _patch_sizes(match[1]):
        return match[1], int(match[2])
    raise ValueError(
        f"unknown ViT backbone {name!r}; expected vit_<variant><patch> with variant in "
        f"{list(VARIANTS)} and patch in {list(REAL_PATCH_SIZES)} "
        f"(patch in {list(TINY_PATCH_SIZES)} for 'tiny')"
    )


def create(name: str, *, num_classes: int = 0, **overrides: Any) -> "VisionTransformer":
    """The ViT named ``vit_{variant}{patch}``; ``overrides`` replace any module field."""
    variant, patch = parse_name(name)
    hidden, depth, mlp, heads = VARIANTS[variant]
    fields = dict(
        num_classes=num_classes,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        mlp_dim=mlp,
        num_heads=heads,
    )
    return VisionTransformer(**{**fields, **overrides})


class MlpBlock(nn.Module):
    """Dense -> activation (one of ``ACTIVATIONS``) -> Dropout -> Dense -> Dropout, initialised
    as in vit_jax.

    ``ffn="swiglu"`` is DINOv2's ``SwiGLUFFN`` instead: ``Dense_0`` maps to ``2 * mlp_dim`` (its
    ``w12``), whose halves ``a, b`` give ``silu(a) * b`` (``activation`` is not used), then
    ``Dense_1`` (its ``w3``)."""

    mlp_dim: int
    dropout_rate: float = 0.0
    activation: str = DEFAULT_ACTIVATION
    ffn: str = "mlp"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid choices: {list(ACTIVATIONS)}"
            )
        inits = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        if self.ffn not in FFNS:
            raise ValueError(f"unknown ffn {self.ffn!r}; valid choices: {FFNS}")
        width = x.shape[-1]
        gated = self.ffn == "swiglu"
        x = nn.Dense(self.mlp_dim * (2 if gated else 1), dtype=self.dtype, name="Dense_0", **inits)(
            x
        )
        if gated:
            gate, x = jnp.split(x, 2, axis=-1)
            x = jax.nn.silu(gate) * x
        else:
            x = ACTIVATIONS[self.activation](x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(width, dtype=self.dtype, name="Dense_1", **inits)(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class _ProjectionParams(nn.Module):
    """The ``kernel (*in_shape, *features)`` and ``bias (*features)`` of the ``nn.DenseGeneral``
    mapping ``in_shape`` to ``features``, created under this module's name with the same init,
    but returned instead of applied."""

    in_shape: tuple[int, ...]
    features: tuple[int, ...]

    @nn.compact
    def __call__(self):
        def kernel_init(key, shape, dtype=jnp.float32):
            # DenseGeneral draws its kernel flattened to 2-D (fans from the flat shape).
            flat = (math.prod(self.in_shape), math.prod(self.features))
            return nn.initializers.xavier_uniform()(key, flat, dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, (*self.in_shape, *self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, self.features, jnp.float32)
        return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with the parameter layout of ``flax.linen.MultiHeadDotProductAttention``.

    ``query/key/value`` kernels are (D, H, D/H) and ``out`` is (H, D/H, D), as in the published
    checkpoints. It computes what ``jax.nn.dot_product_attention`` computes (its XLA path; the
    softmax in float32), laid out heads-major: q, k and v come out of one fused projection as
    (B, H, T, D/H), so both attention matmuls batch over contiguous (B, H) blocks; in the
    (B, T, H, D/H) layout ``jax.nn.dot_product_attention`` takes, P @ V is a transposed batched
    matmul. The explicit weights also take the attention dropout.
    ``causal`` lets each token attend only to itself and earlier tokens (CLIP's text tower).
    ``query_rows`` (static spans) computes the outputs of those rows alone: ``(B, rows, D)``.
    ``kv_prompts`` ``(keys, values)``, each (B, H, m, D/H), are prepended to the projected keys
    and values (E2VPT's key-value prompts): every query also attends to these m extra entries.

    ``attention="xla"`` or ``"cudnn"`` computes the same through
    ``jax.nn.dot_product_attention`` with that ``implementation`` instead, in its (B, T, H, D/H)
    layout: ``"cudnn"`` is the fused flash-attention kernel of NVIDIA GPUs (bfloat16 or float16
    compute), which never writes the (B, H, T, T) weights to memory. Neither takes attention
    dropout.
    """

    num_heads: int
    dropout_rate: float = 0.0
    causal: bool = False
    attention: str = "heads_major"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool, query_rows: Rows | None = None, kv_prompts=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads
        heads = (self.num_heads, head_dim)
        projections = [
            _ProjectionParams((width,), heads, name=name)() for name in ("query", "key", "value")
        ]
        # The 1/sqrt(D/H) logit scale is folded into the query projection: a scale of the
        # (B, H, T, T) logits would cost a pass over them.
        scale = jnp.array([1 / math.sqrt(head_dim), 1, 1])[:, None, None]
        kernel = (jnp.stack([kernel for kernel, _ in projections], axis=1) * scale).astype(
            self.dtype
        )
        bias = (jnp.stack([bias for _, bias in projections]) * scale).astype(self.dtype)

        heads_major = self.attention == "heads_major"
        layout = "bhtk" if heads_major else "bthk"

        def project(tokens, which: slice):  # -> (len(which), *layout)
            y = jnp.einsum(f"btd,dchk->c{layout}", tokens.astype(self.dtype), kernel[:, which])
            return y + jnp.expand_dims(bias[which], (1, 3 if heads_major else 2))

        # One (D, 3 H D/H) matmul instead of three narrow ones keeps the matmul units busier;
        # the parameters stay the checkpoint's three. With ``query_rows`` only those rows get
        # queries, and so outputs; every row still gives keys and values.
        if query_rows is None:
            q, k, v = project(x, slice(0, 3))
        else:
            (q,), (k, v) = project(take_rows(x, query_rows), slice(0, 1)), project(x, slice(1, 3))
        if kv_prompts is not None:
            if self.causal:
                raise ValueError("kv_prompts have no position in a causal mask")
            # The (B, H, m, D/H) prompts before the sequence's keys and values, in their layout.
            axis = 2 if heads_major else 1
            keys, values = (p.astype(k.dtype) for p in kv_prompts)
            if not heads_major:
                keys, values = keys.swapaxes(1, 2), values.swapaxes(1, 2)
            k = jnp.concatenate([keys, k], axis=axis)
            v = jnp.concatenate([values, v], axis=axis)

        if heads_major:
            y = self._heads_major(q, k, v, query_rows, deterministic)
        else:
            y = self._dot_product_attention(q, k, v, query_rows, deterministic)
        out_kernel, out_bias = _ProjectionParams(heads, (width,), name="out")()
        y = jnp.einsum(f"{layout},hkd->btd", y, out_kernel.astype(self.dtype))
        return y + out_bias.astype(self.dtype)

    def _heads_major(self, q, k, v, query_rows: Rows | None, deterministic: bool):
        """(B, H, T, D/H) queries, keys and values -> the (B, H, T, D/H) weighted values."""
        # float32 logits whatever the compute dtype, as jax.nn.dot_product_attention's.
        logits = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32)
        if self.causal:
            positions = jnp.arange(k.shape[2])
            asking = positions if query_rows is None else take_rows(positions[None], query_rows)[0]
            mask = asking[:, None] >= positions[None, :]
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        return jnp.einsum("bhqs,bhsk->bhqk", weights, v)

    def _dot_product_attention(self, q, k, v, query_rows: Rows | None, deterministic: bool):
        """(B, T, H, D/H) queries, keys and values -> the (B, T, H, D/H) weighted values."""
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; valid choices: {ATTENTIONS}")
        if self.dropout_rate and not deterministic:
            raise ValueError(
                f"attention={self.attention!r} takes no attention dropout (rate "
                f"{self.dropout_rate}); use attention='heads_major'"
            )
        if self.causal and query_rows is not None:
            # Its causal mask is the one of queries and keys at the same positions.
            raise ValueError(f"attention={self.attention!r} has no causal mask for query_rows")
        # The 1/sqrt(D/H) scale is already in the queries.
        return jax.nn.dot_product_attention(
            q, k, v, scale=1.0, is_causal=self.causal, implementation=self.attention
        )


class LayerScale(nn.Module):
    """Multiplies by a learned per-channel ``scale`` (D,): CaiT's LayerScale, DINOv2's ``ls1`` and
    ``ls2`` (``gamma``). Initialised to 1 (DINOv2's hub models' ``init_values``)."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)); with
    ``query_rows`` the outputs of those rows alone (all rows still give keys and values);
    ``kv_prompts`` go to the attention (``MultiHeadDotProductAttention``).
    ``layerscale`` multiplies both branches by a ``LayerScale`` before the residual sum (DINOv2).
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layernorm_epsilon: float = LAYERNORM_EPS
    activation: str = DEFAULT_ACTIVATION
    ffn: str = "mlp"
    layerscale: bool = False
    causal: bool = False
    attention: str = "heads_major"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool, query_rows: Rows | None = None, kv_prompts=None):
        # positional arguments too: nn.remat's static arguments
        norm = dict(epsilon=self.layernorm_epsilon, dtype=self.dtype)
        y = nn.LayerNorm(name="LayerNorm_0", **norm)(x)
        y = MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dropout_rate=self.attention_dropout_rate,
            causal=self.causal,
            attention=self.attention,
            dtype=self.dtype,
            name="MultiHeadDotProductAttention_0",
        )(y, deterministic=deterministic, query_rows=query_rows, kv_prompts=kv_prompts)
        if self.layerscale:
            y = LayerScale(name="LayerScale_0")(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = take_rows(x, query_rows) + y

        y = nn.LayerNorm(name="LayerNorm_1", **norm)(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            activation=self.activation,
            ffn=self.ffn,
            dtype=self.dtype,
            name="MlpBlock_0",
        )(y, deterministic=deterministic)
        if self.layerscale:
            y = LayerScale(name="LayerScale_1")(y)
        return x + y


class PatchEmbedding(nn.Module):
    """The patch convolution (kernel = stride = patch, "VALID"; ``nn.Conv``'s parameters and
    init) computed as one matmul over the flattened patches: its input gradient, which VP's
    pixel prompts need, is then a matmul too instead of a slow dilated convolution.
    Returns ``(B, N, D)``; a border that does not fill a patch is dropped, as the conv does.
    ``shared`` (H, W, C), added to every image, is embedded on its own: the embedding is linear,
    so that is the embedding of ``images + shared``, and a gradient to ``shared`` (VP's pixel
    prompt) costs one image's backward pass through the embedding instead of the batch's."""

    features: int
    patch_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, shared=None):
        p = self.patch_size
        _, height, width, channels = images.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (p, p, channels, self.features), jnp.float32
        )
        kernel = kernel.reshape(-1, self.features).astype(self.dtype)
        rows, cols = height // p, width // p

        def embed(pixels):  # (n, H, W, C) -> (n, N, D), without the bias
            n = pixels.shape[0]
            patches = pixels[:, : rows * p, : cols * p].reshape(n, rows, p, cols, p, channels)
            return patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * cols, -1) @ kernel

        x = embed(images)
        if shared is not None:
            x = x + embed(shared[None])
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            x = x + bias.astype(self.dtype)
        return x


class AddPositionEmbs(nn.Module):
    """Adds a learned (1, T, D) position embedding, BERT-initialised with std 0.02."""

    @nn.compact
    def __call__(self, x):
        posemb = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]), jnp.float32
        )
        return x + posemb.astype(x.dtype)


class Encoder(nn.Module):
    """Position embedding, prompt insertion, the blocks and the final LayerNorm.

    ``registers`` (B, R, D), DINOv2's register tokens, are inserted at index 1 (after the CLS
    token) once the position embedding was added, as DINOv2 does: they carry none.
    ``prompt_start`` is the sequence index where the p prompt tokens go (after the position
    embedding was added and the registers inserted); ``deep_prompts`` overwrite those positions
    before every layer i >= 1. ``kv_prompts`` ``(keys, values)``, each (L, B, H, m, D/H), give
    layer i < L the key-value prompts ``(keys[i], values[i])``.
    ``pre_norm`` adds CLIP's ``ln_pre`` (named ``pre_norm``) after the prompts were inserted, so
    that prompt tokens are normalized with the rest of the sequence, as the PGN code does on CLIP.
    ``remat`` rematerialises every block in the backward pass (``nn.remat``), trading about one
    extra forward pass for the activation memory of all but one block.

    Returns ``(encoded, readout)``: the whole (B, T, D) sequence after ``encoder_norm``, and the
    ``readout_rows`` of it (all of it for ``None``): the rows a pooled head reads, which the last
    block then computes on their own (below). Work whose result is discarded is skipped: with
    deep prompts no layer but the last computes outputs at the prompt positions.
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layernorm_epsilon: float = LAYERNORM_EPS
    activation: str = DEFAULT_ACTIVATION
    ffn: str = "mlp"
    layerscale: bool = False
    causal: bool = False
    pre_norm: bool = False
    remat: bool = False
    attention: str = "heads_major"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        *,
        registers=None,
        prompts=None,
        deep_prompts=None,
        prompt_start: int = 0,
        readout_rows: Rows | None = None,
        norm_readout: bool = True,
        kv_prompts=None,
        train: bool,
    ):
        x = AddPositionEmbs(name="posembed_input")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        if registers is not None:
            x = _insert(x, registers.astype(x.dtype), 1)

        if deep_prompts is not None:
            prompts = deep_prompts[0]
        if prompts is not None:
            x = _insert(x, prompts.astype(x.dtype), prompt_start)
        norm = dict(epsilon=self.layernorm_epsilon, dtype=self.dtype)
        if self.pre_norm:
            x = nn.LayerNorm(name="pre_norm", **norm)(x)

        # With remat each block keeps only its input for the backward pass and recomputes the
        # rest there: about one more forward pass of compute for activation memory of one block.
        block = nn.remat(Encoder1DBlock, static_argnums=(2, 3)) if self.remat else Encoder1DBlock
        # Each next layer overwrites the deep prompts' positions, so the layers before the last
        # need no outputs there: those rows only give keys and values.
        kept = None
        if deep_prompts is not None:
            kept = rows_without(x.shape[1], prompt_start, deep_prompts.shape[2])

        def layer_kv(i):  # layer i's (keys, values), or None
            if kv_prompts is None or i >= kv_prompts[0].shape[0]:
                return None
            return tuple(p[i] for p in kv_prompts)

        for i in range(self.depth - 1):
            x = self._block(block, i)(x, not train, kept, layer_kv(i))
            if deep_prompts is not None:
                x = _insert(x, deep_prompts[i + 1].astype(x.dtype), prompt_start)

        # Both calls share the last block's parameters. A caller that reads only ``readout``
        # (a loss on the pooled feature) leaves ``encoded``'s last block unused, and XLA drops
        # it: the last block then computes outputs for the readout rows alone.
        last = self._block(block, self.depth - 1)
        last_kv = layer_kv(self.depth - 1)
        encoder_norm = nn.LayerNorm(name="encoder_norm", **norm)
        # nn.remat: every argument positional
        encoded = encoder_norm(last(x, not train, None, last_kv))
        if not norm_readout:
            return encoded, last(x, not train, readout_rows, last_kv)
        if readout_rows in (None, ((0, x.shape[1]),)):
            return encoded, encoded
        return encoded, encoder_norm(last(x, not train, readout_rows, last_kv))

    def _block(self, block: type[nn.Module], index: int) -> nn.Module:
        return block(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            layernorm_epsilon=self.layernorm_epsilon,
            activation=self.activation,
            ffn=self.ffn,
            layerscale=self.layerscale,
            causal=self.causal,
            attention=self.attention,
            dtype=self.dtype,
            name=f"encoderblock_{index}",
        )


def _insert(x, prompts, start: int):
    return jnp.concatenate([x[:, :start], prompts, x[:, start:]], axis=1)


class VisionTransformer(nn.Module):
    """ViT classifier, ``apply`` returning ``(logits, out)``.

    ``out["features"]`` is the pooled, ``encoder_norm``-ed feature the head sees (after the
    optional ``pre_logits`` Dense + tanh), ``out["encoded"]`` the full (B, seq, D) sequence after
    ``encoder_norm``, prompts included. With ``num_classes=0`` there is no head and the logits
    are ``out["features"]``. Inputs: float (B, H, W, 3), pixels in [-1, 1] for the published
    checkpoints; no normalization is applied here. ``dtype`` is the compute dtype; parameters
    are created float32 and may be passed in another storage dtype (cast where used).
    ``remat`` rematerialises each encoder block in the backward pass (see ``Encoder``), and
    ``attention`` (one of ``ATTENTIONS``) picks how self-attention is computed (see
    ``MultiHeadDotProductAttention``). ``activation`` (one of ``ACTIVATIONS``) is the MLP's:
    "gelu_tanh" for vit_jax / big_vision checkpoints, "gelu_exact" for PyTorch-trained ones.

    ``class_token`` says whether the sequence starts with a CLS token; ``None`` ties it to
    ``pool="tok"`` as in vit_jax. PyTorch-trained ViTs (DINOv2, MAE, MoCo v3) always have one,
    also when pooling the patch mean (MAE's and DINOv2's average pooling). ``num_registers``
    learned ``registers`` (1, R, D) follow the CLS token without position embedding (DINOv2 with
    registers); ``layerscale`` and ``ffn="swiglu"`` are DINOv2's LayerScale and SwiGLU MLP.
    "gap" pools the patch tokens alone: no CLS, register or prompt token. "global_pool" is
    MAE's (``models_vit.py``, which VPT's MAE runs use): the mean of every token after the CLS,
    prompts included, taken BEFORE ``encoder_norm`` and then normalised by MAE's fresh
    ``fc_norm`` as VPT leaves it, frozen at its init (scale 1, bias 0: no parameters here).

    The fields after ``head_bias_init`` make CLIP's image tower out of the same module
    (``jprompt.models.clip.image_tower``): a bias-free patch conv, ``pre_norm`` (ln_pre),
    quick_gelu, LayerNorm eps 1e-5, and a bias-free projection ``proj`` of the pooled token,
    whose output is then ``out["features"]``.
    """

    num_classes: int
    patch_size: int
    hidden_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    pool: str = "tok"
    representation_size: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    head_bias_init: float = 0.0
    # DINOv2, MAE and MoCo v3 (PyTorch-trained): a CLS token with any pool, registers, LayerScale.
    class_token: bool | None = None
    num_registers: int = 0
    layerscale: bool = False
    ffn: str = "mlp"
    # CLIP's image tower: conv without bias, ln_pre, quick_gelu, eps 1e-5, a linear projection.
    patch_bias: bool = True
    pre_norm: bool = False
    layernorm_epsilon: float = LAYERNORM_EPS
    activation: str = DEFAULT_ACTIVATION
    projection_dim: int | None = None
    remat: bool = False
    attention: str = "heads_major"
    dtype: Any = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Width of ``out["features"]``, the features a head sees."""
        return self.projection_dim or self.representation_size or self.hidden_size

    @property
    def has_class_token(self) -> bool:
        return self.pool == "tok" if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        """The rows before the patches (and before "after_cls" prompts): CLS and registers."""
        return int(self.has_class_token) + self.num_registers

    @nn.compact
    def __call__(
        self,
        images,
        prompt_tokens=None,
        deep_prompts=None,
        prompt_position: str = "after_cls",
        train: bool = False,
        pixel_prompt=None,
        kv_prompts=None,
    ):
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; valid choices: {POOLS}")
        if prompt_position not in PROMPT_POSITIONS:
            raise ValueError(
                f"unknown prompt_position {prompt_position!r}; valid choices: {PROMPT_POSITIONS}"
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3), got {images.shape}")
        batch = images.shape[0]
        self._check_prompts(prompt_tokens, deep_prompts, batch)
        if kv_prompts is not None:
            self._check_kv_prompts(kv_prompts, batch)
        if pixel_prompt is not None:
            _check_shape("pixel_prompt", pixel_prompt.shape, images.shape[1:], "(H, W, 3)")
            pixel_prompt = pixel_prompt.astype(self.dtype)

        x = PatchEmbedding(
            self.hidden_size,
            self.patch_size,
            use_bias=self.patch_bias,
            dtype=self.dtype,
            name="embedding",
        )(images.astype(self.dtype), pixel_prompt)
        num_patches = x.shape[1]

        if self.pool in ("tok", "global_pool") and not self.has_class_token:
            raise ValueError(f"pool={self.pool!r} needs the class token: class_token=False")
        if self.has_class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size), jnp.float32)
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
        registers = None
        if self.num_registers:
            if not self.has_class_token:
                raise ValueError("register tokens follow the class token: set class_token=True")
            shape = (1, self.num_registers, self.hidden_size)
            registers = self.param("registers", nn.initializers.zeros, shape, jnp.float32)
            registers = jnp.tile(registers, (batch, 1, 1))
        prefix = self.num_prefix_tokens
        num_prompts = 0 if prompt_tokens is None else prompt_tokens.shape[1]
        num_prompts = num_prompts if deep_prompts is None else deep_prompts.shape[2]
        prompt_start = prefix if prompt_position == "after_cls" else prefix + num_patches

        # The rows the pooling reads: the CLS token, every patch token, or every token after
        # the CLS (MAE's ``x[:, 1:]``).
        first_patch = prefix + (num_prompts if prompt_position == "after_cls" else 0)
        pooled_rows = {
            "tok": ((0, 1),),
            "gap": ((first_patch, first_patch + num_patches),),
            "global_pool": ((1, prefix + num_prompts + num_patches),),
        }[self.pool]
        encoded, readout = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            layernorm_epsilon=self.layernorm_epsilon,
            activation=self.activation,
            ffn=self.ffn,
            layerscale=self.layerscale,
            pre_norm=self.pre_norm,
            remat=self.remat,
            attention=self.attention,
            dtype=self.dtype,
            name="Transformer",
        )(
            x,
            registers=registers,
            prompts=prompt_tokens,
            deep_prompts=deep_prompts,
            prompt_start=prompt_start,
            readout_rows=pooled_rows,
            norm_readout=self.pool != "global_pool",
            kv_prompts=kv_prompts,
            train=train,
        )
        if self.pool == "tok":
            pooled = readout[:, 0]
        elif self.pool == "gap":  # the patch tokens only: prompts are not part of the image
            pooled = readout.mean(axis=1)
        else:  # MAE's fc_norm, frozen at its init in VPT: a LayerNorm without scale or bias
            norm = nn.LayerNorm(
                epsilon=self.layernorm_epsilon, use_scale=False, use_bias=False, name="fc_norm"
            )
            pooled = norm(readout.mean(axis=1))

        if self.representation_size is not None:
            pooled = nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(pooled)
            pooled = jnp.tanh(pooled)
        if self.projection_dim is not None:
            pooled = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="proj")(
                pooled
            )
        out = {"features": pooled, "encoded": encoded}

        if not self.num_classes:
            return pooled, out
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.constant(self.head_bias_init),
            name="head",
        )(pooled)
        return logits, out

    def _check_prompts(self, prompt_tokens, deep_prompts, batch: int):
        if prompt_tokens is not None and deep_prompts is not None:
            raise ValueError("pass either prompt_tokens or deep_prompts, not both")
        if prompt_tokens is not None:
            _check_shape(
                "prompt_tokens", prompt_tokens.shape, (batch, None, self.hidden_size), "(B, p, D)"
            )
        if deep_prompts is not None:
            _check_shape(
                "deep_prompts",
                deep_prompts.shape,
                (self.depth, batch, None, self.hidden_size),
                "(depth, B, p, D)",
            )

    def _check_kv_prompts(self, kv_prompts, batch: int):
        if len(kv_prompts) != 2:
            raise ValueError("kv_prompts: expected a pair (keys, values)")
        expected = (None, batch, self.num_heads, None, self.hidden_size // self.num_heads)
        for name, prompts in zip(("keys", "values"), kv_prompts, strict=True):
            _check_shape(f"kv_prompts {name}", prompts.shape, expected, "(L, B, H, m, D/H)")
            if prompts.shape[0] > self.depth:
                raise ValueError(
                    f"kv_prompts {name}: {prompts.shape[0]} layers' prompts for {self.depth} layers"
                )


def _check_shape(name: str, got: tuple, expected: tuple, layout: str):
    """ValueError unless ``got`` matches ``expected`` (``None`` = any size)."""
    fits = len(got) == len(expected) and all(
        e is None or e == g for g, e in zip(got, expected, strict=True)
    )
    if not fits:
        shown = tuple("p" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {layout} = {shown}, got {tuple(got)}")
