"""Kill-safe exact resume: after SIGKILL at an arbitrary moment, after SIGTERM, and from a damaged
latest checkpoint, a resumed run ends bit-identical to one never interrupted.

Every run here uses the 8 fake CPU devices of conftest (subprocesses inherit XLA_FLAGS), so
"identical" means identical bits. Runs last 3 epochs of 4 steps, with checkpoints at steps 4, 8
and 12: a signal sent once step 4's checkpoint is committed lands in the middle of the run.
"""

import json
import signal
import time

import helpers
import jax
import numpy as np
import pytest
from launch import TIMEOUT_S, demo_config, finish, launch, main_command

from jprompt.train import trainer


@pytest.fixture(scope="module")
def config(shapes_data_dir):
    return demo_config(shapes_data_dir, num_epochs=3)


@pytest.fixture(scope="module")
def experiment(config):
    """For the layout of restored states."""
    return trainer.create_experiment(config)


@pytest.fixture(scope="module")
def uninterrupted(config, experiment, tmp_path_factory):
    """``(results, final trainable tree)`` of the run never interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    results = trainer.train_and_evaluate(config, str(workdir))
    return results, helpers.latest_trained(workdir, experiment)


def assert_ends_like_uninterrupted(results, workdir, experiment, uninterrupted):
    expected_results, expected_trained = uninterrupted
    assert results == expected_results
    trained = helpers.latest_trained(workdir, experiment)
    jax.tree.map(np.testing.assert_array_equal, trained, expected_trained)


def committed_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def start_past_first_checkpoint(config, workdir, logs):
    """``python -m jprompt.main`` training ``config``, returned once step 4 is committed."""
    run = launch(main_command(config, workdir), logs, "run")
    deadline = time.monotonic() + TIMEOUT_S
    while not (workdir / "checkpoints" / "4").is_dir():
        if run.process.poll() is not None or time.monotonic() > deadline:
            finish([run], timeout_s=0)  # fails, showing its stderr, unless it exited 0
            pytest.fail("the run ended before its first checkpoint was committed")
        time.sleep(0.02)
    return run


def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(
    config, experiment, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    run = start_past_first_checkpoint(config, workdir, tmp_path)
    run.process.kill()
    assert run.process.wait() == -signal.SIGKILL  # killed while still running, not done
    assert not (workdir / "results.json").exists()

    resumed = trainer.train_and_evaluate(config, str(workdir))  # a new process, as after a crash
    assert_ends_like_uninterrupted(resumed, workdir, experiment, uninterrupted)
    # A save the kill interrupted left a temporary directory; the resumed run removed it.
    assert not list(workdir.glob("*/*.orbax-checkpoint-tmp*"))


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(
    config, experiment, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    run = start_past_first_checkpoint(config, workdir, tmp_path)
    run.process.send_signal(signal.SIGTERM)
    [stdout] = finish([run])  # exit status 0
    stopped = json.loads(stdout)
    assert stopped["preempted"] is True
    step = stopped["stopped_at_step"]
    assert 4 <= step < stopped["total_steps"] == 12
    assert committed_steps(workdir)[-1] == step  # written and committed before the exit
    assert not list(workdir.glob("*/*.orbax-checkpoint-tmp*"))

    resumed = trainer.train_and_evaluate(config, str(workdir))
    assert_ends_like_uninterrupted(resumed, workdir, experiment, uninterrupted)


# A failed orbax restore leaves tensorstore reads completing into its closed event loop, which
# Python reports as an unraisable exception; expected here, harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_checkpoint_falls_back_to_previous(
    config, experiment, uninterrupted, tmp_path, caplog
):
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(config, str(workdir), max_steps=8)
    assert committed_steps(workdir) == [4, 8]
    # Truncate the array data of step 8, as an interrupted copy or a failing disk would.
    data_files = list((workdir / "checkpoints" / "8" / "state" / "d").iterdir())
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with caplog.at_level("WARNING"):
        resumed = trainer.train_and_evaluate(config, str(workdir))
    assert "Could not restore the checkpoint at step 8" in caplog.text
    assert "falling back to the previous one" in caplog.text
    assert_ends_like_uninterrupted(resumed, workdir, experiment, uninterrupted)
    assert committed_steps(workdir) == [8, 12]  # the damaged step was deleted and redone

    # With every kept checkpoint damaged, the run stops and deletes nothing.
    for path in (workdir / "checkpoints").glob("*/state/d/*"):
        path.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"none of the checkpoints .* \(steps \[12, 8\]\)"):
        trainer.train_and_evaluate(config, str(workdir))
    assert committed_steps(workdir) == [8, 12]
