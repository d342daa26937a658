"""Sweeps run end to end on the offline dataset, and the table aggregates their seeds."""

import csv
import hashlib
import json
import pathlib
import statistics

import numpy as np
import pytest

from jprompt.models import backbones
from jprompt.tools import sweep, tables
from jprompt.train import config_lib, protocols
from tests.helpers import ROOT


def test_sweep_runs_seeds_and_table_aggregates(shapes_data_dir, tmp_path, capsys):
    root = tmp_path / "sweep"
    shrink = [
        "--config.num_epochs=1",
        "--config.dataset.train_split=train[:128]",
        "--config.dataset.val_split=validation[:64]",
        "--config.dataset.test_split=test[:64]",
        "--config.batch_size=64",
        "--config.eval_batch_size=64",
        f"--config.dataset.data_dir={shapes_data_dir}",
    ]
    config = f"--config={ROOT / 'configs' / 'vpt.py'}:demo"
    common = [config, "--sweep=seeds", "--seeds=0,1", f"--workdir={root}"]
    printed = sweep.main(common + shrink)  # printing only: nothing trains
    assert len(printed) == 2 and not list(root.rglob("results.json"))
    commands = capsys.readouterr().out.splitlines()
    assert commands[1].startswith("python -m jprompt.main --config=")
    assert (
        "--config.seed=1" in commands[1]
        and "'--config.dataset.train_split=train[:128]'" in (commands[1])
    )

    sweep.main(common + shrink + ["--run"])
    results = [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]
    assert len(results) == 2 and all(r["total_steps"] == 2 for r in results)
    # Each run carries its protocol card: the demo follows no paper's protocol; the card names
    # the shipped checkpoint by file name and content.
    asset = ROOT / "jprompt" / "assets" / "vit_tiny4_shapes.npz"
    for r in results:
        report = r["protocol"]
        assert report["name"] == "" and "differences" not in report
        assert report["card"]["backbone.checkpoint_file"] == asset.name
        assert report["card"]["backbone.checkpoint_sha256"] == (
            hashlib.sha256(asset.read_bytes()).hexdigest()
        )
        assert report["card"]["input.normalization"] == "minus_one_to_one"  # resolved from ""
        assert report["card"]["steps_per_epoch"] == 2 and "accuracy" in r["test_last"]
    tests = [100 * r["test"]["accuracy"] for r in results]

    text = tables.main([str(root), "--format=csv"])
    header, row = [line.split(",") for line in text.strip().splitlines()]
    assert header[:8] == [
        "method",
        "dataset",
        "backbone",
        "setting",
        "seeds",
        "val",
        "test",
        "selected",
    ]
    assert row[:5] == ["VPT-shallow", "jprompt_shapes/colors", "vit_tiny4", "demo", "2"]
    assert row[6] == f"{statistics.fmean(tests):.2f} ± {statistics.stdev(tests):.2f}"
    assert row[7] == "yes"


def _card(arg: str) -> dict:
    """The protocol card a run of ``configs/vpt.py:<arg>`` writes (checkpoint hash aside)."""
    config = config_lib.load(f"{ROOT / 'configs' / 'vpt.py'}:{arg}")
    return protocols.card(
        config.to_dict(),
        activation=backbones.activation(config.backbone),
        normalization=config.input.normalization,
        checkpoint_sha256="",
    )


def _fake_run(root, setting, seed, preset, val, test, card_arg):
    workdir = root / setting / f"seed_{seed}"
    workdir.mkdir(parents=True)
    config = {"method": {"name": "vpt", "deep": True}, "dataset": {"preset": preset}}
    run = {"arg": setting, "overrides": {"seed": seed}, "config": config}
    results = {"backbone": "vit_b16", "val": {"accuracy": val}, "test": {"accuracy": test}}
    results["protocol"] = {"name": "vpt", "card": _card(card_arg)}
    (workdir / "run.json").write_text(json.dumps(run))
    (workdir / "results.json").write_text(json.dumps(results))


def test_table_selects_on_validation_and_averages_vtab_groups(tmp_path):
    natural = [n for n in tables.presets.VTAB_TASKS if n in _NATURAL]
    for i, preset in enumerate(natural):
        # "a" is better on validation, "b" on test: the honest selection is "a". Both are VPT's
        # final runs (train800val200, the last epoch), with one seed of VPT's five.
        final = f"dataset={preset},deep,trainval"
        _fake_run(tmp_path, f"a,dataset={preset}", 0, preset, 0.9, 0.5 + i / 100, final)
        _fake_run(tmp_path, f"b,dataset={preset}", 0, preset, 0.8, 0.9, final)
    rows = tables.collect(tmp_path)
    selected = [r for r in rows if r.selected]
    assert len(selected) == 7 and all(r.setting.startswith("a,") for r in selected)
    assert all(r.setting.startswith("b,") for r in rows if r.test_selected)
    groups = tables.group_table(rows)
    expected = statistics.fmean(50 + i for i in range(7))
    assert groups[1][:5] == ["VPT-deep", "vtab-natural", "vit_b16", "7", f"{expected:.2f}"]
    assert groups[1][5].startswith("78.48 (Jia et al. 2022 (VPT), Table 1")
    assert groups[1][5].endswith("; 1 of the paper's 5 seeds)")
    markdown = tables.main([str(tmp_path), "--test_selected"])
    assert "best on test (optimistic)" in markdown.splitlines()[0]


def test_table_refuses_a_paper_number_to_runs_off_its_protocol(tmp_path):
    natural = [n for n in tables.presets.VTAB_TASKS if n in _NATURAL]
    for preset in natural:
        # Tuning runs (train800, selected on val200), and one task on the augreg checkpoint.
        arg = f"dataset={preset},deep"
        _fake_run(tmp_path, f"a,dataset={preset}", 0, preset, 0.9, 0.5, arg)
    rows = tables.collect(tmp_path)
    refusal = tables.group_table(rows)[1][5]
    assert refusal == (
        "not comparable: vtab/caltech101: not the vpt protocol (dataset.train_split, selection)"
    )
    card = _card("dataset=vtab/dtd,deep,trainval,backbone=vit_b16")
    card["backbone.checkpoint_file"] = "B_16-i21k-300ep-lr_0.001-aug_medium1.npz"
    card["backbone.activation"] = "gelu_tanh"
    assert protocols.differences(card, "vpt") == [
        "backbone.checkpoint_file: 'B_16-i21k-300ep-lr_0.001-aug_medium1.npz' "
        "(paper: 'ViT-B_16.npz')",
        "backbone.activation: 'gelu_tanh' (paper: 'gelu_exact')",
    ]


_NATURAL = {
    "vtab/caltech101",
    "vtab/cifar100",
    "vtab/dtd",
    "vtab/oxford_flowers102",
    "vtab/oxford_iiit_pet",
    "vtab/svhn",
    "vtab/sun397",
}


def test_fewshot_sweep_runs_each_shots_and_draw_with_its_seed(tmp_path, capsys):
    config = f"--config={ROOT / 'configs' / 'zeroshot.py'}:dataset=coop/dtd"  # no sweep()
    runs = sweep.main([config, "--shots=1,16", "--fewshot_seeds=1,2,3", f"--workdir={tmp_path}"])
    # CoOp's runs: one seed draws the shots and seeds the training.
    assert [(r.arg, r.overrides) for r in runs[:3]] == [
        (f"dataset=coop/dtd,shots=1,fewshot_seed={s}", {"seed": s}) for s in (1, 2, 3)
    ]
    assert len(runs) == 6 and runs[5].arg == "dataset=coop/dtd,shots=16,fewshot_seed=3"
    assert runs[5].workdir == str(
        tmp_path / "zeroshot.dataset=coop_dtd,shots=16" / "base" / "seed_3"
    )
    recorded = json.loads((pathlib.Path(runs[5].workdir) / "run.json").read_text())
    assert recorded["config"]["dataset"]["train_split"] == "train_16shot_seed3"
    assert "--config.seed=3 --workdir=" in capsys.readouterr().out.splitlines()[5]
    with pytest.raises(SystemExit, match="^--fewshot_seeds also seeds the training"):
        sweep.main([config, "--seeds=0", "--fewshot_seeds=1", f"--workdir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"^shots=3 is not one of CoOp's \[1, 2, 4, 8, 16\]"):
        sweep.main([config, "--shots=3", f"--workdir={tmp_path}"])


def test_table_gives_fewshot_rows_coops_mean_and_std(tmp_path):
    tests = {1: [0.40, 0.52, 0.45], 16: [0.60, 0.62, 0.67]}
    for shots, accuracies in tests.items():
        for seed, test in zip((1, 2, 3), accuracies, strict=True):
            workdir = tmp_path / f"shots={shots}" / f"seed_{seed}"
            workdir.mkdir(parents=True)
            config = {"method": {"name": "vp"}, "dataset": {"preset": "coop/dtd", "shots": shots}}
            arg = f"dataset=coop/dtd,shots={shots},fewshot_seed={seed}"
            run = {"arg": arg, "overrides": {"seed": seed}, "config": config}
            results = {"backbone": "clip_b32", "val": {"accuracy": 0.5}, "test": {"accuracy": test}}
            (workdir / "run.json").write_text(json.dumps(run))
            (workdir / "results.json").write_text(json.dumps(results))
    text = tables.main([str(tmp_path), "--format=csv"])
    rows = list(csv.reader(text.strip().splitlines()[1:]))
    assert [row[3:5] for row in rows] == [
        ["dataset=coop/dtd,shots=1", "3"],
        ["dataset=coop/dtd,shots=16", "3"],
    ]
    for row, shots in zip(rows, (1, 16), strict=True):
        percent = 100 * np.array(tests[shots])
        assert row[6] == f"{percent.mean():.2f} ± {percent.std(ddof=0):.2f}"  # CoOp's np.std
        assert row[7] == "yes"  # each number of shots has its own selection
