"""Running ``python -m jprompt.main`` in subprocesses, for the multi-process and preemption
tests."""

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time

import helpers
import pytest

DEMO = "demo,backbone=vit_b16"  # the tiny ViT demo
TIMEOUT_S = 300  # per launch, generous for 2 busy cores; a run takes well under a minute


def demo_config(data_dir, **shrink_args):
    """The tiny ViT demo, shrunk by ``helpers.shrink``."""
    return helpers.shrink(helpers.load_config("vp.py", DEMO), data_dir, **shrink_args)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def main_command(config, workdir) -> list[str]:
    """``python -m jprompt.main`` training ``config`` (a ``demo_config``) in ``workdir``: the demo
    config file plus a ``--config.KEY=VALUE`` flag for every field ``config`` changes."""
    demo = _flatten(helpers.load_config("vp.py", DEMO).to_dict())
    changed = {k: v for k, v in _flatten(config.to_dict()).items() if demo[k] != v}
    return [
        sys.executable,
        "-m",
        "jprompt.main",
        f"--config={helpers.ROOT / 'configs' / 'vp.py'}:{DEMO}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in changed.items()),
    ]


@dataclasses.dataclass
class Launched:
    process: subprocess.Popen
    stdout: pathlib.Path
    stderr: pathlib.Path


def launch(command: list[str], logs: pathlib.Path, name: str, **env: str) -> Launched:
    """Start ``command`` with ``env`` added to the environment. Its output goes to files, not
    pipes: a full pipe would stall a process, and with it the peer waiting on its collectives."""
    stdout, stderr = logs / f"{name}.stdout", logs / f"{name}.stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=os.environ | env)
    return Launched(process, stdout, stderr)


def finish(runs: list[Launched], timeout_s: float = TIMEOUT_S) -> list[str]:
    """Wait for ``runs`` (killing them all at the deadline) and return their stdouts; fail with
    every run's exit status and stderr tail unless all exited 0."""
    deadline = time.monotonic() + timeout_s
    outcomes = []
    for run in runs:
        try:
            outcomes.append(f"exit status {run.process.wait(deadline - time.monotonic())}")
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait()
            outcomes.append(f"killed at the {timeout_s}s deadline")
    if any(run.process.returncode for run in runs):
        report = "\n".join(
            f"--- run {i}, {outcome}, stderr ends:\n"
            + "\n".join(run.stderr.read_text().splitlines()[-40:])
            for i, (run, outcome) in enumerate(zip(runs, outcomes, strict=True))
        )
        pytest.fail(f"{' '.join(runs[0].process.args)}\n{report}")
    return [run.stdout.read_text() for run in runs]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
