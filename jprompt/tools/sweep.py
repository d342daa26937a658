r"""Expand a config file's ``sweep(add, arg, name)`` into runs: print them, or run them here.

    python -m jprompt.tools.sweep --config=configs/vpt.py:dataset=vtab/dtd,deep --sweep=lr_wd \
        --seeds=0,1,2 --workdir=/tmp/vpt_dtd                 # prints one command per run
    python -m jprompt.tools.sweep ... --run                        # runs them one after another
    python -m jprompt.tools.sweep ... --config.num_epochs=1        # extra overrides for every run

A config file defines ``sweep(add, arg=None, name=...)``: it calls ``add(arg=None, **fields)``
once per run, where ``arg`` replaces the config arg (e.g. another ``num_tokens``) and
``fields`` override config fields by dotted name (``**{"optim.lr": 0.1}``). Every run is
repeated for each of ``--seeds``. Each run gets its own work directory under ``--workdir``,
``<config>.<arg>/<overrides>/seed_<s>``, holding a ``run.json`` (what was run, with the full
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


def expand(config_file, arg, sweep_name, seeds, root, extra) -> list[Run]:
    """The runs of ``sweep_name`` (None: the file's default) x ``seeds``, each validated by
    building its config."""
    module = config_lib.load_module(config_file)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{config_file} defines no sweep(add, arg, name)")
    points = []

    def add(arg=arg, **fields):
        points.append((arg or "", fields))

    module.sweep(add, arg or None, **({"name": sweep_name} if sweep_name else {}))
    runs = []
    stem = pathlib.Path(config_file).stem
    for point_arg, fields in points:
        group = _dir_name(f"{stem}.{point_arg}" if point_arg else stem)
        setting = _dir_name(",".join(f"{k}={_to_text(v)}" for k, v in fields.items()))
        for seed in seeds:
            workdir = pathlib.Path(root) / group / setting / f"seed_{seed}"
            run = Run(config_file, point_arg, {**fields, "seed": seed}, extra, str(workdir))
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


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:args]")
    parser.add_argument("--workdir", required=True, help="root directory of the sweep's runs")
    parser.add_argument("--sweep", default="", help="sweep name (default: the file's default)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--run", action="store_true", help="run here, one after another")
    args, unknown = parser.parse_known_args(argv)
    config_file, _, arg = args.config.partition(":")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    extra = _extra_overrides(unknown)
    runs = expand(config_file, arg, args.sweep, seeds, args.workdir, extra)
    if args.run:
        run_all(runs)
    else:
        for run in runs:
            _record(run, build_config(run))
            print(run.command())
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
