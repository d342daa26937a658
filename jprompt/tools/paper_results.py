"""Numbers the papers report, with their source, for ``jprompt.tools.tables`` to print beside ours.

Top-1 accuracy in percent. ``benchmark`` is a preset name (one dataset) or a preset group
(``vtab-natural`` ...: the mean over that group's tasks, as VPT reports it). Only numbers read
in the papers are here; a method/benchmark pair a paper does not report is simply absent.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class PaperResult:
    method: str  # a label of ``method_label``
    benchmark: str  # preset name or preset group
    backbone: str  # jprompt backbone name the paper's number was measured with
    accuracy: float
    source: str
    protocol: str  # the jprompt.train.protocols name a run must follow to be compared with it


_VPT = "Jia et al. 2022 (VPT), Table 1: ViT-B/16 ImageNet-21k"
_VPT_TABLE_1 = {
    # method: (FGVC, VTAB natural, VTAB specialized, VTAB structured)
    "full fine-tune": (88.54, 75.88, 83.36, 47.64),
    "linear": (79.32, 68.93, 77.16, 26.84),
    "VPT-shallow": (84.62, 76.81, 79.66, 46.98),
    "VPT-deep": (89.11, 78.48, 82.43, 54.98),
}
_VPT_BENCHMARKS = ("fgvc", "vtab-natural", "vtab-specialized", "vtab-structured")
_ADAVIPRO = (
    "Yang et al. 2024 (AdaViPro), results at prompt size 30 (via METHODS.md; backbone assumed "
    "to be VP's CLIP ViT-B/32)"
)

RESULTS = tuple(
    PaperResult(method, benchmark, "vit_b16", accuracy, _VPT, "vpt")
    for method, row in _VPT_TABLE_1.items()
    for benchmark, accuracy in zip(_VPT_BENCHMARKS, row, strict=True)
) + (
    PaperResult("AdaViPro", "cifar10", "clip_b32", 95.4, _ADAVIPRO, "adavipro"),
    PaperResult("AdaViPro", "eurosat", "clip_b32", 96.8, _ADAVIPRO, "adavipro"),
)


def lookup(method: str, benchmark: str) -> PaperResult | None:
    """The paper's number for ``method`` on ``benchmark``, if a paper reports one."""
    for result in RESULTS:
        if result.method == method and result.benchmark == benchmark:
            return result
    return None


_LABELS = {
    "linear_probe": "linear",
    "finetune": "full fine-tune",
    "pgn": "PGN",
    "prompt_tokens": "learned tokens",
    "adavipro": "AdaViPro",
    "zeroshot": "zero-shot",
}


def method_label(config: dict) -> str:
    """The method as the papers name it, from a run's config (a dict)."""
    method = config["method"]
    name = method["name"]
    if name == "vpt":
        return "VPT-deep" if method.get("deep") else "VPT-shallow"
    if name == "vp":
        prompter = method.get("prompter", "padding")
        return "VP" if prompter == "padding" else f"VP ({prompter.replace('_', ' ')})"
    return _LABELS.get(name, name)
