"""LoR-VP: a low-rank pixel prompt over the whole image (Jin et al., ICLR 2025).

The prompt is, in each colour channel ``c``, the product of two learned matrices ``B_c`` (S, r)
and ``A_c`` (r, S): an (S, S) image of rank at most r, added to the whole of every image of the
batch, so that rows and columns share information and every patch still gets its own values.

As the official code (github.com/jincan333/LoR-VP, ``trainer/visual_prompt.py``, class LoR_VP,
with the defaults of ``trainer/image_classification_ddp.py`` and ``run/run_lorvp.sh``) does it:

- ``B`` is its ``left_bar`` (3, S, r), initialised to zeros, and ``A`` its ``right_bar``
  (3, r, S), drawn from N(0, 0.01^2) (``init_method='zero,normal'``); stored with those shapes,
  so the arrays of an official state dict load as ``from_arrays(params, {"prompter": {"B":
  left_bar, "A": right_bar}})``. The prompt is ``torch.bmm(B, A)`` laid out as (S, S, 3).
- The rank is ``bar_width``, default 4; the side is ``bar_height``, default 224, the image size.
  At S = 224 and r = 4: 2 x 3 x 224 x 4 = 5,376 parameters.
- Where: on the image already resized to S x S (``Resize((S, S))``, ``ToTensor``), in [0, 1]
  pixel units and BEFORE the input normalisation (``forward``: ``x + program``, then
  ``normalize``), without clamping. jprompt's images arrive normalised, so the prompt is added as
  ``B @ A`` divided by each channel's std (times 255 times the normalisation's scale): the
  backbone sees exactly ``normalize(x + B @ A)``, whatever the backbone's normalisation.
- Head: the official default (``downstream_mapping='lp'``) replaces the source head with a new
  linear layer that trains with the prompt: jprompt's linear head. On CLIP (not a setting of the
  paper) the frozen zero-shot head can be used instead, so that only the prompt trains.

Differences from the official code:
- Its output label mappings (``ilm``, ``flm``, ``origin``: the source head's logits re-indexed;
  ``fm``: a linear layer on the source logits) are not available: jprompt has only the linear and
  the zero-shot head.
- Its ``lp`` head keeps PyTorch's ``nn.Linear`` init (kernel and bias U(-1/sqrt(F), 1/sqrt(F)));
  jprompt's linear head starts from ``head_init`` (zeros by default).
- It trains under ``torch.cuda.amp.autocast`` (float16); jprompt computes in float32.
- The released trainer never builds the prompt: it compares ``prompt_method`` with ``'LoR_VP'``
  while the argument only accepts ``'lor_vp'``, and ``LoR_VP.__init__`` logs attributes it never
  sets (``patch_num``, ``mask_l_pad``), so as published it trains the linear head alone. jprompt
  follows the LoR_VP module's ``forward`` and the paper: the prompt trains.
- The official normalisation depends on the network (none for its timm MIIL IN-21k ViT-B/16,
  mean = std = 0.5 for its other ViTs, ImageNet's for ResNets); jprompt uses the backbone's own.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jprompt.data import normalization
from jprompt.errors import InputError
from jprompt.methods.base import Method

INIT_STD = 0.01  # A's N(0, 0.01^2): get_init('normal')


def init_low_rank(rng: jax.Array, image_size: int, rank: int) -> dict:
    """``{"B": zeros (3, S, r), "A": N(0, 0.01^2) (3, r, S)}``, the official init."""
    return {
        "B": jnp.zeros((3, image_size, rank), jnp.float32),
        "A": INIT_STD * jax.random.normal(rng, (3, rank, image_size), jnp.float32),
    }


def low_rank_prompt(params: dict) -> jax.Array:
    """The ``(S, S, 3)`` prompt in [0, 1] pixel units: ``B_c @ A_c`` in each channel ``c``."""
    return jnp.einsum("chk,ckw->hwc", params["B"], params["A"])


def to_normalized(delta: jax.Array, normalization_name: str) -> jax.Array:
    """A change of pixels in [0, 1] units as the same change of normalised pixels."""
    scale, _ = normalization.affine(normalization_name)
    return delta * jnp.asarray(255.0 * scale, delta.dtype)


@dataclasses.dataclass(frozen=True)
class LowRankVisualPrompt(Method):
    has_pictures = True

    rank: int = 4

    def __post_init__(self):
        size = self.backbone.image_size
        if not 1 <= self.rank <= size:
            raise InputError(
                f"lor_vp: rank {self.rank} does not fit the {size}px image; choose a rank "
                f"from 1 to {size} (the official default is 4)"
            )

    def init(self, rng, backbone_params):
        prompt_rng, head_rng = jax.random.split(rng)
        head, head_frozen = self.init_head(head_rng)
        prompter = init_low_rank(prompt_rng, self.backbone.image_size, self.rank)
        trained = {"prompter": prompter, **head}
        return {"params": trained}, {"backbone": backbone_params, **head_frozen}

    def prompt(self, prompter_params: dict) -> jax.Array:
        """The ``(S, S, 3)`` prompt in the backbone's normalised input space."""
        return to_normalized(low_rank_prompt(prompter_params), self.backbone.normalization)

    def visualize(self, trained, frozen, images, *, rng=None):
        """The prompted images the backbone sees, for pictures."""
        del frozen, rng
        return {"prompted": images + self.prompt(trained["params"]["prompter"])}

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        # Nothing is random and the backbone always runs in eval mode.
        del rng, train, epoch
        params = trained["params"]
        prompt = self.prompt(params["prompter"]).astype(images.dtype)
        features, out = self.backbone.features(frozen["backbone"], images, pixel_prompt=prompt)
        return self.head_logits(params, frozen, features), out
