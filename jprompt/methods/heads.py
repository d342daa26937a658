"""Classification heads on backbone features, as plain functions of their parameters.

- Linear: ``{"kernel": (F, C), "bias": (C,)}``, trained with the method.
- Zero-shot (CLIP): ``{"class_embeddings": (C, E), "logit_scale": ()}`` computed once from the
  text tower (``jprompt.methods.zeroshot``) and kept frozen; logits are ``exp(logit_scale)`` times
  the cosine between the image features and each class embedding, as in the VP and PGN code.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

HEAD_INITS = ("zeros", "vpt")


def init_linear_head(rng, in_features: int, num_classes: int, kind: str = "zeros") -> dict:
    """Parameters ``{"kernel": (in, C), "bias": (C,)}``.

    ``zeros``: kernel and bias zero, the vit_jax fine-tuning head.
    ``vpt``:   He-normal kernel with fan_out, bias ``-log(99)`` (a 1% prior per class), as the
               official VPT code initialises its classifier.
    """
    if kind == "zeros":
        kernel = jnp.zeros((in_features, num_classes), jnp.float32)
        bias = jnp.zeros((num_classes,), jnp.float32)
    elif kind == "vpt":
        std = math.sqrt(2.0 / num_classes)
        kernel = std * jax.random.normal(rng, (in_features, num_classes), jnp.float32)
        bias = jnp.full((num_classes,), -math.log(99.0), jnp.float32)
    else:
        raise ValueError(f"unknown head init {kind!r}; valid choices: {HEAD_INITS}")
    return {"kernel": kernel, "bias": bias}


def apply_linear_head(params: dict, features: jax.Array) -> jax.Array:
    return features @ params["kernel"].astype(features.dtype) + params["bias"]


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroShotHead:
    """A frozen CLIP text classifier: unit-norm class embeddings and CLIP's logit scale."""

    class_embeddings: np.ndarray  # (C, E), rows of unit L2 norm
    logit_scale: float

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    def variables(self) -> dict:
        return {
            "class_embeddings": jnp.asarray(self.class_embeddings, jnp.float32),
            "logit_scale": jnp.asarray(self.logit_scale, jnp.float32),
        }


def head_logits(params: dict, frozen: dict, features: jax.Array) -> jax.Array:
    """The head a method's trees hold: the frozen ``frozen["zeroshot_head"]`` if there is one,
    else the trained linear ``params["head"]`` (see ``jprompt.methods.base``)."""
    if "zeroshot_head" in frozen:
        return apply_zeroshot_head(frozen["zeroshot_head"], features)
    return apply_linear_head(params["head"], features)


def apply_zeroshot_head(variables: dict, features: jax.Array) -> jax.Array:
    features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    cosine = features @ variables["class_embeddings"].astype(features.dtype).T
    return jnp.exp(variables["logit_scale"]) * cosine
