"""Multi-process training: two processes with two CPU devices each, joined through gloo on
127.0.0.1, train like one process with four devices fed the same global batches.
"""

import json

import helpers
import jax
import numpy as np
from launch import demo_config, finish, free_port, launch, main_command

from jprompt.data import pipeline
from jprompt.train import trainer


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
            XLA_FLAGS=helpers.xla_flags_with_devices(2),
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
    expected = trainer.train_and_evaluate(config, str(tmp_path / "one"), devices=four_devices)

    # Every example counted once; the same best step and test accuracy; losses and parameters
    # equal to float32 rounding (relative 1e-4, absolute 1e-6): gloo sums the gradients across
    # processes in another order than one process does.
    for split, size in (("val", 64), ("test", 99)):
        assert got[split]["num_examples"] == expected[split]["num_examples"] == size
        assert got[split]["accuracy"] == expected[split]["accuracy"]
        np.testing.assert_allclose(got[split]["loss"], expected[split]["loss"], rtol=1e-4)
    assert got["best_step"] == expected["best_step"]
    experiment = trainer.create_experiment(config, devices=four_devices)
    trained = helpers.latest_trained(workdir, experiment)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        trained,
        helpers.latest_trained(tmp_path / "one", experiment),
    )
    initial = helpers.to_numpy(experiment.state["trained"])
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, trained, initial)))  # it trained
