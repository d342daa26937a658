"""Kill-safe exact resume: after SIGKILL at an arbitrary moment, after SIGTERM or Ctrl-C, and from
a damaged latest checkpoint, a resumed run ends bit-identical to one never interrupted.

Every run here uses the 8 fake CPU devices of conftest (subprocesses inherit XLA_FLAGS), so
"identical" means identical bits. Runs last 3 epochs of 4 steps, with checkpoints at steps 4, 8
and 12: a signal sent once step 4's checkpoint is committed lands in the middle of the run.
"""

import json
import os
import signal
import time

import helpers
import jax
import numpy as np
import pytest
from launch import TIMEOUT_S, demo_config, finish, launch, main_command

from jprompt.errors import InputError
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


def test_ctrl_c_checkpoints_the_current_step_then_raises_keyboard_interrupt(
    config, experiment, uninterrupted, tmp_path, monkeypatch
):
    clean_batches = trainer.Experiment.train_batches

    def ctrl_c_during_step_6(self, start_step=0):
        for step, batch in enumerate(clean_batches(self, start_step), start=start_step + 1):
            if step == 6:
                os.kill(os.getpid(), signal.SIGINT)  # handled before the step has run
            yield batch

    monkeypatch.setattr(trainer.Experiment, "train_batches", ctrl_c_during_step_6)
    handler = signal.getsignal(signal.SIGINT)
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="stopped after step 6 of 12, checkpoint saved"):
        trainer.train_and_evaluate(config, str(workdir))
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert committed_steps(workdir) == [4, 6]

    monkeypatch.undo()
    resumed = trainer.train_and_evaluate(config, str(workdir))
    assert_ends_like_uninterrupted(resumed, workdir, experiment, uninterrupted)


# A failed orbax restore leaves tensorstore reads completing into a closed event loop: they must
# not reach stderr (pytest would report them as unraisable exceptions).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
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
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        f"The checkpoint at step 8 in {workdir / 'checkpoints'} is damaged (OUT_OF_RANGE: "
    )
    assert warning.endswith("); falling back to the previous one, step 4")
    assert "\n" not in warning and len(warning) < 400  # one line, without tensorstore's spec
    assert_ends_like_uninterrupted(resumed, workdir, experiment, uninterrupted)
    assert committed_steps(workdir) == [8, 12]  # the damaged step was deleted and redone

    # With every kept checkpoint damaged, the run stops and deletes nothing.
    (workdir / "results.json").unlink()  # else the rerun returns the stored results
    for path in (workdir / "checkpoints").glob("*/state/d/*"):
        path.write_bytes(b"")
    with pytest.raises(InputError) as error:
        trainer.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert message.startswith(
        f"none of the checkpoints in {workdir / 'checkpoints'} (steps [12, 8]) can be restored "
        "(step 12: "
    )
    assert message.endswith(
        "their files are damaged, or resume_with_changes changed the shapes of the trained "
        "state; start a fresh --workdir"
    )
    assert committed_steps(workdir) == [8, 12]
