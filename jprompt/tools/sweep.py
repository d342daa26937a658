r"""Expand a config file's ``sweep(add, arg, name)`` into runs: print them, or run them here.

    python -m jprompt.tools.sweep --config=configs/vpt.py:dataset=vtab/dtd,deep --sweep=lr_wd \
        --seeds=0,1,2 --workdir=/tmp/vpt_dtd                 # prints one command per run
    python -m jprompt.tools.sweep ... --run                        # runs them one after another
    python -m jprompt.tools.sweep ... --config.num_epochs=1        # extra overrides for every run
    python -m jprompt.tools.sweep --config=configs/linear_probe.py:backbone=clip_b16,\
dataset=coop/dtd --shots=1,2,4,8,16 --fewshot_seeds=1,2,3 --workdir=/tmp/dtd_fewshot

A config file may define ``sweep(add, arg=None, name=...)`` (without one, and without
``--sweep``, the config runs as it is): it calls ``add(arg=None, **fields)`` once per run,
where ``arg`` replaces the config arg (e.g. another ``num_tokens``) and
``fields`` override config fields by dotted name (``**{"optim.lr": 0.1}``). Every run is
repeated for each of ``--seeds``. CoOp's few-shot protocol (``jprompt.data.fewshot``): ``--shots``
repeats every run for each number of shots (the config arg ``shots``), and ``--fewshot_seeds``
for each of CoOp's draws (the config arg ``fewshot_seed``) instead of ``--seeds``: as in CoOp's
runs, one seed picks the images and seeds the training (``config.seed``). Each run gets its own
work directory under ``--workdir``, ``<config>.<arg>/<overrides>/seed_<s>`` (the arg without
the few-shot seed, which ``seed_<s>`` names), holding a ``run.json`` (what was run, with the full
config) beside the trainer's ``results.json``; ``python -m jprompt.tools.tables`` reads them. Every
run's config is built and its overrides applied before anything runs, so a typo fails at once.
A run whose ``results.json`` exists is skipped; an interrupted one resumes.
"""

import argparse
import dataclasses
import json
import pathlib
import re
import shlex
import sys

from ml_collections import ConfigDict

from jprompt.errors import InputError
from jprompt.train import config_lib

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class Run:
    config_file: str
    arg: str
    overrides: dict  # dotted field -> value, from the sweep (seed included)
    extra: dict  # dotted field -> text, from the command line, for every run
    workdir: str

    def command(self) -> str:
        config = f"{self.config_file}:{self.arg}" if self.arg else self.config_file
        words = ["python", "-m", "jprompt.main", f"--config={config}"]
        words += [f"--config.{k}={_to_text(v)}" for k, v in self.overrides.items()]
        words += [f"--config.{k}={v}" for k, v in self.extra.items()]
        return shlex.join([*words, f"--workdir={self.workdir}"])


def _to_text(value) -> str:
    return str(value) if not isinstance(value, tuple) else repr(value)


def build_config(run: Run) -> ConfigDict:
    spec = f"{run.config_file}:{run.arg}" if run.arg else run.config_file
    return config_lib.load(spec, {**run.overrides, **run.extra})


def _dir_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text) or "base"


def expand(config_file, arg, sweep_name, seeds, root, extra, shots=(), fewshot_seeds=()):
    """The runs of ``sweep_name`` (None: the file's default) x ``shots`` x ``seeds``, or x
    ``fewshot_seeds`` (each the run's few-shot seed and training seed) where given, each validated
    by building its config."""
    module = config_lib.load_module(config_file)
    points = []

    def add(arg=arg, **fields):
        points.append((arg or "", fields))

    if hasattr(module, "sweep"):
        module.sweep(add, arg or None, **({"name": sweep_name} if sweep_name else {}))
    elif sweep_name:
        raise ValueError(f"{config_file} defines no sweep(add, arg, name) for --sweep={sweep_name}")
    else:  # the config as it is, for the seeds and shots
        add()
    runs = []
    stem = pathlib.Path(config_file).stem
    draws = [(f"fewshot_seed={s}", s) for s in fewshot_seeds] or [("", s) for s in seeds]
    for point_arg, fields in points:
        setting = _dir_name(",".join(f"{k}={_to_text(v)}" for k, v in fields.items()))
        for shots_arg in [config_lib.with_args(point_arg, shots=k) for k in shots] or [point_arg]:
            group = _dir_name(f"{stem}.{shots_arg}" if shots_arg else stem)
            for draw, seed in draws:
                workdir = pathlib.Path(root) / group / setting / f"seed_{seed}"
                run_arg = ",".join(filter(None, [shots_arg, draw]))
                run = Run(config_file, run_arg, {**fields, "seed": seed}, extra, str(workdir))
                build_config(run)
                runs.append(run)
    return runs


def _record(run: Run, config: ConfigDict) -> None:
    workdir = pathlib.Path(run.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {**dataclasses.asdict(run), "command": run.command()}
    record["config"] = json.loads(config_lib.to_json(config))
    (workdir / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))


def run_all(runs: list[Run]) -> None:
    """Train the runs one after another in this process."""
    from jprompt.train import trainer  # JAX and the trainer only when something runs

    for i, run in enumerate(runs):
        config = build_config(run)
        _record(run, config)
        print(f"[{i + 1}/{len(runs)}] {run.command()}", flush=True)
        trainer.train_and_evaluate(config, run.workdir)


def _extra_overrides(unknown: list[str]) -> dict:
    extra = {}
    for item in unknown:
        key, has_value, value = item.partition("=")
        if not key.startswith("--config.") or not has_value:
            raise SystemExit(f"unexpected argument {item!r}; only --config.FIELD=VALUE may follow")
        extra[key.removeprefix("--config.")] = value
    return extra


def _integers(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"--{flag}={text} is not a comma-separated list of integers") from None


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:args]")
    parser.add_argument("--workdir", required=True, help="root directory of the sweep's runs")
    parser.add_argument("--sweep", default="", help="sweep name (default: the file's default)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default 0)")
    parser.add_argument("--shots", default="", help="CoOp's shots per class, e.g. 1,2,4,8,16")
    parser.add_argument(
        "--fewshot_seeds", default="", help="CoOp's few-shot seeds, e.g. 1,2,3 (not with --seeds)"
    )
    parser.add_argument("--run", action="store_true", help="run here, one after another")
    args, unknown = parser.parse_known_args(argv)
    config_file, _, arg = args.config.partition(":")
    if args.seeds and args.fewshot_seeds:
        raise SystemExit(
            "--fewshot_seeds also seeds the training (CoOp's runs use one seed for both): "
            "drop --seeds"
        )
    seeds, shots, fewshot_seeds = (
        _integers(flag, getattr(args, flag)) for flag in ("seeds", "shots", "fewshot_seeds")
    )
    extra = _extra_overrides(unknown)
    try:
        runs = expand(
            config_file, arg, args.sweep, seeds or [0], args.workdir, extra, shots, fewshot_seeds
        )
    except InputError as error:  # a config arg or field of some run
        raise SystemExit(str(error)) from None
    if args.run:
        run_all(runs)
    else:
        for run in runs:
            _record(run, build_config(run))
            print(run.command())
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
