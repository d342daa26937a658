"""Joining a multi-process JAX job (TPU pods, multi-node GPU, several CPU processes).

Every process runs the same program. ``initialize`` must run before anything touches a device:
afterwards ``jax.devices()`` lists the devices of all processes, and one mesh spans them.

The job is described, in this order of precedence, by
  1. explicit values (``main.py``'s ``--coordinator_address``, ``--num_processes``,
     ``--process_id`` flags), or the environment variables ``JPROMPT_COORDINATOR_ADDRESS``,
     ``JPROMPT_NUM_PROCESSES``, ``JPROMPT_PROCESS_ID``; values left out are filled in by JAX
     (the address from ``JAX_COORDINATOR_ADDRESS``, the rest from a detected cluster);
  2. JAX's own ``JAX_COORDINATOR_ADDRESS``, or a cluster environment JAX detects by itself
     (Cloud TPU VMs, SLURM, Open MPI, Kubernetes JobSets; see ``jax.distributed.initialize``):
     JAX then finds every value itself;
  3. none of these: one process, nothing to join.
"""

import os

import jax
import numpy as np
from absl import logging
from jax._src import clusters
from jax.experimental import multihost_utils

ENV_PREFIX = "JPROMPT_"


def _cluster_environment() -> str | None:
    """The cluster JAX would bootstrap from with no arguments, or None.

    JAX has no public query for this; its ``ClusterEnv`` registry is exactly what
    ``jax.distributed.initialize()`` consults, so asking it keeps the two decisions in step.
    """
    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def _job_source(explicit: bool) -> str | None:
    """What describes the job (for the log), or None for a single process."""
    if explicit:
        return "explicit values"
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        return "$JAX_COORDINATOR_ADDRESS"
    return _cluster_environment()


def _from_env(name: str, value, convert=str):
    if value is not None:
        return value
    text = os.environ.get(ENV_PREFIX + name.upper())
    return None if text is None else convert(text)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join the multi-process job described by the arguments, the environment or the cluster.

    On CPU the processes need a collectives backend to talk to each other; gloo is chosen (it is
    harmless on GPU/TPU, and older JAX releases default to none).
    """
    coordinator_address = _from_env("coordinator_address", coordinator_address)
    num_processes = _from_env("num_processes", num_processes, int)
    process_id = _from_env("process_id", process_id, int)
    source = _job_source((coordinator_address, num_processes, process_id) != (None,) * 3)
    if source is None:
        logging.info("Single process: no coordinator given and no cluster environment detected")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logging.info(
        "Joined a %d-process job as process %d (described by %s); devices: %d local, %d global",
        jax.process_count(),
        jax.process_index(),
        source,
        jax.local_device_count(),
        jax.device_count(),
    )


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is True on any process; the same answer on every process.

    Every process must call it at the same point (it is a collective). With one process it is
    ``flag`` itself, at no cost.
    """
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())
