"""VP: visual prompting with a learned pixel frame (Bahng et al. 2022).

The padding prompter learns a frame of width ``prompt_size`` around the image: top and bottom
strips ``(p, S, 3)`` and left and right strips ``(S - 2p, p, 3)``; the inside is zero. It is added
to every image of the batch in the backbone's *normalized* input space, without clamping, as in
the official code; parameters are drawn from N(0, 1). At S=224, p=30 that is 69,840 parameters.

Head: with a vision-only backbone this implementation trains a linear head on the frozen
features next to the prompt (the head VPT uses); the paper's CLIP setting with a frozen zero-shot
text head arrives with the CLIP backbone.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jprompt.methods import heads
from jprompt.methods.base import Method


def init_padding(rng: jax.Array, image_size: int, prompt_size: int) -> dict:
    """The four strips of a padding prompt, N(0, 1)."""
    if not 0 < 2 * prompt_size < image_size:
        raise ValueError(
            f"prompt_size {prompt_size} does not fit a {image_size}px image: "
            f"need 0 < 2 * prompt_size < image_size"
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
    }


def padding_prompt(params: dict) -> jax.Array:
    """Assemble the ``(S, S, 3)`` frame: strips on the border, zeros inside."""
    inner = params["pad_left"].shape[0]
    centre = jnp.zeros((inner, inner, 3), params["pad_left"].dtype)
    middle = jnp.concatenate([params["pad_left"], centre, params["pad_right"]], axis=1)
    return jnp.concatenate([params["pad_up"], middle, params["pad_down"]], axis=0)


@dataclasses.dataclass(frozen=True)
class VisualPrompt(Method):
    prompt_size: int = 30
    head_init: str = "zeros"

    def init(self, rng, backbone_params):
        prompt_rng, head_rng = jax.random.split(rng)
        trained = {
            "prompter": init_padding(prompt_rng, self.backbone.image_size, self.prompt_size),
            "head": heads.init_linear_head(
                head_rng, self.backbone.feature_dim, self.num_classes, self.head_init
            ),
        }
        return {"params": trained}, {"backbone": backbone_params}

    def apply(self, trained, frozen, images, *, rng, train, epoch=0):
        del (
            rng,
            train,
            epoch,
        )  # The padding prompt is deterministic; the backbone runs in eval mode.
        params = trained["params"]
        prompted = images + padding_prompt(params["prompter"]).astype(images.dtype)
        features, out = self.backbone.features(frozen["backbone"], prompted)
        return heads.apply_linear_head(params["head"], features), out
