"""CoOp's few-shot protocol (Zhou et al. 2022, github.com/KaiyangZhou/CoOp): K training images per
class drawn from a split file's train list, and min(K, 4) validation images per class from its
val list, for K in 1, 2, 4, 8, 16 and seeds 1, 2, 3 (CoOp's scripts/coop/main.sh).

``select`` restates what CoOp's run does, step by step, so that a seed picks the same images:

1. train.py seeds Python's ``random`` with the run's seed (Dassl's ``set_random_seed``: also
   numpy's and torch's generators, which the draw does not use). Nothing draws from ``random``
   before the dataset is built (logger, environment report, trainer, data manager).
2. The dataset reads the split file's ``train``, ``val`` and ``test`` lists in file order
   (``OxfordPets.read_split``; every CoOp split-file dataset uses it).
3. ``generate_fewshot_dataset(train, num_shots=K)`` (Dassl's ``DatasetBase``) groups the items
   by label, labels in the order of their first item, items in list order
   (``split_dataset_by_label``), and takes ``random.sample(items, K)`` of each group, or all of
   a group with fewer than K items (``repeat=False``: no draw, no error), the groups one after
   another.
4. The same call on the val list with ``min(K, 4)``, continuing the same generator.

CoOp caches the draw in ``split_fewshot/shot_K-seed_S.pkl``; the cache holds the same draw.
The images are selected by this restatement, the training itself is jprompt's: CoOp trains with
its own seed too, so a few-shot sweep (``python -m jprompt.tools.sweep --fewshot_seeds=1,2,3``)
gives ``config.seed`` the few-shot seed as well, but torch's and jprompt's generators differ.

The builders of CoOp's split files prepare one tfds split per (K, seed) beside the full ones
(``split_name``), and a config's split strings name them (``fewshot_split``).
"""

import random
import re
from collections.abc import Sequence

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
VAL_SHOTS = 4  # CoOp validates on min(K, 4) images per class
# The tfds splits of CoOp's builders that have few-shot draws (of the split file's train and
# val lists), in the order ``select`` returns them.
DRAWN_SPLITS = ("train", "validation")
_FEWSHOT_SUFFIX = re.compile(r"_\d+shot_seed\d+$")


def split_name(split: str, shots: int, seed: int) -> str:
    """The tfds split holding ``split``'s few-shot draw: ``train_16shot_seed1``."""
    return f"{split}_{shots}shot_seed{seed}"


def per_class(items: Sequence[Sequence], shots: int, rng: random.Random) -> list:
    """Dassl's ``generate_fewshot_dataset`` of one list: ``shots`` items of each label (item[1]),
    labels in order of first appearance, or all items of a label that has fewer."""
    by_label: dict[int, list] = {}
    for item in items:
        by_label.setdefault(int(item[1]), []).append(item)
    chosen = []
    for group in by_label.values():
        chosen.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return chosen


def select(train: Sequence, val: Sequence, shots: int, seed: int) -> tuple[list, list]:
    """The train and val items CoOp's run with ``DATASET.NUM_SHOTS=shots`` and ``--seed seed``
    selects from a split file's ``train`` and ``val`` lists (``[path, label, class name]``)."""
    rng = random.Random(seed)  # the state random.seed(seed) gives the module's generator
    chosen_train = per_class(train, shots, rng)
    return chosen_train, per_class(val, min(shots, VAL_SHOTS), rng)


def fewshot_split(expression: str, shots: int, seed: int) -> str:
    """``expression`` (a tfds split string, e.g. ``train+validation[:50%]``) with each of the
    full train and validation splits, or another draw of them, replaced by its draw for
    (``shots``, ``seed``); other splits (``test``) stay."""
    parts = []
    for part in expression.split("+"):
        name, bracket, rest = part.partition("[")
        base = _FEWSHOT_SUFFIX.sub("", name.strip())
        if base in DRAWN_SPLITS:
            name = split_name(base, shots, seed)
        parts.append(name + bracket + rest)
    return "+".join(parts)


def problem(shots: int, seed: int) -> str:
    """Why (``shots``, ``seed``) is not a draw CoOp's protocol has ("" if it is; 0 shots: the
    full splits)."""
    if shots == 0:
        return ""
    if shots not in SHOTS:
        return (
            f"shots={shots} is not one of CoOp's {list(SHOTS)} (images per class; 0 = the full "
            "training split)"
        )
    if seed not in SEEDS:
        return f"fewshot_seed={seed} is not one of CoOp's seeds {list(SEEDS)}"
    return ""
