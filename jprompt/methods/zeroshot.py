"""Zero-shot CLIP heads: class names times templates through the text tower, computed once.

Class names are cleaned as the paper's code cleans them (``NAME_RULES``: VP lower-cases them and
turns ``_`` and ``-`` into spaces, PGN keeps the hyphens) and put into a template ("This is a
photo of a {}"; some datasets have their own, below). With
several templates, each class embedding is the mean of the unit-norm template embeddings,
renormalised (CLIP's prompt ensembling). The result is a frozen ``heads.ZeroShotHead``.
"""

import re
from collections.abc import Sequence

import numpy as np
from absl import logging

from jprompt.methods.heads import ZeroShotHead
from jprompt.models import clip_tokenizer
from jprompt.models.backbones import TextEncoder

DEFAULT_TEMPLATES = ("This is a photo of a {}",)
# tfds builder name -> templates the papers' code uses for it instead of the default.
DATASET_TEMPLATES = {
    "cifar100": ("A photo of a {}",),
    "clevr": ("This is a photo of {} objects",),
}


def templates_for(dataset: str) -> tuple[str, ...]:
    """The templates for a tfds name such as ``cifar100`` or ``jprompt_shapes/colors``."""
    builder = dataset.split("/")[0].split(":")[0]
    return DATASET_TEMPLATES.get(builder, DEFAULT_TEMPLATES)


def clean_class_name(name: str, rule: str = "vp") -> str:
    """``"Golden_Retriever"`` -> ``"golden retriever"``; ``rule`` is a key of ``NAME_RULES``."""
    if rule not in NAME_RULES:
        raise ValueError(f"unknown class-name rule {rule!r}; valid choices: {list(NAME_RULES)}")
    return re.sub(r"\s+", " ", re.sub(NAME_RULES[rule], " ", name.lower())).strip()


# What becomes a space, besides lower-casing: VP's refine_classname (utils.py) replaces "_" and
# "-"; PGN's datamodules replace "_" only ("polka-dotted" stays hyphenated).
NAME_RULES = {"vp": r"[_-]", "pgn": r"_"}


def class_embeddings(
    text: TextEncoder, class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """``(C, E)`` unit-norm class embeddings for ``class_names`` (already clean)."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    tokenizer = clip_tokenizer.load_default()
    prompts = [template.format(name) for name in class_names for template in templates]
    features = text.encode(tokenizer(prompts)).reshape(len(class_names), len(templates), -1)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    mean = features.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def build_head(
    text: TextEncoder | None,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    backbone_name: str,
    name_rule: str = "vp",
) -> ZeroShotHead:
    """The frozen zero-shot head for ``class_names`` (raw dataset names, cleaned here by
    ``name_rule``)."""
    if text is None:
        raise ValueError(
            f"a zero-shot head needs a backbone with a text tower (a clip_* backbone); "
            f"{backbone_name} has none. Use head.name='linear' or a CLIP backbone"
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
