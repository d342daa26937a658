"""VP: visual prompting with learned pixel prompts (Bahng et al. 2022).

Three prompters, chosen by ``VisualPrompt.prompter``; each adds its prompt to every image of the
batch in the backbone's *normalized* input space, without clamping, as in the official code, and
all parameters are drawn from N(0, 1). ``prompt_size`` is p below, S the image size.

- ``padding``: a frame of width p around the image: top and bottom strips ``(p, S, 3)`` and left
  and right strips ``(S - 2p, p, 3)``; the inside is zero. At S=224, p=30: 69,840 parameters.
- ``fixed_patch``: one learned ``(p, p, 3)`` patch added at the top-left corner.
- ``random_patch``: the same kind of patch added at a location (row, column) drawn uniformly from
  ``[0, S - p)`` on every forward pass, from the ``rng`` passed to ``apply``: one location for the
  whole batch. As in the official code the location is random at evaluation too (the trainer
  passes a distinct rng to every evaluation batch), so evaluation accuracy is itself a sample.

``input_scale=True`` (padding prompter only) adds AutoVP's learned input scale (its official
code and every difference: ``jprompt.methods.input_scaling``): the image is shrunk to ``S - 2p``,
padded back to S and magnified about the centre by a trainable scalar ``scale`` (starting at
``init_scale``, 1.5), and the prompt becomes a whole ``(S, S, 3)`` canvas, N(0, 1), masked to the
border the scaled image leaves (its middle ``min(int((S - 2p) * scale), S)`` pixels are the
image's). At S=224, p=48 (AutoVP's 128 px image): 150,529 parameters, as AutoVP's ``delta`` and
``scale``.

Head (``jprompt.methods.base``): on CLIP, the paper's setting, the frozen zero-shot text head, so
only the prompt trains; with a vision-only backbone a linear head on the frozen features trains
next to the prompt (the head VPT uses).
"""

import dataclasses

import jax
import jax.numpy as jnp

from jprompt.errors import InputError
from jprompt.methods import input_scaling
from jprompt.methods.base import Method

PROMPTERS = ("padding", "fixed_patch", "random_patch")


def init_padding(rng: jax.Array, image_size: int, prompt_size: int) -> dict:
    """The four strips of a padding prompt, N(0, 1).

    Up to ``prompt_size = image_size / 2``, where the frame covers the whole image, as the
    official PadPrompter allows (150,528 parameters at 224 px); its side strips are then empty
    and left out (orbax cannot save zero-size arrays).
    """
    if not 0 < 2 * prompt_size <= image_size:
        raise ValueError(
            f"prompt_size {prompt_size} does not fit a {image_size}px image: "
            f"need 0 < 2 * prompt_size <= image_size"
        )
    inner = image_size - 2 * prompt_size
    shapes = {
        "pad_up": (prompt_size, image_size, 3),
        "pad_down": (prompt_size, image_size, 3),
        "pad_left": (inner, prompt_size, 3),
        "pad_right": (inner, prompt_size, 3),
    }
    keys = jax.random.split(rng, len(shapes))
    return {
        name: jax.random.normal(key, shape, jnp.float32)
        for key, (name, shape) in zip(keys, shapes.items(), strict=True)
        if inner or name in ("pad_up", "pad_down")
    }


def padding_prompt(params: dict) -> jax.Array:
    """Assemble the ``(S, S, 3)`` frame: strips on the border, zeros inside."""
    if "pad_left" not in params:  # prompt_size = S / 2: top and bottom strips meet
        return jnp.concatenate([params["pad_up"], params["pad_down"]], axis=0)
    inner = params["pad_left"].shape[0]
    centre = jnp.zeros((inner, inner, 3), params["pad_left"].dtype)
    middle = jnp.concatenate([params["pad_left"], centre, params["pad_right"]], axis=1)
    return jnp.concatenate([params["pad_up"], middle, params["pad_down"]], axis=0)


def init_patch(rng: jax.Array, image_size: int, prompt_size: int) -> dict:
    """One ``(p, p, 3)`` patch, N(0, 1); ``p < S`` so a random location exists."""
    if not 0 < prompt_size < image_size:
        raise ValueError(
            f"prompt_size {prompt_size} does not fit a {image_size}px image: "
            f"need 0 < prompt_size < image_size"
        )
    return {"patch": jax.random.normal(rng, (prompt_size, prompt_size, 3), jnp.float32)}


def patch_prompt(params: dict, image_size: int, row=0, col=0) -> jax.Array:
    """The ``(S, S, 3)`` prompt: zeros with the patch at ``(row, col)`` (may be traced)."""
    patch = params["patch"]
    canvas = jnp.zeros((image_size, image_size, 3), patch.dtype)
    return jax.lax.dynamic_update_slice(canvas, patch, (row, col, 0))


def random_location(rng: jax.Array, image_size: int, prompt_size: int) -> jax.Array:
    """``(row, col)``, each uniform over the integers of ``[0, S - p)``."""
    return jax.random.randint(rng, (2,), 0, image_size - prompt_size)


def check_input_scale(prompter: str, prompt_size: int, image_size: int, init_scale: float):
    """Fail in one line unless AutoVP's input scale can run with these settings."""
    if prompter != "padding":
        raise InputError(
            f"vp: input_scale scales the image inside the padding prompter's frame, as AutoVP "
            f"does, and has no {prompter} form: use prompter=padding or drop input_scale"
        )
    if not 0 < 2 * prompt_size < image_size:
        raise InputError(
            f"vp: with input_scale the image shrinks to image_size - 2 * prompt_size, which "
            f"prompt_size {prompt_size} leaves empty at {image_size}px: choose a prompt_size "
            f"from 1 to {(image_size - 1) // 2} ({input_scaling.autovp_prompt_size(image_size)} is "
            f"AutoVP's 128 of 224)"
        )
    low, high = input_scaling.SCALE_RANGE
    if not low <= init_scale <= high:
        raise InputError(
            f"vp: init_scale {init_scale} is outside AutoVP's clamp [{low}, {high}]: choose one "
            f"inside (AutoVP's default: {input_scaling.INIT_SCALE})"
        )


@dataclasses.dataclass(frozen=True)
class VisualPrompt(Method):
    has_pictures = True

    prompt_size: int = 30
    prompter: str = "padding"
    input_scale: bool = False
    init_scale: float = input_scaling.INIT_SCALE
    scale_grad_clip: float = input_scaling.GRAD_CLIP

    def __post_init__(self):
        if self.prompter not in PROMPTERS:
            raise ValueError(f"unknown prompter {self.prompter!r}; valid choices: {PROMPTERS}")
        if self.input_scale:
            check_input_scale(
                self.prompter, self.prompt_size, self.backbone.image_size, self.init_scale
            )
            if not self.scale_grad_clip > 0:
                raise InputError(
                    f"vp: scale_grad_clip {self.scale_grad_clip} must be positive (AutoVP's: "
                    f"{input_scaling.GRAD_CLIP:.3g})"
                )

    def init(self, rng, backbone_params):
        prompt_rng, head_rng = jax.random.split(rng)
        head, head_frozen = self.init_head(head_rng)
        size = self.backbone.image_size
        if self.input_scale:
            prompter = {
                "canvas": jax.random.normal(prompt_rng, (size, size, 3), jnp.float32),
                "scale": jnp.asarray(self.init_scale, jnp.float32),
            }
        elif self.prompter == "padding":
            prompter = init_padding(prompt_rng, size, self.prompt_size)
        else:
            prompter = init_patch(prompt_rng, size, self.prompt_size)
        trained = {
            "prompter": prompter,
            **head,
        }
        return {"params": trained}, {"backbone": backbone_params, **head_frozen}

    def prompt(self, prompter_params: dict, rng: jax.Array | None) -> jax.Array:
        """The ``(S, S, 3)`` pixel prompt for one forward pass."""
        if self.prompter == "padding":
            return padding_prompt(prompter_params)
        if self.prompter == "fixed_patch":
            return patch_prompt(prompter_params, self.backbone.image_size)
        if rng is None:
            raise ValueError("the random_patch prompter needs an rng, at evaluation too")
        row, col = random_location(rng, self.backbone.image_size, self.prompt_size)
        return patch_prompt(prompter_params, self.backbone.image_size, row, col)

    def inputs(self, prompter_params: dict, images, rng) -> tuple[jax.Array, jax.Array]:
        """``(images, prompt)``: the images as the backbone gets them (scaled inside the canvas
        with ``input_scale``) and the ``(S, S, 3)`` prompt added to each."""
        if not self.input_scale:
            return images, self.prompt(prompter_params, rng).astype(images.dtype)
        scale = input_scaling.bounded_scale(prompter_params["scale"], self.scale_grad_clip)
        size = self.backbone.image_size
        scaled = input_scaling.scale_in_canvas(
            images, self.prompt_size, scale, self.backbone.normalization
        )
        mask = input_scaling.border_mask(scale, size - 2 * self.prompt_size, size)
        prompt = prompter_params["canvas"] * mask
        return scaled.astype(images.dtype), prompt.astype(images.dtype)

    def visualize(self, trained, frozen, images, *, rng=None):
        """The prompted images the backbone sees, for pictures."""
        del frozen
        images, prompt = self.inputs(trained["params"]["prompter"], images, rng)
        return {"prompted": images + prompt}

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        # The prompt does not depend on ``train`` (the random patch moves at evaluation too);
        # the backbone always runs in eval mode.
        del train, epoch
        params = trained["params"]
        images, prompt = self.inputs(params["prompter"], images, rng)
        # The backbone's output for images + prompt, with the prompt embedded once for the batch.
        features, out = self.backbone.features(frozen["backbone"], images, pixel_prompt=prompt)
        return self.head_logits(params, frozen, features), out
