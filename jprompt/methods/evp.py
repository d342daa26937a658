"""EVP: the image shrunk and a learned frame around it (Wu et al., TMLR 2024).

"Unleashing the Power of Visual Prompting At the Pixel Level": instead of adding a frame on top
of the image as VP does, each image is shrunk to (S - 2p) x (S - 2p) and padded with black back
to S x S, and a learned frame of width p is added on that black border, so prompt and image no
longer overlap. Two "old tricks" of transferable adversarial examples help it train: input
diversity (random augmentation of the images) and gradient normalisation (each step moves the
prompt by the learning rate times the unit-norm gradient).

As the official code (github.com/UCSC-VLAA/EVP, ``main.py``) does it, at its defaults S = 224,
``prompt_size`` p = 30 and ``image_size`` 164 = S - 2p:

- The prompt is ``Pertubation.perturbation`` (3, 224, 224), zeros at the start, of which only
  the frame outside ``[p, S - p)^2`` ever changes (its ``mask`` multiplies every update). jprompt
  stores just that frame, as VP's four strips (``jprompt.methods.vp.padding_prompt``), zeros:
  3 x (224^2 - 164^2) = 69,840 parameters.
- Shrink and pad: the dataset transform resizes the shorter side to 164 (bicubic), crops 164
  (random crop and horizontal flip in training, centre crop at test), ``ToTensor`` ([0, 1]);
  ``F.pad`` adds a border of ``int((224 - 164) / 2)`` = 30 zeros (black); the prompt is added in
  [0, 1] units and image and prompt are normalised together (``normalization(images + noise)``,
  CLIP's Normalize, which the code also uses for its non-CLIP ResNet). jprompt adds the prompt
  divided by each channel's std (``lor_vp.to_normalized``) to the normalised padded image: the
  same input, in the backbone's own normalisation.
- Gradient normalisation (``normalize_gradient``): the update is
  ``perturbation -= lr * mask * g / (||g||_2 + 1e-10)``, with ``g`` the gradient of the batch's
  mean loss with respect to the whole 224 x 224 canvas (the norm includes the inner part, which
  the mask then drops), no momentum, no weight decay. Here the canvas passes through
  ``unit_gradient``, whose gradient is ``g / (||g|| + 1e-10)``; the strips receive its frame, so
  plain SGD without momentum (configs/evp.py) makes exactly that update. (The official ``g`` is
  the batch mean of per-image gradients of the mean loss, 1/B times this one: the same direction,
  the guard 1e-10 aside.) Another optimizer would receive the normalised gradient instead.
- Head: CLIP's frozen zero-shot head, template "this is a photo of a {}", names lower-cased with
  ``_`` and ``-`` as spaces (``refine_classname``), logits ``exp(logit_scale)`` x cosine.

Differences from the official code:
- The pipeline delivers S x S images, which are shrunk here with ``jax.image.resize`` (bicubic,
  antialiased, clipped to the valid pixel range as PIL's 8-bit output is, not rounded): the
  source image is resampled twice (to S, then to S - 2p) where the official code resizes it once
  to S - 2p.
- The official ``prompt_size`` and ``image_size`` are separate flags (a frame narrower or wider
  than the black border); here one ``prompt_size`` sets both, as at their defaults.
- On a non-CLIP backbone the official code maps each class to the source head's most frequent
  prediction on its training images (``get_index``) and trains only the prompt; jprompt trains a
  linear head next to it.
- The official CLIP model runs in float16 on a GPU (``clip.load``); jprompt in float32.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jprompt.data import normalization
from jprompt.errors import InputError
from jprompt.methods import input_scaling, vp
from jprompt.methods.base import Method
from jprompt.methods.lor_vp import to_normalized

GRADIENT_EPS = 1e-10  # main.py: grad_p_t / (g_norm + 1e-10)


@jax.custom_vjp
def unit_gradient(x: jax.Array) -> jax.Array:
    """The identity, whose gradient is scaled to unit L2 norm (EVP's gradient normalisation)."""
    return x


def _unit_gradient_fwd(x):
    return x, None


def _unit_gradient_bwd(_, g):
    return (g / (jnp.linalg.norm(g) + GRADIENT_EPS),)


unit_gradient.defvjp(_unit_gradient_fwd, _unit_gradient_bwd)


def shrink_and_pad(images: jax.Array, prompt_size: int, normalization_name: str) -> jax.Array:
    """Normalised ``(B, S, S, 3)`` images shrunk to ``S - 2p`` (bicubic, antialiased, clipped to
    the valid pixels) and padded with black (pixel 0) back to ``S``."""
    scale, black = normalization.affine(normalization_name)
    shrunk = input_scaling.shrink(images, prompt_size, "bicubic")
    shrunk = jnp.clip(shrunk, black, black + 255.0 * scale).astype(images.dtype)
    return input_scaling.pad(shrunk, prompt_size, black.astype(images.dtype))


@dataclasses.dataclass(frozen=True)
class EnhancedVisualPrompt(Method):
    has_pictures = True

    prompt_size: int = 30
    normalize_gradient: bool = True

    def __post_init__(self):
        size = self.backbone.image_size
        if not 0 < 2 * self.prompt_size < size:
            raise InputError(
                f"evp: prompt_size {self.prompt_size} does not fit the {size}px image; choose "
                f"a prompt_size from 1 to {(size - 1) // 2}, so that the image shrunk to "
                "size - 2 * prompt_size keeps a pixel (the official 30 at 224px gives 164)"
            )

    def init(self, rng, backbone_params):
        prompt_rng, head_rng = jax.random.split(rng)
        head, head_frozen = self.init_head(head_rng)
        strips = vp.init_padding(prompt_rng, self.backbone.image_size, self.prompt_size)
        trained = {"prompter": jax.tree.map(jnp.zeros_like, strips), **head}
        return {"params": trained}, {"backbone": backbone_params, **head_frozen}

    def prompt(self, prompter_params: dict) -> jax.Array:
        """The ``(S, S, 3)`` frame in the backbone's normalised input space."""
        canvas = vp.padding_prompt(prompter_params)  # [0, 1] pixel units, zero inside
        if self.normalize_gradient:
            canvas = unit_gradient(canvas)
        return to_normalized(canvas, self.backbone.normalization)

    def shrink(self, images: jax.Array) -> jax.Array:
        return shrink_and_pad(images, self.prompt_size, self.backbone.normalization)

    def visualize(self, trained, frozen, images, *, rng=None):
        """The prompted images the backbone sees, for pictures."""
        del frozen, rng
        return {"prompted": self.shrink(images) + self.prompt(trained["params"]["prompter"])}

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        # The input diversity is the data pipeline's augmentation; nothing here is random, and
        # the backbone always runs in eval mode.
        del rng, train, epoch
        params = trained["params"]
        prompt = self.prompt(params["prompter"]).astype(images.dtype)
        features, out = self.backbone.features(
            frozen["backbone"], self.shrink(images), pixel_prompt=prompt
        )
        return self.head_logits(params, frozen, features), out
