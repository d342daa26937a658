"""Checkpoints of the trainable state (never the frozen backbone) with orbax.

Two managers under the work directory:
  ``checkpoints/``  the latest states (two kept, so a damaged newest one leaves an older one),
                    written every epoch and at the end; a rerun resumes from the newest.
  ``best/``         the state with the best validation accuracy so far, with its metrics.
Each save stores the run's config as JSON next to the state, a record of the config that state
was trained with (a rerun is checked against the workdir's ``config.json``: jprompt.train.workdir).
Orbax commits a step atomically
(written to ``<step>.orbax-checkpoint-tmp-*``, then renamed to ``<step>``), so a killed job never
leaves a half-written checkpoint that looks complete; the next run deletes such leftovers. In a
multi-process job every process calls every method here: saving and restoring are collective.
"""

import functools
import logging as logging_std
import sys
import warnings

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jprompt.errors import InputError
from jprompt.train import distributed

STATE = "state"
CONFIG = "config"
METRICS = "metrics"
LATEST_DIR = "checkpoints"  # under the workdir
BEST_DIR = "best"


class Checkpoints:
    """Latest and best checkpoints of one run."""

    def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 2):
        workdir = epath.Path(workdir)
        self._latest = ocp.CheckpointManager(
            workdir / LATEST_DIR,
            options=_options("latest", max_to_keep),
            item_names=(STATE, CONFIG),
        )
        self._best = ocp.CheckpointManager(
            workdir / BEST_DIR, options=_options("best", 1), item_names=(STATE, CONFIG, METRICS)
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save_latest(self, step: int, state, config_json: str) -> None:
        """Save ``state`` at ``step``, once any best checkpoint in flight is committed.

        The two managers commit in the background independently; were ``latest`` at step s
        committed before ``best`` at s, a job killed in between would resume at s without
        knowing s was the best, and could end with another best state than an uninterrupted run.
        """
        self._best.wait_until_finished()
        self._latest.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json)}
            ),
        )

    def save_best(self, step: int, state, config_json: str, metrics: dict) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self._best.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    CONFIG: ocp.args.JsonSave(config_json),
                    METRICS: ocp.args.JsonSave(metrics),
                }
            ),
            force=True,
        )

    def restore_latest(self, abstract_state, step: int | None = None):
        """The newest saved state (or ``step``), laid out like ``abstract_state``."""
        step = self._latest.latest_step() if step is None else step
        restored = self._latest.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        )
        return restored[STATE]

    def resume(self, abstract_state):
        """The newest kept checkpoint's state that can be restored, laid out like
        ``abstract_state``.

        The atomic commit proves a checkpoint was complete when written, not that its files
        still are (a failing disk, an interrupted copy, a hand edit). So a checkpoint that fails
        to restore is logged as damaged, and the previous kept one is tried; once one restores,
        the failed newer ones are deleted, so the run retrains those steps and writes them again
        (with the same values: training is a function of the step). If none restores, an
        ``InputError`` naming the newest one's error is raised and nothing is deleted. All
        processes agree on each outcome, so none resumes from a step another could not read.
        """
        steps = sorted(self._latest.all_steps(), reverse=True)
        _quiet_abandoned_reads()
        errors = {}
        for index, step in enumerate(steps):
            try:
                restored, error = self.restore_latest(abstract_state, step), None
            except Exception as e:  # whatever the failure, the files are the suspect
                restored, error = None, e
            if not distributed.any_process(error is not None):
                for bad_step in errors:
                    self._latest.delete(bad_step)
                return restored
            errors[step] = error or RuntimeError("another process could not restore it")
            fallback = (
                f"falling back to the previous one, step {steps[index + 1]}"
                if index + 1 < len(steps)
                else "no older one is left"
            )
            logging.warning(
                "The checkpoint at step %d in %s is damaged (%s); %s",
                step,
                self._latest.directory,
                _short(errors[step]),
                fallback,
            )
        raise InputError(
            f"none of the checkpoints in {self._latest.directory} (steps {steps}) can be restored "
            f"(step {steps[0]}: {_short(errors[steps[0]])}): their files are damaged, or "
            "resume_with_changes changed the shapes of the trained state; start a fresh --workdir"
        )

    def best_metrics(self) -> tuple[int, dict] | None:
        """``(step, validation metrics)`` of the best checkpoint, or None before the first."""
        step = self._best.latest_step()
        if step is None:
            return None
        restored = self._best.restore(
            step, args=ocp.args.Composite(**{METRICS: ocp.args.JsonRestore()})
        )
        return step, dict(restored[METRICS])

    def restore_best(self, abstract_state):
        step = self._best.latest_step()
        restored = self._best.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        )
        return restored[STATE]

    def wait(self) -> None:
        """Block until asynchronous writes are committed."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def _short(error: Exception) -> str:
    """An error in a line: tensorstore's messages append the whole read spec as JSON, and nest
    ``CODE: context: ...: cause``, of which the code and the cause are kept."""
    text = str(error).split(" [tensorstore_spec")[0]
    if len(text) <= 200:
        return text
    return f"{text[:40].split(': ')[0]}: ...{text[-150:]}"


@functools.cache  # once per process
def _quiet_abandoned_reads() -> None:
    """Keep out of stderr the asyncio noise that follows a failed restore, and only that.

    Orbax restores every array concurrently on an event loop of its own and closes that loop as
    soon as one read fails. The other reads are abandoned, harmless, and still complete later, at
    any time: tensorstore's completion callback, finding the loop closed, raises "Event loop is
    closed" into ``sys.unraisablehook`` (a traceback per read); their failed futures, collected
    unread, are logged by asyncio as "Future (or Task) exception was never retrieved"; and a
    coroutine of orbax's metadata store that never started warns that it was never awaited.
    Each of these three is dropped from the first resume on; everything else passes as before.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    logging_std.getLogger("asyncio").addFilter(_unread_tensorstore_failure)
    warnings.filterwarnings(
        "ignore",
        message=r"coroutine 'Store\._get_array_metadatas' was never awaited",
        category=RuntimeWarning,
    )


def _unread_tensorstore_failure(record) -> bool:
    """False (drop) for asyncio's report of a failed tensorstore read that nobody awaited."""
    error = record.exc_info[1] if record.exc_info else None
    return not (
        str(record.msg).partition("\n")[0].endswith("exception was never retrieved")
        and "tensorstore_spec" in str(error)
    )


def _options(name: str, max_to_keep: int) -> ocp.CheckpointManagerOptions:
    """Options of one manager; ``name`` keeps its multi-process barriers apart from the other
    manager's (both save the same step at the end of an epoch, and orbax names a barrier after
    the step)."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
    )


def abstract_like(state, sharding):
    """ShapeDtypeStructs of ``state`` carrying ``sharding``, the target for a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
