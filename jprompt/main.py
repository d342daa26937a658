"""Command line: ``python -m jprompt.main --config=configs/vp.py:demo --workdir=/tmp/vp``.

All logic lives in ``jprompt.train``; this file only parses flags.
"""

import json
import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jprompt import train

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with args: configs/vp.py:backbone=vit_s16,demo",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(std_logging.Filter):
    """Drop orbax's per-file INFO chatter (hundreds of lines per run); keep its warnings."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    logging.info("JAX devices: %s", jax.devices())
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
        if "test" in results:
            print(f"Final test accuracy: {results['test']['accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main)
