"""Classification heads on backbone features: the linear, zero-shot and label-mapping heads.

- Linear: ``{"kernel": (F, C), "bias": (C,)}``, trained with the method.
- Label mapping (``jprompt.methods.label_mapping``): the checkpoint's own frozen source head
  (``frozen["source_head"]``) with its logits mapped onto the target classes.
- Zero-shot (CLIP): ``{"class_embeddings": (C, E), "logit_scale": ()}`` computed once from the
  text tower (``build_zeroshot_head``) and kept frozen; logits are ``exp(logit_scale)`` times
  the cosine between the image features and each class embedding, as in the VP and PGN code.

A zero-shot head puts class names into text templates (the templates of each dataset are in
``jprompt.data.presets``). The names are first cleaned as the paper's code cleans them
(``NAME_RULES``: VP lower-cases them and turns ``_`` and ``-`` into spaces, PGN keeps the
hyphens). With several templates, each class embedding is the mean of the unit-norm template
embeddings, renormalised (CLIP's prompt ensembling).
"""

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jprompt.methods import label_mapping
from jprompt.models import clip_tokenizer
from jprompt.models.backbone import TextEncoder

HEAD_INITS = ("zeros", "vpt")
# What becomes a space, besides lower-casing: VP's refine_classname (utils.py) replaces "_" and
# "-"; PGN's datamodules replace "_" only ("polka-dotted" stays hyphenated).
NAME_RULES = {"vp": r"[_-]", "pgn": r"_"}


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


def apply_zeroshot_head(variables: dict, features: jax.Array) -> jax.Array:
    features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    cosine = features @ variables["class_embeddings"].astype(features.dtype).T
    return jnp.exp(variables["logit_scale"]) * cosine


def head_logits(params: dict, frozen: dict, features: jax.Array) -> jax.Array:
    """The head a method's trees hold: the frozen ``frozen["zeroshot_head"]`` if there is one, a
    label mapping if there is a ``frozen["source_head"]``, else the trained linear
    ``params["head"]`` (see ``jprompt.methods.base``)."""
    if "zeroshot_head" in frozen:
        return apply_zeroshot_head(frozen["zeroshot_head"], features)
    if "source_head" in frozen:
        return label_mapping.mapped_logits(params, frozen, features)
    return apply_linear_head(params["head"], features)


def clean_class_name(name: str, rule: str = "vp") -> str:
    """``"Golden_Retriever"`` -> ``"golden retriever"``; ``rule`` is a key of ``NAME_RULES``."""
    if rule not in NAME_RULES:
        raise ValueError(f"unknown class-name rule {rule!r}; valid choices: {list(NAME_RULES)}")
    return re.sub(r"\s+", " ", re.sub(NAME_RULES[rule], " ", name.lower())).strip()


def class_embeddings(
    text: TextEncoder, class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """``(C, E)`` unit-norm class embeddings for ``class_names`` (already clean)."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    tokenizer = text.tokenizer or clip_tokenizer.load_default()
    prompts = [template.format(name) for name in class_names for template in templates]
    features = text.encode(tokenizer(prompts)).reshape(len(class_names), len(templates), -1)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    mean = features.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def build_zeroshot_head(
    text: TextEncoder | None,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    backbone_name: str,
    name_rule: str = "vp",
) -> ZeroShotHead:
    """The frozen zero-shot head for ``class_names`` (raw dataset names, cleaned here by
    ``name_rule``) put into ``templates``; ``text`` is the backbone's text tower."""
    if text is None:
        raise ValueError(
            f"a zero-shot head needs a backbone with a text tower (clip_*, or siglip_* with "
            f"its tokenizer); {backbone_name} has none. Use head.name='linear' or such a backbone"
        )
    names = [clean_class_name(name, name_rule) for name in class_names]
    logging.info(
        "Zero-shot head: %d classes x %d templates, e.g. %r",
        len(names),
        len(templates),
        templates[0].format(names[0]),
    )
    embeddings = class_embeddings(text, names, templates)
    return ZeroShotHead(class_embeddings=embeddings, logit_scale=text.logit_scale)
