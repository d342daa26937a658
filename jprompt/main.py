r"""Command line: ``python -m jprompt.main --config=configs/vp.py:demo --workdir=/tmp/vp``.

``--config`` names a config file and its args, ``configs/FILE.py[:key=value,flag,...]``; each file
lists its args in its docstring (configs/*.py). Single fields are overridden after it with
``--config.FIELD=VALUE``, e.g. ``--config.optim.lr=0.5 --config.num_epochs=3``.

All logic lives in ``jprompt.train.trainer``; this file only parses flags. Bad input (a config
arg or field, a checkpoint file) ends in one line naming the problem and the fix. A
multi-process job runs the same command on every process (see ``jprompt.train.distributed`` for
how processes find each other), e.g. two processes on one machine:

    python -m jprompt.main ... --coordinator_address=127.0.0.1:1234 --num_processes=2 \
        --process_id=0 &
    python -m jprompt.main ... --coordinator_address=127.0.0.1:1234 --num_processes=2 \
        --process_id=1
"""

import json

import jax
from absl import app, flags, logging

from jprompt.errors import InputError
from jprompt.train import config_lib, distributed, host_memory

_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "Config file and args, e.g. configs/vp.py:backbone=vit_s16,demo (each file's docstring lists "
    "its args); override single fields after it with --config.FIELD=VALUE",
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

_OVERRIDE = "--config."
_HELP = ("-h", "--help", "-help", "--helpshort", "-?", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except ``--config.FIELD=VALUE``, passed on to ``main`` for
    ``config_lib.load``; help exits 0 (absl's exits 1), a bad flag in one line."""
    help_asked = [arg for arg in argv[1:] if arg in _HELP]
    if help_asked:
        app.usage(shorthelp="--helpfull" not in help_asked, writeto_stdout=True, exitcode=0)
    overrides = [arg for arg in argv[1:] if arg.startswith(_OVERRIDE)]
    try:
        return flags.FLAGS([arg for arg in argv if not arg.startswith(_OVERRIDE)]) + overrides
    except flags.Error as error:  # an unknown flag, or a required one missing
        message = str(error).rstrip(".")
        raise SystemExit(f"{message}; python -m jprompt.main --help lists the flags") from None


def load_config(spec: str, args: list[str]):
    """The config ``--config=spec`` with the ``--config.FIELD=VALUE`` ``args``, checked; bad input
    exits with its one-line message."""
    overrides = {}
    for arg in args:
        field, has_value, value = arg.removeprefix(_OVERRIDE).partition("=")
        if not arg.startswith(_OVERRIDE) or not has_value:
            raise SystemExit(f"unexpected argument {arg!r}; fields are set as --config.FIELD=VALUE")
        overrides[field] = value
    try:
        config = config_lib.load(spec, overrides)
        config_lib.validate(config)
    except ValueError as error:  # a config file, its args or a field rejected the user's input
        raise SystemExit(str(error)) from None
    return config


def main(argv):
    config = load_config(_CONFIG.value, argv[1:])
    host_memory.keep_freed_memory_on_cpu_hosts()  # before the backend starts its threads
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("JAX devices: %s", jax.devices())
    from jprompt.train import trainer  # TensorFlow only once the config is good: --help is quick

    try:
        results = trainer.train_and_evaluate(config, _WORKDIR.value)
    except InputError as error:  # e.g. a checkpoint file that is missing or no checkpoint
        raise SystemExit(str(error)) from None
    if jax.process_index() != 0:
        return
    if "test" not in results:  # stopped early (preempted, max_steps): where it stands
        print(json.dumps(results, indent=2))
    elif results.get(trainer.STORED):  # never an old result passed off as a new one
        print(
            f"Stored test accuracy (finished run, not retrained): {results['test']['accuracy']:.4f}"
        )
    else:
        print(f"Final test accuracy: {results['test']['accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
