"""PGN prompt inversion: latent prompt tokens -> RGB pixels that an unmodified model reads back.

PGN (``jprompt.methods.pgn``) appends K generated tokens to the frozen backbone's sequence, after
the position embedding was added. An inference API takes images, not tokens, so to deploy a
PGN its tokens must become pixels that the unmodified backbone embeds into exactly those tokens.
This module holds the geometry and the linear algebra of that, as pure functions; the client
and server built on it live in ``jprompt.deploy.client`` and ``jprompt.deploy.server``.

Geometry. With an image grid of g x g patches of size P, the K tokens become K extra patches in
``r = ceil(K / g)`` extra patch ROWS BELOW the image: ``S = r * g`` slots, filled in raster
order, the prompt tokens in slots 0..K-1 and "filler" patches of a fixed mid-gray pixel value
(``FILL_VALUE`` = 128: a valid pixel near the centre of both input normalizations) in slots
K..S-1. Raster order puts the extra patches after the image
patches: exactly where PGN appends its tokens. The deployed model is the unmodified backbone
(same module, same weights) run on the ``(g + r) P x g P`` image, with its position-embedding
table extended for the extra rows by edge padding: the first ``1 + g*g`` rows (CLS and image
patches) stay exactly as they are, so the image patches see what they always saw, and the extra
rows repeat the last image row. Any fixed extension keeps the equivalence exact (the inversion
subtracts whatever embedding slot j gets); edge padding is chosen because it adds no parameters,
puts only position vectors the model was trained with into the sequence (an extra row reads as
"more of the bottom row", not as an out-of-distribution vector such as zero, which also matters
for CLIP's ``ln_pre`` that normalizes every token), and lets a server extend its table for any
number of extra rows without knowing anything about PGN.

A PGN trained with ``deployable=True`` uses this geometry already: after its K tokens it
appends the S - K filler tokens ``W vec(x_fill) + b + pos_j`` (constants of the frozen tree), so
the latent model that trains and the deployed pipeline are the same function. It needs
``pool="tok"`` (with "gap" the deployed model would average over the prompt patches too) and
``3 P^2 >= D``.

Inversion. The patch embedding maps a patch x (flattened in (row, column, channel) order, in the
backbone's normalized input space) to ``W vec(x) + b`` with W the ``(D, 3 P^2)`` kernel (CLIP:
b = 0). Token p for slot j needs ``W x = t`` with ``t = p - b - pos_j``. For ``3 P^2 >= D`` and
W of full rank the system is under-determined and its minimum-norm solution
``x = pinv(W) t`` is exact; ``pinv(W)`` and ``b + pos_j`` are computed once per backbone
(``Inverse``). The solution is converted back to RGB by undoing the input normalization.

Valid images. The minimum-norm solution may leave [0, 255]. Among the exact solutions
``project_to_box`` looks for one inside the range by alternating projections (a fixed number of
iterations, jit-able) between the affine set ``{x : W x = t}`` (``x + pinv(W) (t - W x)``, the
Euclidean projection since W has full row rank) and the pixel box (a clip, per channel in
normalized space); the limit is a point of the intersection, not necessarily the one nearest
the minimum-norm solution (Dykstra's variant would give that; any exact one serves). The last
step is the box projection, so the pixels are always valid; it
reports per image the largest equation residual ``|W x - t|`` and whether it is exact to
``EXACT_RTOL`` (no in-range solution was found otherwise: the caller says so). Rounding to 8 bits
(``quantize``) then perturbs each token by ``W e`` with ``|e| <= 0.5`` grey levels per pixel;
``benchmarks/inversion_agreement.py`` measures what that does to logits and top-1 agreement
between the latent and the served model.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jprompt.data import normalization as normalizations

FILL_VALUE = 128  # the RGB value of every pixel of a filler patch (mid-gray)
BOX_ITERATIONS = 200  # alternating projections per solve
EXACT_RTOL = 1e-4  # a residual within EXACT_RTOL * max(1, max |t|) counts as exact


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where K prompt patches go: ``rows`` extra patch rows of ``grid`` slots below the image."""

    grid: int  # patches per side of the (square) image
    patch_size: int
    num_tokens: int  # K

    @classmethod
    def of(cls, image_size: int, patch_size: int, num_tokens: int) -> "Geometry":
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        return cls(image_size // patch_size, patch_size, num_tokens)

    @property
    def rows(self) -> int:
        return math.ceil(self.num_tokens / self.grid)

    @property
    def slots(self) -> int:
        return self.rows * self.grid

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


def check_invertible(module, name: str) -> None:
    """ValueError unless ``module`` (a ViT or CLIP image tower) allows exact prompt inversion."""
    if module.pool != "tok":
        raise ValueError(
            f"prompt inversion needs pool='tok', but {name} pools with {module.pool!r}: the "
            "deployed model would average the prompt patches into its features"
        )
    if getattr(module, "num_registers", 0):
        raise ValueError(
            f"prompt inversion is not verified on backbones with register tokens ({name}): "
            "deploy a PGN trained on one without (e.g. dinov2_b14), or train with "
            "deployable=False"
        )
    patch, dim = module.patch_size, module.hidden_size
    if 3 * patch * patch < dim:
        raise ValueError(
            f"prompt inversion is impossible on {name}: a {patch}x{patch} RGB patch has "
            f"3*{patch}*{patch} = {3 * patch * patch} values, fewer than the token width "
            f"D = {dim}, so W vec(x) + b + pos = p has no exact solution in general; use a "
            "backbone whose patch has at least D / 3 pixels (e.g. vit_tiny8, clip_tiny8)"
        )


# --- Input normalization (jprompt.data.normalization) ------------------------------------------


def normalize(rgb, normalization: str) -> jax.Array:
    """RGB in [0, 255] (any dtype, channels last) -> the backbone's input space."""
    scale, offset = normalizations.affine(normalization)
    return jnp.asarray(rgb, jnp.float32) * scale + offset


to_rgb = normalizations.to_rgb  # the inverse of ``normalize``: float RGB, not clipped


def pixel_bounds(normalization: str, patch_size: int) -> tuple[jax.Array, jax.Array]:
    """``(lower, upper)``, each ``(3 P^2,)``: RGB 0 and 255 of a flattened patch, normalized."""
    shape = (patch_size, patch_size, 3)
    return (
        normalize(np.zeros(shape), normalization).reshape(-1),
        normalize(np.full(shape, 255.0), normalization).reshape(-1),
    )


# --- The backbone's side: patch embedding and extended position table ----------------------------


def patch_embedding(params: dict) -> tuple[jax.Array, jax.Array]:
    """``(W (D, 3 P^2), b (D,))`` of the patch conv; b is zero for CLIP's bias-free conv."""
    kernel = params["embedding"]["kernel"]  # (P, P, 3, D): rows of W in (row, col, channel) order
    dim = kernel.shape[-1]
    bias = params["embedding"].get("bias", jnp.zeros((dim,), kernel.dtype))
    return kernel.reshape(-1, dim).T, bias


def extend_position_embedding(pos_embedding: jax.Array, grid: int, rows: int) -> jax.Array:
    """``(1, 1 + N, D)`` -> ``(1, 1 + N + rows * grid, D)``: ``rows`` copies of the last row."""
    last_row = pos_embedding[:, -grid:]
    return jnp.concatenate([pos_embedding] + [last_row] * rows, axis=1)


def with_extra_rows(params: dict, grid: int, rows: int) -> dict:
    """The backbone ``params`` for an image ``rows`` patch rows taller (edge-padded table)."""
    posembed = params["Transformer"]["posembed_input"]
    table = extend_position_embedding(posembed["pos_embedding"], grid, rows)
    transformer = {**params["Transformer"], "posembed_input": {**posembed, "pos_embedding": table}}
    return {**params, "Transformer": transformer}


def slot_offsets(params: dict, geometry: Geometry) -> jax.Array:
    """``(S, D)``: ``b + pos_j`` for each extra slot j, what its patch adds besides ``W x``."""
    _, bias = patch_embedding(params)
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    extended = extend_position_embedding(table, geometry.grid, geometry.rows)
    return bias + extended[0, -geometry.slots :]


def filler_tokens(params: dict, geometry: Geometry, normalization: str) -> jax.Array:
    """``(S - K, D)``: the tokens of the mid-gray filler patches in slots K..S-1."""
    kernel, _ = patch_embedding(params)
    p = geometry.patch_size
    fill = normalize(np.full((p, p, 3), FILL_VALUE), normalization).reshape(-1)
    return kernel @ fill + slot_offsets(params, geometry)[geometry.num_tokens :]


# --- Solving for pixels --------------------------------------------------------------------------


@struct.dataclass
class Inverse:
    """What inverting the K prompt slots of one backbone needs, precomputed once."""

    kernel: jax.Array  # W (D, 3 P^2)
    pinv: jax.Array  # pinv(W) (3 P^2, D)
    offsets: jax.Array  # b + pos_j of the K prompt slots (K, D)

    @classmethod
    def of(cls, params: dict, geometry: Geometry) -> "Inverse":
        kernel, _ = patch_embedding(params)
        pinv = np.linalg.pinv(np.asarray(kernel, np.float64)).astype(np.float32)
        offsets = slot_offsets(params, geometry)[: geometry.num_tokens]
        return cls(jnp.asarray(kernel), jnp.asarray(pinv), jnp.asarray(offsets))

    def targets(self, tokens: jax.Array) -> jax.Array:
        """``(B, K, D)`` tokens -> ``t = p - b - pos_j``, what ``W x`` must equal."""
        return tokens - self.offsets

    def min_norm(self, tokens: jax.Array) -> jax.Array:
        """``(B, K, D)`` tokens -> ``(B, K, 3 P^2)`` minimum-norm patches (normalized space)."""
        return self.targets(tokens) @ self.pinv.T


def project_to_box(
    inverse: Inverse,
    tokens: jax.Array,
    x: jax.Array,
    bounds: tuple[jax.Array, jax.Array],
    *,
    iterations: int = BOX_ITERATIONS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Alternating projections from ``x`` toward an exact solution inside ``bounds``.

    Returns ``(patches (B, K, 3 P^2) inside the bounds, residual (B,), exact (B,))``: the
    residual is the largest ``|W x - t|`` of an image's patches after the final box projection,
    exact whether it is within ``EXACT_RTOL * max(1, max |t|)``. Where the box and the solution
    set intersect the iterates converge to a point of the intersection; where they do not, the
    residual stays large and ``exact`` is False.
    """
    lower, upper = bounds
    targets = inverse.targets(tokens)

    def step(_, x):
        x = jnp.clip(x, lower, upper)
        return x + (targets - x @ inverse.kernel.T) @ inverse.pinv.T

    x = jnp.clip(jax.lax.fori_loop(0, iterations, step, x), lower, upper)
    residual = jnp.abs(x @ inverse.kernel.T - targets).max(axis=(1, 2))
    scale = jnp.maximum(1.0, jnp.abs(targets).max(axis=(1, 2)))
    return x, residual, residual <= EXACT_RTOL * scale


def patches_to_rows(patches: jax.Array, geometry: Geometry, normalization: str) -> jax.Array:
    """``(B, K, 3 P^2)`` normalized prompt patches -> RGB rows ``(B, rows P, grid P, 3)``, with
    the mid-gray filler patches in slots K..S-1."""
    batch, p = patches.shape[0], geometry.patch_size
    rgb = to_rgb(patches.reshape(batch, geometry.num_tokens, p, p, 3), normalization)
    fill = jnp.full((batch, geometry.slots - geometry.num_tokens, p, p, 3), FILL_VALUE, rgb.dtype)
    slots = jnp.concatenate([rgb, fill], axis=1).reshape(
        batch, geometry.rows, geometry.grid, p, p, 3
    )
    return slots.transpose(0, 1, 3, 2, 4, 5).reshape(batch, geometry.rows * p, -1, 3)


def quantize(rgb: jax.Array) -> jax.Array:
    """Float RGB -> uint8, rounded to the nearest grey level."""
    return jnp.round(jnp.clip(rgb, 0, 255)).astype(jnp.uint8)
