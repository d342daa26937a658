"""Linear classification heads on backbone features, as plain functions of a params dict."""

import math

import jax
import jax.numpy as jnp

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
