"""``host_memory.keep_freed_memory``: after it, a typical training step takes no page faults
once the first steps have run; without it, glibc returns the step's memory and every step faults
it in again (the control, run the same way)."""

import os
import pathlib
import subprocess
import sys

import pytest

from jprompt.train import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Median page faults of 16 gradient steps after four warm-up steps, in a fresh process (the
# settings must come before JAX starts its backend), with XLA's default flags as the trainer runs
# (not conftest's). The step is a small tanh MLP on 4096 x 512 activations, 8 MiB buffers that
# XLA:CPU mallocs and frees as it does a ViT step's, in seconds rather than a ViT's compile. The
# median, because with the settings an odd early step still grows the heap once (XLA's threads
# free and allocate in a different order each step, so the heap reaches its final size over some
# steps: 0 to 2 of the 16 measured ones in 8 runs).
PROBE = """
import resource, sys
from jprompt.train import host_memory
if sys.argv[1] == "keep" and not host_memory.keep_freed_memory():
    sys.exit("no mallopt")
import jax, jax.numpy as jnp

inputs = jnp.ones((4096, 512))
def loss(weight):
    hidden = inputs
    for _ in range(4):
        hidden = jnp.tanh(hidden @ weight)
    return hidden.sum()
step = jax.jit(jax.grad(loss))
weight = jnp.full((512, 512), 1e-3)
for _ in range(4):
    jax.block_until_ready(step(weight))
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(weight))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])
"""


def _step_page_faults(mode: str) -> int:
    env = os.environ | {"XLA_FLAGS": ""}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, env=env
    )
    if "no mallopt" in run.stderr:
        pytest.skip("this C library has no mallopt (not glibc)")
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1])


def test_a_step_reuses_the_memory_it_freed():
    kept = _step_page_faults("keep")
    default = _step_page_faults("default")
    assert default > 5_000, default  # the phenomenon: the step's memory faulted in again
    assert kept < 500, kept


def test_hosts_with_an_accelerator_plugin_keep_glibc_defaults(monkeypatch):
    def must_not_run():
        raise AssertionError("applied on an accelerator host")

    monkeypatch.setattr(host_memory, "keep_freed_memory", must_not_run)
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: ["cuda"])
    assert host_memory.keep_freed_memory_on_cpu_hosts() is False
