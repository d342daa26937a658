"""Helpers shared by the tests that drive the trainer: config loading, shrinking, a few steps."""

import contextlib
import os
import pathlib
import re

import flax.linen as nn
import jax
import numpy as np

from jprompt.train import checkpoint, config_lib, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(file: str, arg: str = "demo"):
    """``get_config(arg)`` of ``configs/<file>``, as the command line would load it."""
    return config_lib.load(f"{ROOT / 'configs' / file}:{arg}")


def shrink(
    config,
    data_dir,
    *,
    num_epochs: int = 1,
    val_split: str = "validation[:64]",
    test_split: str = "test[:64]",
    warmup_steps: int = 1,
):
    """Sliced splits and batches of 64: 4 steps per epoch, fast on 2 CPU cores."""
    config.dataset.data_dir = str(data_dir)
    config.dataset.train_split = "train[:256]"
    config.dataset.val_split = val_split
    config.dataset.test_split = test_split
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_epochs = num_epochs
    config.optim.warmup_steps = warmup_steps
    return config


def run_steps(experiment, num_steps: int):
    """Train ``num_steps`` steps by hand; return the per-step losses and the final state."""
    state, losses = experiment.state, []
    batches = experiment.train_batches()
    for _ in range(num_steps):
        batch = sharding.to_global_batch(next(batches), experiment.mesh)
        state, metrics = experiment.train_step(
            state, experiment.frozen, batch, experiment.train_rng
        )
        losses.append(float(metrics.compute()["loss"]))
    return losses, state


def train_with_frozen_backbone(experiment, num_steps: int):
    """Run ``num_steps`` steps, asserting finite, changing losses and a bit-identical frozen
    tree; return the trainable tree from before (numpy) and the final state."""
    frozen_before = to_numpy(experiment.frozen)
    trained_before = to_numpy(experiment.state["trained"])
    losses, state = run_steps(experiment, num_steps)
    assert all(np.isfinite(losses)) and losses[-1] != losses[0]
    jax.tree.map(np.testing.assert_array_equal, to_numpy(experiment.frozen), frozen_before)
    return trained_before, state


def latest_trained(workdir, experiment):
    """The trainable tree of the newest checkpoint in ``workdir``, as numpy."""
    abstract = checkpoint.abstract_like(experiment.state, sharding.replicated(experiment.mesh))
    checkpoints = checkpoint.Checkpoints(workdir)
    try:
        return to_numpy(checkpoints.restore_latest(abstract)["trained"])
    finally:
        checkpoints.close()


def xla_flags_with_devices(count: int) -> str:
    """This process's ``XLA_FLAGS`` (conftest's) with ``count`` fake CPU devices instead, for a
    subprocess."""
    flag = "--xla_force_host_platform_device_count"
    return re.sub(rf"{flag}=\d+", f"{flag}={count}", os.environ["XLA_FLAGS"])


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


@contextlib.contextmanager
def module_inputs(module_type):
    """Collects, as numpy, the first argument of every call of a ``module_type`` module."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, module_type) and context.method_name == "__call__":
            seen.append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        yield seen
