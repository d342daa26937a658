"""Multi-process training: two processes with two CPU devices each, joined through gloo on
127.0.0.1, train like one process with four devices fed the same global batches.

Also the helpers that run ``python -m jprompt.main`` in subprocesses (test_preemption.py uses
them too).
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from test_train import latest_trained

from jprompt import train
from jprompt.data import pipeline

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


def as_two_processes(iterator):
    """``pipeline.train_iterator``/``eval_iterator`` yielding what two processes feed together:
    process 0's local batch, then process 1's, as a global batch lays them out (the mesh lists
    process 0's devices first)."""

    def both(*args, **kwargs):
        shares = [iterator(*args, process_index=i, process_count=2, **kwargs) for i in range(2)]
        for local in zip(*shares, strict=True):
            yield {key: np.concatenate([batch[key] for batch in local]) for key in local[0]}

    return both


def test_two_processes_match_one_process_with_four_devices(shapes_data_dir, tmp_path, monkeypatch):
    # 99 test examples: shares of 50 and 49, each padded to two batches of 32.
    config = demo_config(shapes_data_dir, num_epochs=2, test_split="test[:99]")
    workdir = tmp_path / "two_processes"
    address = f"127.0.0.1:{free_port()}"
    runs = [
        launch(
            main_command(config, workdir),
            tmp_path,
            f"process{i}",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JPROMPT_COORDINATOR_ADDRESS=address,
            JPROMPT_NUM_PROCESSES="2",
            JPROMPT_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    stdout = finish(runs)
    got = json.loads((workdir / "results.json").read_text())
    # Process 0 alone reports (gloo prints its connections on every process).
    assert ["Final test accuracy" in out for out in stdout] == [True, False]
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1

    # One process, four devices, the same global batches: each process reads its own share of
    # the data (shuffled with its own seed), so a one-process run must read both shares.
    for name in ("train_iterator", "eval_iterator"):
        monkeypatch.setattr(pipeline, name, as_two_processes(getattr(pipeline, name)))
    four_devices = jax.devices()[:4]
    expected = train.train_and_evaluate(config, str(tmp_path / "one"), devices=four_devices)

    # Every example counted once; the same best step and test accuracy; losses and parameters
    # equal to float32 rounding (rtol 1e-5, atol 1e-6; measured: 2.4e-7 at most): gloo sums
    # the gradients across processes in another order than one process does.
    for split, size in (("val", 64), ("test", 99)):
        assert got[split]["num_examples"] == expected[split]["num_examples"] == size
        assert got[split]["accuracy"] == expected[split]["accuracy"]
        np.testing.assert_allclose(got[split]["loss"], expected[split]["loss"], rtol=1e-5)
    assert got["best_step"] == expected["best_step"]
    experiment = train.create_experiment(config, devices=four_devices)
    trained = latest_trained(workdir, experiment)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        trained,
        latest_trained(tmp_path / "one", experiment),
    )
    initial = helpers.to_numpy(experiment.state["trained"])
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, trained, initial)))  # it trained
