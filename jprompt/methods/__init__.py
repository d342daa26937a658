"""Prompt methods by name, one module each; every one follows ``jprompt.methods.base.Method``.

Importing this package loads no method: ``build`` imports the module of the one it makes, so that
importing one piece (``jprompt.methods.gumbel``, one method) loads only what that piece needs.
"""

import dataclasses
import importlib

# name -> (module under jprompt.methods, class)
METHODS: dict[str, tuple[str, str]] = {
    "linear_probe": ("linear", "LinearProbe"),
    "finetune": ("finetune", "FineTune"),
    "vp": ("vp", "VisualPrompt"),
    "pgn": ("pgn", "PromptGenerationNetwork"),
    "prompt_tokens": ("pgn", "LearnedTokens"),
    "adavipro": ("adavipro", "AdaViPro"),
    "vpt": ("vpt", "VisualPromptTuning"),
    "zeroshot": ("linear", "ZeroShot"),
    "lor_vp": ("lor_vp", "LowRankVisualPrompt"),
    "evp": ("evp", "EnhancedVisualPrompt"),
    "vfpt": ("vfpt", "VisualFourierPromptTuning"),
    "e2vpt": ("e2vpt", "E2VPT"),
}


def method_class(name: str) -> type:
    """The ``Method`` subclass registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {sorted(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build(name: str, *, backbone, num_classes: int, **options):
    """Instantiate method ``name`` with its ``options``; unknown names or options fail clearly."""
    cls = method_class(name)
    valid = {f.name for f in dataclasses.fields(cls)} - {"backbone", "num_classes"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {unknown}; valid options: {sorted(valid)}"
        )
    return cls(backbone=backbone, num_classes=num_classes, **options)
