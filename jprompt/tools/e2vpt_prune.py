r"""E2VPT's pruning after its first-stage run: importance scores, the rewind grid, the choice.

    python -m jprompt.main --config=configs/e2vpt.py:dataset=vtab/dtd --workdir=/tmp/e2vpt_dtd
    python -m jprompt.tools.e2vpt_prune --workdir=/tmp/e2vpt_dtd \
        --config=configs/e2vpt.py:dataset=vtab/dtd      # scores + grid; one command per setting
    python -m jprompt.tools.e2vpt_prune --workdir=/tmp/e2vpt_dtd --config=... --run
                                                        # ... and trains them here, then --select
    python -m jprompt.tools.e2vpt_prune --workdir=/tmp/e2vpt_dtd --select   # the chosen setting

The steps of ``jprompt.methods.e2vpt`` (its docstring), as the official
tune_vtab_PruningRewind_CVK.py runs them after its ``before_pruning`` run:

- Scores (step 2): the finished first-stage run (``method.rewind=False``) in ``--workdir`` is
  restored at its last step, as the official ``calculate_importance`` loads ``last_model.pth``
  (not the best-validation state), and ``e2vpt.importance_scores`` runs over one epoch of its
  training batches (its pipeline, augmentation and seed; the model in eval mode). Examples that
  pad the last batch (``input.drop_last=False``) are left out: that batch counts with its own
  examples' mean, as the official loader's last partial batch. Written to
  ``WORKDIR/e2vpt_scores.json``.
- Grid (step 3): ``e2vpt.rewind_grid`` of the scores, 40 settings at P=5, S=16. Each is a rewind
  run (step 4) of the first stage's config with ``method.rewind=True`` and the setting's
  ``pruned_tokens`` / ``pruned_pieces``, in ``--rewind_dir`` (default ``WORKDIR/rewind``)
  ``/tokens_<t>_pieces_<s>``. ``WORKDIR/rewind_grid.json`` lists every setting with its
  ``python -m jprompt.main`` command. The commands start from ``--config`` (default: the spec of
  the ``run.json`` that ``jprompt.tools.sweep`` left in the workdir, else ``configs/e2vpt.py``)
  and set every field in which the workdir's saved config differs from it, so each rewind run
  has the first stage's config (lr, wd, seed, splits ...) but for the three rewind fields;
  passing the first stage's ``--config`` keeps them short. ``--run`` trains them one after
  another here (a finished one is skipped, an interrupted one resumes), then selects.
- Selection (``--select``, the official ``find_best_MtMtp``): the setting whose run ends with
  the best validation accuracy at its last epoch (not the best epoch's: the official reads the
  last epoch of ``eval_results.pth``); that is ``results.json``'s ``val`` when its best step is
  the last, else the ``val_accuracy`` TensorBoard scalar of the last step. Ties go to more pruned
  tokens; a tie at equal tokens, which the official leaves to the order its ``glob`` lists the
  files in, to more pruned pieces here. Every setting must be finished. The chosen setting's
  overrides are printed for the final runs (the official ``final_runs``: trainval, 5 seeds).

The official pruning stage trains on train / val (the first stage without ``trainval``), so that
the selection's validation split is not trained on.
"""

import argparse
import json
import shlex
import sys

import numpy as np
from etils import epath

from jprompt.errors import InputError
from jprompt.methods import e2vpt
from jprompt.tools import sweep
from jprompt.train import checkpoint, config_lib, events, protocols, sharding, trainer
from jprompt.train.workdir import CONFIG_FILE, write_json

SCORES_FILE = "e2vpt_scores.json"
GRID_FILE = "rewind_grid.json"
REWIND_DIR = "rewind"
DEFAULT_CONFIG = "configs/e2vpt.py"


def saved_config(workdir: epath.Path) -> dict:
    """The saved config of the finished first-stage E2VPT run in ``workdir``."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise InputError(
            f"{workdir} holds no run (no {CONFIG_FILE}): pass the --workdir of a finished "
            "python -m jprompt.main --config=configs/e2vpt.py:... run"
        )
    saved = json.loads(path.read_text())
    method = saved["method"]
    if method["name"] != "e2vpt":
        raise InputError(
            f"{workdir} holds a {method['name']!r} run, not E2VPT: pass the --workdir of a "
            "configs/e2vpt.py run"
        )
    if method["rewind"]:
        raise InputError(
            f"{workdir} is a rewind run (method.rewind=True: its masks were fixed, not trained): "
            "pass the --workdir of its first-stage run (rewind=False)"
        )
    if not (workdir / trainer.RESULTS_FILE).exists():
        raise InputError(
            f"{workdir} holds an unfinished run (no {trainer.RESULTS_FILE}): finish it first by "
            f"rerunning its python -m jprompt.main command with --workdir={workdir} (it resumes)"
        )
    return saved


def default_spec(workdir: epath.Path) -> str:
    """The ``--config`` of the sweep that made ``workdir``, else ``DEFAULT_CONFIG``."""
    run_file = workdir / sweep.RUN_FILE
    if not run_file.exists():
        return DEFAULT_CONFIG
    run = json.loads(run_file.read_text())
    return f"{run['config_file']}:{run['arg']}" if run["arg"] else run["config_file"]


def carried_overrides(spec: str, saved: dict, workdir) -> dict[str, str]:
    """``{field: text}``: the ``--config.FIELD=TEXT`` that turn ``spec``'s config into ``saved``
    (operational fields included: the rewind runs read the same data), checked to do so."""
    flat = protocols.flatten(saved)
    base = _flat(config_lib.load(spec))
    foreign = sorted(flat.keys() ^ base.keys())
    if foreign:
        raise InputError(
            f"--config={spec} has other fields than the run in {workdir} ({', '.join(foreign[:3])}"
            "): pass the --config it was trained with"
        )
    carried = {k: _as_text(v) for k, v in flat.items() if v != base[k]}
    rebuilt = _flat(config_lib.load(spec, carried))
    lost = sorted(k for k in flat if rebuilt[k] != flat[k])
    if lost:  # a value the command line cannot give back
        raise InputError(
            f"--config.FIELD=VALUE cannot give {', '.join(lost[:3])} of {workdir}'s config: pass "
            "the --config it was trained with"
        )
    return carried


def _flat(config) -> dict:
    return protocols.flatten(json.loads(config_lib.to_json(config)))


def _as_text(value) -> str:
    """A JSON value as ``--config.FIELD=TEXT`` reads it back (lists: tuple literals)."""
    return repr(_tuples(value)) if isinstance(value, list) else str(value)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def one_epoch(experiment: trainer.Experiment):
    """``(images, labels)`` of the first epoch's training batches, without padding examples."""
    batches = experiment.train_batches()
    for _ in range(experiment.steps_per_epoch):
        batch = next(batches)
        real = batch["mask"] > 0 if "mask" in batch else slice(None)
        yield batch["image"][real], batch["label"][real]


def last_state(experiment: trainer.Experiment, workdir: epath.Path) -> dict:
    """The state saved at the run's last step."""
    checkpoints = checkpoint.Checkpoints(workdir)
    try:
        step = checkpoints.latest_step()
        if step != experiment.total_steps:
            raise InputError(
                f"{workdir} has no checkpoint of its last step {experiment.total_steps} (latest: "
                f"{step}): the scores need the trained masks; train the run with num_epochs > 0"
            )
        replicated = sharding.replicated(experiment.mesh)
        return checkpoints.restore_latest(checkpoint.abstract_like(experiment.state, replicated))
    finally:
        checkpoints.close()


def importance(config, workdir: epath.Path) -> dict:
    """``e2vpt.importance_scores`` of the run's last state over one epoch, as lists, with the
    ``step`` of that state."""
    experiment = trainer.create_experiment(config)
    trained = last_state(experiment, workdir)["trained"]
    scores = e2vpt.importance_scores(
        experiment.method, trained, experiment.frozen, one_epoch(experiment)
    )
    lists = {name: np.asarray(scores[name]).tolist() for name in ("token_mask", "piece_mask")}
    return lists | {"step": experiment.total_steps}


def rewind_runs(spec: str, carried: dict, scores: dict, root: epath.Path) -> list[dict]:
    """Every setting of ``e2vpt.rewind_grid(scores)`` with its run, each config built."""
    config_file, _, arg = spec.partition(":")
    settings = []
    for (tokens, pieces), pruned in sorted(e2vpt.rewind_grid(scores).items()):
        overrides = {
            "method.rewind": True,
            "method.pruned_tokens": pruned["pruned_tokens"],
            "method.pruned_pieces": pruned["pruned_pieces"],
        }
        workdir = root / f"tokens_{tokens}_pieces_{pieces}"
        run = sweep.Run(config_file, arg, overrides, carried, str(workdir))
        sweep.build_config(run)  # a setting the config refuses fails before anything is written
        settings.append(
            {
                "tokens": tokens,
                "pieces": pieces,
                # As lists, the record is what GRID_FILE reads back.
                "pruned_tokens": list(pruned["pruned_tokens"]),
                "pruned_pieces": [list(p) for p in pruned["pruned_pieces"]],
                "run": run,
            }
        )
    return settings


def prepare(workdir, spec: str = "", rewind_dir: str = "") -> tuple[dict, list[sweep.Run]]:
    """Write the scores and the grid of the first-stage run in ``workdir``; return the grid's
    record and its runs."""
    workdir = epath.Path(workdir)
    saved = saved_config(workdir)
    spec = spec or default_spec(workdir)
    carried = carried_overrides(spec, saved, workdir)
    config = config_lib.load(spec, carried)
    scores = importance(config, workdir)
    root = epath.Path(rewind_dir) if rewind_dir else workdir / REWIND_DIR
    settings = rewind_runs(spec, carried, scores, root)
    record = {
        "first_stage": str(workdir),
        "config": spec,
        "overrides": carried,
        "settings": [
            {k: v for k, v in s.items() if k != "run"}
            | {"workdir": s["run"].workdir, "command": s["run"].command()}
            for s in settings
        ],
    }
    write_json(workdir / SCORES_FILE, scores)
    write_json(workdir / GRID_FILE, record)
    return record, [s["run"] for s in settings]


def final_val_accuracy(workdir: epath.Path) -> float:
    """The validation accuracy of the run's last state: ``results.json``'s when its selected
    state is the last one, else the last step's ``val_accuracy`` scalar."""
    results = json.loads((workdir / trainer.RESULTS_FILE).read_text())
    last = results["total_steps"]
    if results["best_step"] == last:
        return results["val"]["accuracy"]
    values = dict(events.read_scalars(workdir).get("val_accuracy", []))
    if last not in values:
        raise InputError(
            f"{workdir} has no validation accuracy of its last step {last} in its TensorBoard "
            "files: rerun that rewind run in a fresh workdir"
        )
    return values[last]


def select(workdir) -> dict:
    """The setting of ``workdir``'s grid whose rewind run ends best on validation (ties: more
    pruned tokens, then more pruned pieces), with ``val_accuracy`` added to each setting."""
    workdir = epath.Path(workdir)
    grid_file = workdir / GRID_FILE
    if not grid_file.exists():
        raise InputError(
            f"{workdir} has no {GRID_FILE}: write it first with python -m "
            f"jprompt.tools.e2vpt_prune --workdir={workdir} (without --select)"
        )
    settings = json.loads(grid_file.read_text())["settings"]
    missing = [s["workdir"] for s in settings if not _finished(s["workdir"])]
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(settings)} rewind runs are not finished (no "
            f"{trainer.RESULTS_FILE} in {missing[0]}{' ...' if len(missing) > 1 else ''}): run "
            f"their commands from {grid_file}, or add --run"
        )
    for setting in settings:
        setting["val_accuracy"] = final_val_accuracy(epath.Path(setting["workdir"]))
    return max(settings, key=lambda s: (s["val_accuracy"], s["tokens"], s["pieces"]))


def _finished(run_dir: str) -> bool:
    return (epath.Path(run_dir) / trainer.RESULTS_FILE).exists()


def report(chosen: dict) -> str:
    """The chosen setting and the overrides that give it to the final runs."""
    flags = shlex.join(
        [
            "--config.method.rewind=True",
            f"--config.method.pruned_tokens={_as_text(chosen['pruned_tokens'])}",
            f"--config.method.pruned_pieces={_as_text(chosen['pruned_pieces'])}",
        ]
    )
    return (
        f"chosen: {chosen['tokens']} tokens and {chosen['pieces']} pieces per token pruned, "
        f"final validation accuracy {chosen['val_accuracy']:.4f} ({chosen['workdir']})\n"
        f"final runs: add {flags}\n"
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the finished first-stage run")
    parser.add_argument(
        "--config", default="", help="its configs/e2vpt.py[:args] (default: see the docstring)"
    )
    parser.add_argument("--rewind_dir", default="", help="default: WORKDIR/rewind")
    parser.add_argument("--run", action="store_true", help="train the rewind runs here, select")
    parser.add_argument("--select", action="store_true", help="choose among the finished runs")
    args = parser.parse_args(argv)
    if args.select and (args.run or args.config or args.rewind_dir):
        raise SystemExit(f"--select reads {GRID_FILE} of --workdir alone: drop the other flags")
    try:
        if not args.select:
            record, runs = prepare(args.workdir, args.config, args.rewind_dir)
            print(f"wrote {SCORES_FILE} and {GRID_FILE} in {args.workdir}", file=sys.stderr)
            if not args.run:
                print("\n".join(s["command"] for s in record["settings"]))
                return record
            sweep.run_all(runs)
        chosen = select(args.workdir)
    except InputError as error:
        raise SystemExit(str(error)) from None
    print(report(chosen), end="")
    return chosen


if __name__ == "__main__":
    main(sys.argv[1:])
