r"""Transfer table: every method adapting a shipped pretrained tiny backbone to the offline targets.

The backbones (``jprompt/assets/{vit,clip}_tiny4_shapes.npz``) were trained from scratch on the
``jprompt_shapes/shapes`` source task (``python -m jprompt.tools.pretrain_demo``). Each method's
``demo`` config adapts one to each target task of ``jprompt_shapes``; the script prints one row
per (method, target): trainable parameters, test accuracy (of the best-validation state) and
wall time of the whole run (compilation included). On the tiny CLIP the methods work through
its frozen zero-shot head (the linear probe trains a linear one), as in the VP and PGN papers.

    python benchmarks/transfer.py --workdir=/tmp/transfer [--targets=colors,count,textures] \
        [--backbone=clip_tiny4]
"""

import dataclasses
import json
import pathlib
import time

from absl import app, flags

from jprompt.data import presets
from jprompt.train import config_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all runs (one subdirectory each).")
_TARGETS = flags.DEFINE_list("targets", ["colors", "count", "textures"], "jprompt_shapes configs.")
_METHODS = flags.DEFINE_list("methods", None, "Subset of the rows' labels (default: all).")
_BACKBONE = flags.DEFINE_enum("backbone", "vit_tiny4", ["vit_tiny4", "clip_tiny4"], "Backbone.")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    config_file: str
    arg: str = "demo"


ROWS = (
    Row("linear probe", "linear_probe.py"),
    Row("full fine-tune", "finetune.py"),
    Row("VP padding", "vp.py"),
    Row("VP fixed patch", "vp.py", "demo,prompter=fixed_patch"),
    Row("VP random patch", "vp.py", "demo,prompter=random_patch"),
    Row("VPT shallow", "vpt.py"),
    Row("VPT deep", "vpt.py", "demo,deep"),
    Row("PGN", "pgn.py"),
    Row("learned tokens", "pgn.py", "demo,baseline"),
    Row("AdaViPro", "adavipro.py"),
    Row("EVP", "evp.py"),
    Row("LoR-VP", "lor_vp.py"),
    Row("VFPT shallow", "vfpt.py"),
    Row("VFPT deep", "vfpt.py", "demo,deep"),
    Row("VPT shallow + SPT init", "vpt.py", "demo,spt"),
    Row("E2VPT", "e2vpt.py"),
)


def load_config(row: Row, target: str, backbone: str):
    config = config_lib.load(f"{ROOT / 'configs' / row.config_file}:{row.arg},backbone={backbone}")
    preset = presets.get(f"jprompt_shapes/{target}")
    config.dataset.update(name=preset.tfds_spec, preset=preset.name, num_classes=preset.num_classes)
    return config


def main(argv):
    del argv
    rows = [r for r in ROWS if not _METHODS.value or r.label in _METHODS.value]
    table = []
    for target in _TARGETS.value:
        for row in rows:
            label = row.label.replace(" ", "_")
            workdir = pathlib.Path(_WORKDIR.value) / _BACKBONE.value / f"{target}-{label}"
            timing = workdir / "wall_seconds.json"
            # A finished run found in the workdir is reused: its time is known only if this
            # script trained it (the time of merely reloading its results would mean nothing).
            trained_here = not (workdir / "results.json").exists()
            start = time.perf_counter()
            config = load_config(row, target, _BACKBONE.value)
            results = trainer.train_and_evaluate(config, str(workdir))
            if trained_here:
                timing.write_text(json.dumps(time.perf_counter() - start))
            seconds = json.loads(timing.read_text()) if timing.exists() else None
            table.append(
                dict(
                    target=target,
                    method=row.label,
                    trainable_params=results["trainable_params"],
                    test_accuracy=results["test"]["accuracy"],
                    seconds=seconds,
                )
            )
    (pathlib.Path(_WORKDIR.value) / f"transfer_{_BACKBONE.value}.json").write_text(
        json.dumps(table, indent=2)
    )
    print("\n| target | method | trainable params | test accuracy | wall time (s) |")
    print("|---|---|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['target']} | {r['method']} | {r['trainable_params']:,} | "
            f"{r['test_accuracy']:.3f} | "
            + ("—" if r["seconds"] is None else f"{r['seconds']:.0f}")
            + " |"
        )


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
