"""The image scaled inside the fixed canvas, the pixel prompt on the border around it.

EVP shrinks every image by a fixed amount (``shrink`` and ``pad``, used by
``jprompt.methods.evp``); AutoVP (Tsao et al., ICLR 2024, "AutoVP: An Automated Visual
Prompting Framework and Benchmark") learns the scale, for VP's padding prompter
(``VisualPrompt(input_scale=True)``). S is the canvas (the backbone's image size), p
``prompt_size`` and b = S - 2p the image's size at scale 1.

What the official code does (github.com/IBM/AutoVP @ defe0d9: auto_vp/programs.py
``Trainable_Resize`` and ``InputPadding``, wrapper.py, load_model.py, training_process.py), at
its settings S = 224, b = ``IMG_SIZE`` = 128:

- Resize: ``BaseWrapper.forward`` resizes each image tensor to b x b (``transforms.Resize``:
  bilinear, antialiased, not clipped). On CLIP the tensor is already normalised (CLIP's
  preprocess: shorter side to 224, bicubic, centre crop); on its other models it is in [0, 1].
- Scale: ``Trainable_Resize`` pads it with zeros to S (``(S - b + 1) // 2`` before,
  ``(S - b) // 2`` after) and warps the canvas with ``kornia.geometry.transform.scale``: a
  magnification by ``scale`` about the centre c = (S - 1) / 2, bilinear, ``align_corners=True``,
  zeros outside, so output pixel i samples the canvas at c + (i - c) / scale. The scale's
  gradient is that of this sampling (not straight-through); it starts at ``--img_scale``, 1.5 in
  demo.py (its tuning grid: 0.5, 1.0, 1.5).
- Mask: ``InputPadding.redefind_mask`` takes the image's size h = ``min(int(b * scale), S)``
  (a float32 product, truncated: no gradient) and zeroes the prompt ``delta`` (3, S, S) on the
  window ``[(S - h) // 2, (S + h) // 2)`` of rows and columns; the prompt is added after the
  warp: ``x + delta * mask`` on CLIP, ``Normalize(x + sigmoid(delta) * mask)`` otherwise.
- Training: the scale is in the prompt's optimizer, at its learning rate, without weight decay.
  On CLIP (``CLIP_Training``: SGD lr 40, momentum 0.9, cosine) ``clip_grad_value_(scale,
  0.001)`` runs on the gradient of the loss times ``GradScaler``'s scale, 2^16 at the start, so
  the true gradient is clipped to +-0.001 / 2^16 (1.5e-8): the scale hardly moves. On its other
  models (``Training``: Adam lr 1e-3) it is not clipped. After every step
  ``scale.clamp_(0.1, 5.0)``.
- Parameters: ``delta``'s 3 S^2 and the scale: 150,529 at 224 px (the output mapping aside).
- The scale trains only with ``--train_resize 1`` (its tuning tries both; demo.py's default is
  0): otherwise the image is resized straight to ``min(int(b * scale), S)`` and padded, a fixed
  scale that jprompt does not offer.

Here (``scale_in_canvas``, ``border_mask``, ``bounded_scale``):

- The image shrinks from S to b with ``jax.image.resize`` ("linear", antialiased): torch's
  antialiased bilinear, to float precision. The pipeline delivers S x S images, so on AutoVP's
  non-CLIP path the source is resampled twice (to S, then b) where the official code resizes it
  once; its CLIP path resamples twice too.
- The padding and the warp's outside are the zero of the normalised input on a backbone with
  CLIP's normalisation (AutoVP pads after CLIP's preprocess has normalised) and black otherwise
  (AutoVP pads [0, 1] images before ``Normalize``).
- The warp is kornia's bilinear sampling, written as one (S, S) interpolation matrix per axis
  (the scaling is separable): shapes stay fixed under jit, only the weights follow the traced
  scale, and the floor of each source coordinate is held constant, so the scale's gradient is
  grid_sample's. The mask's window is computed from the traced scale the same way (floor of the
  float32 product), so neither needs a recompile when the scale moves.
- The scale's gradient is clipped to +-``scale_grad_clip`` (default 0.001 / 2^16, AutoVP's CLIP
  bound at GradScaler's initial scale) by ``clip_gradient``; GradScaler doubles its scale after
  every 2000 steps without an overflow, halving the official bound, which a fixed bound does not
  follow. The optimizer is the config's, as in AutoVP; Adam on the scale alone (AutoVP's
  non-CLIP setting) is not available next to an SGD prompt.
- The clamp to [0.1, 5] is in the forward, with the gradient passed straight through to the
  stored value (the trainer has no projection step): the same forward, but a stored value that
  overshoots a bound walks back from there instead of from the bound.
- The prompt is VP's (``jprompt.methods.vp``): N(0, 1), added to the normalised input on every
  backbone. AutoVP's starts at zero on CLIP and is ``sigmoid(delta)`` in [0, 1] elsewhere.

tests/test_input_scale.py holds the prompted input and the scale's gradient to the official
modules' own outputs (tests/fixtures/official_autovp.npz, both paths) to 1e-5.
"""

import functools

import jax
import jax.numpy as jnp

from jprompt.data import normalization

# AutoVP's image (IMG_SIZE) inside its canvas, and the scale's bounds and start (demo.py).
BASE_SIZE, CANVAS_SIZE = 128, 224
SCALE_RANGE = (0.1, 5.0)
INIT_SCALE = 1.5
# clip_grad_value_(scale, 0.001) on a gradient multiplied by GradScaler's initial 2^16.
GRAD_CLIP = 0.001 / 2**16


def autovp_prompt_size(image_size: int) -> int:
    """The frame width p that leaves AutoVP's 128 / 224 of the canvas to the image (48 at 224)."""
    return (image_size - round(image_size * BASE_SIZE / CANVAS_SIZE)) // 2


def shrink(images: jax.Array, prompt_size: int, method: str) -> jax.Array:
    """``(B, S, S, C)`` images resized to ``S - 2p`` square, antialiased."""
    batch, size, _, channels = images.shape
    inner = size - 2 * prompt_size
    return jax.image.resize(images, (batch, inner, inner, channels), method, antialias=True)


def pad(images: jax.Array, prompt_size: int, fill) -> jax.Array:
    """``images`` with a border of ``prompt_size`` pixels of ``fill`` (per channel)."""
    border = ((0, 0), (prompt_size, prompt_size), (prompt_size, prompt_size), (0, 0))
    return jnp.pad(images - fill, border) + fill


def fill_value(normalization_name: str) -> jax.Array:
    """What AutoVP pads with, in the normalised input: zero after CLIP's normalisation, black
    before any other."""
    _, black = normalization.affine(normalization_name)
    return jnp.zeros(3, jnp.float32) if normalization_name == "clip" else jnp.asarray(black)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_gradient(x: jax.Array, bound: float) -> jax.Array:
    """The identity, whose gradient is clipped to ``[-bound, bound]`` (``clip_grad_value_``)."""
    return x


def _clip_gradient_fwd(x, bound):
    del bound
    return x, None


def _clip_gradient_bwd(bound, _, g):
    return (jnp.clip(g, -bound, bound),)


clip_gradient.defvjp(_clip_gradient_fwd, _clip_gradient_bwd)


def bounded_scale(scale: jax.Array, grad_clip: float) -> jax.Array:
    """The stored scale as the forward uses it: clamped to ``SCALE_RANGE`` (its gradient passed
    straight through), the gradient clipped to ``grad_clip``."""
    scale = clip_gradient(scale, grad_clip)
    return scale + jax.lax.stop_gradient(jnp.clip(scale, *SCALE_RANGE) - scale)


def sampling_matrix(scale: jax.Array, size: int) -> jax.Array:
    """``(size, size)``: row i holds the bilinear weights with which output pixel i samples the
    canvas at ``c + (i - c) / scale`` (kornia's scale about the centre, ``align_corners=True``);
    a source outside the canvas gets no weight (zeros padding)."""
    centre = (size - 1) / 2
    source = centre + (jnp.arange(size, dtype=jnp.float32) - centre) / scale
    below = jnp.floor(source)  # constant for the gradient, as in grid_sample
    frac = (source - below)[:, None]
    pixels = jnp.arange(size)[None, :]
    below = below.astype(jnp.int32)[:, None]
    return (1 - frac) * (pixels == below) + frac * (pixels == below + 1)


def scale_in_canvas(
    images: jax.Array, prompt_size: int, scale: jax.Array, normalization_name: str
) -> jax.Array:
    """AutoVP's ``Trainable_Resize`` on normalised ``(B, S, S, 3)`` images: shrunk to
    ``S - 2p`` (bilinear, antialiased), padded back to S and magnified by ``scale`` about the
    centre, in float32."""
    fill = fill_value(normalization_name)
    canvas = pad(shrink(images.astype(jnp.float32), prompt_size, "linear"), prompt_size, fill)
    weights = sampling_matrix(scale, images.shape[1])
    warped = jnp.einsum(
        "ij,bjkc,lk->bilc", weights, canvas - fill, weights, precision=jax.lax.Precision.HIGHEST
    )
    return warped + fill


def border_mask(scale: jax.Array, base_size: int, size: int) -> jax.Array:
    """``(S, S, 1)``: 0 on the image's window ``[(S - h) // 2, (S + h) // 2)`` of rows and
    columns, h = ``min(int(base_size * scale), S)``, and 1 on the border where the prompt goes."""
    height = jnp.minimum(jnp.floor(base_size * jax.lax.stop_gradient(scale)), size)
    height = height.astype(jnp.int32)
    pixels = jnp.arange(size)
    inside = (pixels >= (size - height) // 2) & (pixels < (size + height) // 2)
    return 1.0 - (inside[:, None] & inside[None, :])[..., None].astype(jnp.float32)
