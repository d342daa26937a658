"""Mixture names: ``mix/<preset>+<preset>+...`` (``jprompt.data.mixture`` reads them).

Pure, without TensorFlow, so that config files can check and expand a mixture name.
"""

import difflib

from jprompt.data import presets

PREFIX = "mix/"
SAMPLINGS = ("proportional", "uniform")
ROLES = ("train", "val", "test", "trainval")
TEMPLATES = presets.DEFAULT_TEMPLATES
_USAGE = "write mix/<preset>+<preset>[+...], e.g. mix/jprompt_shapes/colors+jprompt_shapes/count"


def is_mixture(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> tuple[presets.Preset, ...]:
    """The presets of mixture ``name``, in order; a bad name fails saying what is wrong."""
    if not is_mixture(name):
        raise ValueError(f"{name!r} is not a mixture; {_USAGE}")
    names = name[len(PREFIX) :].split("+")
    if not all(names):
        raise ValueError(f"mixture {name!r} has an empty component; {_USAGE}")
    for component in names:
        if component not in presets.PRESETS:
            close = [p for p in presets.PRESETS if p.endswith(f"/{component}")]
            close = close or difflib.get_close_matches(component, list(presets.PRESETS), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(
                f"unknown preset {component!r} in mixture {name!r}{hint} A component is a "
                "jprompt.data.presets name, e.g. cifar10 or jprompt_shapes/colors"
            )
    if len(names) < 2:
        raise ValueError(
            f"mixture {name!r} has one component; name two or more, or train on it alone "
            f"with dataset={names[0]}"
        )
    if len(set(names)) < len(names):
        raise ValueError(f"mixture {name!r} names a preset twice; name each component once")
    return tuple(presets.PRESETS[n] for n in names)
