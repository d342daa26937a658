"""E2VPT's pruning tool end to end on the tiny demo: a first-stage run, its scores and grid, one
rewind command run as the command line runs it, the choice by the official rule, bad input."""

import json
import shlex

import jax
import numpy as np
import pytest

from jprompt import main as cli
from jprompt.methods import e2vpt
from jprompt.tools import e2vpt_prune
from jprompt.train import config_lib, events, protocols, trainer
from jprompt.train.sharding import replicated
from tests.helpers import ROOT, latest_trained, load_config, shrink

SPEC = f"{ROOT / 'configs' / 'e2vpt.py'}:demo"
# The official determine_mask_sequence by hand. P=5, MIN_NUMBER_CLS_TOKEN=1: int(5 * {10..90}
# / 100) = 0,1,1,2,2,3,3,4,4. S=16, MIN_NUMBER_CLS_TOKEN_PIECE=4: 1,3,4,6,8,9,11,12, then 14 >
# 16 - 4, so 12 and stop.
TOKEN_COUNTS = (0, 1, 2, 3, 4)
PIECE_COUNTS = (1, 3, 4, 6, 8, 9, 11, 12)


@pytest.fixture(scope="module")
def first_stage(shapes_data_dir, tmp_path_factory):
    """A finished one-epoch first stage: 200 training examples at batch 64, the last batch
    padded with 56 blanks (drop_last=False)."""
    config = shrink(load_config("e2vpt.py"), shapes_data_dir)
    config.dataset.train_split = "train[:200]"
    config.input.drop_last = False
    workdir = tmp_path_factory.mktemp("e2vpt_first_stage")
    trainer.train_and_evaluate(config, str(workdir))
    return config, workdir


def lowest_by_hand(scores, count):
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count])


def test_scores_grid_and_a_rewind_command(first_stage, capsys):
    config, workdir = first_stage
    record = e2vpt_prune.main([f"--workdir={workdir}", f"--config={SPEC}"])
    commands = capsys.readouterr().out.splitlines()
    assert commands == [s["command"] for s in record["settings"]] and len(commands) == 40

    # The scores: importance_scores of the last state over the first epoch's real examples.
    experiment = trainer.create_experiment(config)
    # Laid out as the tool restores it: the same program, compiled once.
    trained = jax.device_put(latest_trained(workdir, experiment), replicated(experiment.mesh))
    iterator = experiment.train_batches()
    batches = [next(iterator) for _ in range(experiment.steps_per_epoch)]
    assert batches[-1]["mask"].sum() == 8  # 200 = 3 x 64 + 8
    real = [(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0]) for b in batches]
    expected = e2vpt.importance_scores(experiment.method, trained, experiment.frozen, real)
    written = json.loads((workdir / e2vpt_prune.SCORES_FILE).read_text())
    assert written["step"] == 4
    for name in ("token_mask", "piece_mask"):
        np.testing.assert_allclose(written[name], expected[name], rtol=1e-6, atol=1e-12)

    # The grid: every count pair, the lowest scores pruned, as written to rewind_grid.json.
    assert json.loads((workdir / e2vpt_prune.GRID_FILE).read_text()) == record
    settings = {(s["tokens"], s["pieces"]): s for s in record["settings"]}
    assert sorted(settings) == [(t, s) for t in TOKEN_COUNTS for s in PIECE_COUNTS]
    token_scores = np.asarray(written["token_mask"])[:, 0]
    for (tokens, pieces), setting in settings.items():
        assert setting["pruned_tokens"] == lowest_by_hand(token_scores, tokens)
        assert setting["pruned_pieces"] == [
            lowest_by_hand(row, pieces) for row in written["piece_mask"]
        ]
        assert setting["workdir"] == str(workdir / "rewind" / f"tokens_{tokens}_pieces_{pieces}")

    # One command, read as python -m jprompt.main reads it: the first stage's config, rewound.
    setting = settings[2, 4]
    words = shlex.split(setting["command"])
    assert words[:4] == ["python", "-m", "jprompt.main", f"--config={SPEC}"]
    assert words[-1] == f"--workdir={setting['workdir']}"
    rewind = cli.load_config(SPEC, words[4:-1])
    first, second = (protocols.flatten(json.loads(config_lib.to_json(c))) for c in (config, rewind))
    changed = {k: second[k] for k in first if first[k] != second[k]}
    assert changed == {
        "method.rewind": True,
        "method.pruned_tokens": setting["pruned_tokens"],
        "method.pruned_pieces": setting["pruned_pieces"],
    }
    result = trainer.train_and_evaluate(rewind, setting["workdir"], max_steps=1)
    assert result["stopped_at_step"] == 1
    rewound = trainer.create_experiment(rewind)
    token_mask = np.ones((5, 1))
    token_mask[setting["pruned_tokens"]] = 0
    masks = jax.tree.map(np.asarray, rewound.frozen["prompt_masks"])
    np.testing.assert_array_equal(masks["token_mask"], token_mask)
    assert (masks["piece_mask"] == 0).sum(1).tolist() == [4] * 5
    assert "token_mask" not in latest_trained(setting["workdir"], rewound)["params"]["prompter"]


def write_run(run_dir, *, val: float, best_step: int = 10, final_val: float | None = None):
    run_dir.mkdir(parents=True)
    results = {"total_steps": 10, "best_step": best_step, "val": {"accuracy": val}}
    (run_dir / "results.json").write_text(json.dumps(results))
    if final_val is not None:  # the last epoch's validation, as the trainer logs it
        writer = events.Writer(run_dir)
        writer.write_scalars(best_step, {"val_accuracy": val})
        writer.write_scalars(10, {"val_accuracy": final_val})
        writer.close()


def test_select_takes_the_best_final_validation_ties_to_more_pruning(tmp_path, capsys):
    runs = {  # (tokens, pieces): final validation accuracy
        (0, 1): 0.5,
        (1, 12): 0.75,  # tied: fewer tokens, though more pieces, loses
        (3, 1): 0.75,
        (3, 4): 0.75,  # tied at 3 tokens: more pieces wins
    }
    settings = []
    for (tokens, pieces), val in runs.items():
        run_dir = tmp_path / f"tokens_{tokens}_pieces_{pieces}"
        write_run(run_dir, val=val)
        settings.append(dict(tokens=tokens, pieces=pieces, workdir=str(run_dir)))
    # Its best epoch beats them all, its last epoch does not: the official reads the last.
    write_run(tmp_path / "best_epoch_only", val=0.9, best_step=5, final_val=0.6)
    settings.append(dict(tokens=4, pieces=8, workdir=str(tmp_path / "best_epoch_only")))
    for s in settings:
        s |= dict(pruned_tokens=list(range(s["tokens"])), pruned_pieces=[[0]] * 5)
    (tmp_path / "rewind_grid.json").write_text(json.dumps({"settings": settings}))

    chosen = e2vpt_prune.main([f"--workdir={tmp_path}", "--select"])
    assert (chosen["tokens"], chosen["pieces"], chosen["val_accuracy"]) == (3, 4, 0.75)
    assert capsys.readouterr().out.splitlines()[1] == (
        "final runs: add --config.method.rewind=True '--config.method.pruned_tokens=(0, 1, 2)' "
        "'--config.method.pruned_pieces=((0,), (0,), (0,), (0,), (0,))'"
    )

    (tmp_path / "tokens_0_pieces_1" / "results.json").unlink()
    with pytest.raises(SystemExit, match=r"^1 of the 5 rewind runs are not finished \(no "):
        e2vpt_prune.main([f"--workdir={tmp_path}", "--select"])


def test_bad_workdirs_fail_in_one_line(tmp_path):
    def fails(saved, message, results=True):
        workdir = tmp_path / str(len(list(tmp_path.iterdir())))
        workdir.mkdir()
        if saved is not None:
            (workdir / "config.json").write_text(json.dumps(saved))
        if results:
            (workdir / "results.json").write_text("{}")
        with pytest.raises(SystemExit, match=message):
            e2vpt_prune.main([f"--workdir={workdir}"])
        assert not (workdir / e2vpt_prune.GRID_FILE).exists()

    fails(None, r"holds no run \(no config.json\): pass the --workdir of a finished")
    fails({"method": {"name": "vpt"}}, r"holds a 'vpt' run, not E2VPT")
    fails({"method": {"name": "e2vpt", "rewind": True}}, r"is a rewind run .* \(rewind=False\)$")
    fails({"method": {"name": "e2vpt", "rewind": False}}, r"unfinished run", results=False)
    with pytest.raises(SystemExit, match="--select reads rewind_grid.json of --workdir alone"):
        e2vpt_prune.main([f"--workdir={tmp_path}", "--select", "--run"])
    with pytest.raises(SystemExit, match="has no rewind_grid.json: write it first"):
        e2vpt_prune.main([f"--workdir={tmp_path}", "--select"])
