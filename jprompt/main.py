"""Command line: ``python -m jprompt.main --config=configs/vp.py:demo --workdir=/tmp/vp``.

All logic lives in ``jprompt.train.trainer``; this file only parses flags. A multi-process job runs
the same command on every process (see ``jprompt.train.distributed`` for how processes find each
other), e.g. two processes on one machine:

    python -m jprompt.main ... --coordinator_address=127.0.0.1:1234 --num_processes=2 \
        --process_id=0 &
    python -m jprompt.main ... --coordinator_address=127.0.0.1:1234 --num_processes=2 \
        --process_id=1
"""

import json
import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jprompt.train import distributed, host_memory, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with args: configs/vp.py:backbone=vit_s16,demo",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 in a multi-process job (default: $JPROMPT_COORDINATOR_ADDRESS, "
    "else detected on TPU/SLURM/Open MPI, else one process)",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (default: $JPROMPT_NUM_PROCESSES or detected)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: $JPROMPT_PROCESS_ID or detected)"
)
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(std_logging.Filter):
    """Drop orbax's per-file INFO chatter (hundreds of lines per run); keep its warnings."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    host_memory.keep_freed_memory_on_cpu_hosts()  # before the backend starts its threads
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("JAX devices: %s", jax.devices())
    results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        if "test" in results:
            print(f"Final test accuracy: {results['test']['accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main)
