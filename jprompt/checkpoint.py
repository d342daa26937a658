"""Checkpoints of the trainable state (never the frozen backbone) with orbax.

Two managers under the work directory:
  ``checkpoints/``  the latest states (two kept, so a damaged newest one leaves an older one),
                    written every epoch and at the end; a rerun resumes from the newest.
  ``best/``         the state with the best validation accuracy so far, with its metrics.
Each save stores the run's config as JSON next to the state. Orbax commits a step atomically
(written to a temporary directory, then renamed), so a killed job never leaves a half-written
checkpoint that looks complete.
"""

import json

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE = "state"
CONFIG = "config"
METRICS = "metrics"


class Checkpoints:
    """Latest and best checkpoints of one run."""

    def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 2):
        workdir = epath.Path(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._latest = ocp.CheckpointManager(
            workdir / "checkpoints", options=options, item_names=(STATE, CONFIG)
        )
        self._best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_names=(STATE, CONFIG, METRICS),
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save_latest(self, step: int, state, config_json: str) -> None:
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

    def saved_config(self) -> dict | None:
        """The config stored with the newest checkpoint, if any."""
        step = self._latest.latest_step()
        if step is None:
            return None
        restored = self._latest.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )
        config = restored[CONFIG]
        return json.loads(config) if isinstance(config, str) else config

    def wait(self) -> None:
        """Block until asynchronous writes are committed."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def abstract_like(state, sharding):
    """ShapeDtypeStructs of ``state`` carrying ``sharding``, the target for a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
