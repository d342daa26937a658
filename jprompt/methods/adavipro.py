r"""AdaViPro: a VP padding prompt applied only where a learned per-region mask says so.

Yang et al. 2024, "AdaViPro: Region-based Adaptive Visual Prompt for Large-Scale Models
Adapting". No official code is public: where the paper leaves a choice open, it is marked
"[open in the paper ...]" below with what is chosen here. The prompted image is

    x' = x + P * M

with ``P`` the VP padding template of width ``prompt_size`` (``vp.init_padding`` /
``vp.padding_prompt``: N(0, 1), added in the backbone's normalized input space, no clamping) and
``M`` a binary mask that is constant on each ``region_size`` x ``region_size`` region (7 x 7
regions of 32 px at 224 px), nearest-upsampled from the region decisions. The mask generator:

1. Edge map: a fixed 4-neighbour Laplacian ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]``, zero padding 1,
   on the normalized image: on its grayscale (channel mean, ``edge_input="gray"``, the default)
   or on each RGB channel separately (``"rgb"``) [open in the paper: both are here]. The kernel
   is the constant ``LAPLACIAN``, not a parameter.
2. "Convergence" conv: ``C -> embed_dim`` channels, kernel ``kernel_size`` (default 32 = the
   region size), stride ``region_size``, padding ``(kernel_size - region_size) / 2`` on each side
   so that every output position is centred on its region (one output per region, R x R), then
   ReLU. [open in the paper; chosen here: with kernel = stride = region size each region is
   decided from its own edge patch, and the parameter count lands near the paper's figure.]
3. "Policy" conv: ``embed_dim -> 2`` logits per region (index 0 "no prompt", 1 "prompt"),
   kernel ``policy_kernel_size`` (default 1: a per-region linear decision; 3 lets neighbouring
   regions inform it), stride 1, SAME padding. Linen's default init (LeCun-normal kernels, zero
   biases) for both convs.

Training draws the region decision with a Gumbel-softmax over the 2 choices at temperature
``tau0 * tau_decay ** epoch`` (5 and 0.98 as in the paper), straight-through hard by default
(``hard=True``: exact 0/1 masks forward, the soft sample's gradient backward; ``hard=False``
uses the soft sample as a fractional mask) [open in the paper: both are here]. Evaluation takes
the argmax: exact 0/1 masks, no noise. With a vision-only backbone a linear head is trained on
the frozen features, as VP does in this project.

Trainable parameters (the prompter; the linear head comes on top, ``feature_dim * C + C``; the
paper's CLIP setting has a frozen text head instead) at 224 px, ``prompt_size=30``:

  ==========================  ==========  ============  =========
  part                        embed 64    embed 8       formula
  ==========================  ==========  ============  =========
  template (VP padding)       69,840      69,840        4 strips
  convergence conv (gray)     65,600      8,200         32*32*1*D + D
  policy conv (1x1)           130         18            D*2 + 2
  total                       135,570     78,058
  ==========================  ==========  ============  =========

The paper reports about 0.13M at embed dim 64 and 0.09M at 8. With both convs' widths
proportional to the embed dim the generator's count is linear in it with no constant term, so
no such design meets both figures (that would need roughly 15k parameters independent of the
embed dim, which the paper does not describe); this one matches the default. ``edge_input="rgb"``
triples the convergence conv (196,672 at embed dim 64); ``policy_kernel_size=3`` adds 8*D.

``apply`` returns in ``aux``: ``region_masks`` (B, R, R) (the masks actually applied),
``mask_logits`` (B, R, R, 2) and, while training, ``temperature``; plus the backbone's
intermediates, as VP does.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jprompt.methods import gumbel, vp
from jprompt.methods.base import Method

EDGE_INPUTS = ("gray", "rgb")
APPLY = 1  # index of the "apply the prompt here" choice in the 2-way logits

# The fixed 4-neighbour Laplacian (a constant of the method, never trained).
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], np.float32)


def laplacian_edges(images: jax.Array, edge_input: str = "gray") -> jax.Array:
    """The Laplacian edge map, zero padding 1: ``(B, H, W, 1)`` for "gray", ``(B, H, W, 3)``
    for "rgb" (each channel filtered on its own). Gray is the channel mean."""
    if edge_input not in EDGE_INPUTS:
        raise ValueError(f"unknown edge_input {edge_input!r}; valid choices: {EDGE_INPUTS}")
    if edge_input == "gray":
        images = images.mean(axis=-1, keepdims=True)
    channels = images.shape[-1]
    kernel = jnp.tile(jnp.asarray(LAPLACIAN, images.dtype)[:, :, None, None], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(
        images,
        kernel,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def upsample_regions(region_masks: jax.Array, region_size: int) -> jax.Array:
    """Nearest upsampling ``(B, R, R) -> (B, R * region_size, R * region_size)``."""
    return jnp.repeat(jnp.repeat(region_masks, region_size, axis=1), region_size, axis=2)


class MaskGenerator(nn.Module):
    """Edge map ``(B, H, W, C)`` -> 2-way logits per region ``(B, H / s, W / s, 2)``."""

    embed_dim: int = 64
    region_size: int = 32
    kernel_size: int = 32
    policy_kernel_size: int = 1

    @nn.compact
    def __call__(self, edges):
        low = (self.kernel_size - self.region_size) // 2  # negative: the window is cropped
        high = self.kernel_size - self.region_size - low
        x = nn.Conv(
            self.embed_dim,
            (self.kernel_size, self.kernel_size),
            strides=(self.region_size, self.region_size),
            padding=((low, high), (low, high)),
            name="convergence",
        )(edges)
        x = nn.relu(x)
        k = self.policy_kernel_size
        return nn.Conv(2, (k, k), padding="SAME", name="policy")(x)


@dataclasses.dataclass(frozen=True)
class AdaViPro(Method):
    has_pictures = True

    prompt_size: int = 30
    region_size: int = 32
    embed_dim: int = 64
    kernel_size: int = 32
    policy_kernel_size: int = 1
    edge_input: str = "gray"
    hard: bool = True
    tau0: float = 5.0
    tau_decay: float = 0.98

    def __post_init__(self):
        if self.edge_input not in EDGE_INPUTS:
            raise ValueError(
                f"unknown edge_input {self.edge_input!r}; valid choices: {EDGE_INPUTS}"
            )
        for name in ("region_size", "embed_dim", "kernel_size", "policy_kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def mask_generator(self) -> MaskGenerator:
        return MaskGenerator(
            embed_dim=self.embed_dim,
            region_size=self.region_size,
            kernel_size=self.kernel_size,
            policy_kernel_size=self.policy_kernel_size,
        )

    def _check_image_size(self, size: int):
        if size % self.region_size:
            raise ValueError(
                f"region_size {self.region_size} does not divide the image size {size}"
            )

    def init(self, rng, backbone_params):
        size = self.backbone.image_size
        self._check_image_size(size)
        template_rng, mask_rng, head_rng = jax.random.split(rng, 3)
        head, head_frozen = self.init_head(head_rng)
        channels = 1 if self.edge_input == "gray" else 3
        dummy = jnp.zeros((1, size, size, channels), jnp.float32)
        trained = {
            "prompter": {
                "template": vp.init_padding(template_rng, size, self.prompt_size),
                "mask_generator": self.mask_generator.init(mask_rng, dummy)["params"],
            },
            **head,
        }
        return {"params": trained}, {"backbone": backbone_params, **head_frozen}

    def mask_logits(self, mask_params: dict, images: jax.Array) -> jax.Array:
        """``(B, R, R, 2)`` logits (index 1: apply the prompt) from the normalized images."""
        self._check_image_size(images.shape[1])
        edges = laplacian_edges(images, self.edge_input)
        return self.mask_generator.apply({"params": mask_params}, edges)

    def prompt(self, prompter: dict, images, *, rng, train: bool, epoch=0):
        """``(x + P * M, info)``; ``info`` holds ``region_masks``, ``mask_logits`` and, while
        training, the Gumbel ``temperature``."""
        logits = self.mask_logits(prompter["mask_generator"], images)
        info = {"mask_logits": logits}
        if train:
            if rng is None:
                raise ValueError("AdaViPro needs an rng while training (Gumbel noise)")
            tau = gumbel.temperature(epoch, self.tau0, self.tau_decay)
            choice = gumbel.gumbel_softmax(rng, logits, tau, hard=self.hard)
            info["temperature"] = tau
        else:
            choice = gumbel.argmax_one_hot(logits)
        region_masks = choice[..., APPLY]
        info["region_masks"] = region_masks
        pixel_masks = upsample_regions(region_masks, self.region_size).astype(images.dtype)
        template = vp.padding_prompt(prompter["template"]).astype(images.dtype)
        return images + template[None] * pixel_masks[..., None], info

    def visualize(self, trained, frozen, images, *, rng=None):
        """Evaluation-mode prompted images and the pixel masks that placed the prompt."""
        del frozen
        prompter = trained["params"]["prompter"]
        prompted, info = self.prompt(prompter, images, rng=rng, train=False)
        mask = upsample_regions(info["region_masks"], self.region_size)[..., None]
        return {"prompted": prompted, "prompt_mask": mask}

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        params = trained["params"]
        prompted, info = self.prompt(params["prompter"], images, rng=rng, train=train, epoch=epoch)
        # The backbone itself runs in inference mode, as in VP.
        features, out = self.backbone.features(frozen["backbone"], prompted)
        return self.head_logits(params, frozen, features), {**out, **info}
