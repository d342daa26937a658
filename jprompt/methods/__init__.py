"""Methods by name. Each is a frozen dataclass following ``jprompt.methods.base.Method``."""

import dataclasses

from jprompt.methods.adavipro import AdaViPro
from jprompt.methods.base import Method
from jprompt.methods.finetune import FineTune
from jprompt.methods.linear import LinearProbe, ZeroShot
from jprompt.methods.pgn import LearnedTokens, PromptGenerationNetwork
from jprompt.methods.vp import VisualPrompt
from jprompt.methods.vpt import VisualPromptTuning

METHODS: dict[str, type[Method]] = {
    "linear_probe": LinearProbe,
    "finetune": FineTune,
    "vp": VisualPrompt,
    "pgn": PromptGenerationNetwork,
    "prompt_tokens": LearnedTokens,
    "adavipro": AdaViPro,
    "vpt": VisualPromptTuning,
    "zeroshot": ZeroShot,
}


def build(name: str, *, backbone, num_classes: int, **options) -> Method:
    """Instantiate method ``name`` with its ``options``; unknown names or options fail clearly."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {sorted(METHODS)}")
    cls = METHODS[name]
    valid = {f.name for f in dataclasses.fields(cls)} - {"backbone", "num_classes"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {unknown}; valid options: {sorted(valid)}"
        )
    return cls(backbone=backbone, num_classes=num_classes, **options)
