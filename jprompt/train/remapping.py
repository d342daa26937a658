"""Counted label mappings over a run: ``frequency`` and ILM-VP's ``iterative``.

Both are counted by the prompted model on one epoch of training batches (the training transform,
as ILM-VP's and AutoVP's train loaders): ``frequency`` once, before step 0; ``iterative`` again
before every epoch ``e`` with ``e % head.remap_every_epochs == 0`` (ILM-VP's ``ilm_vp.py``
recounts on ``loaders['train']`` at the start of such epochs, with the prompt trained so far).
The count of epoch ``e`` reads the batches epoch ``e`` trains on.

Every mapping a run uses is recorded in ``workdir/label_mapping.json`` (``{epoch: index}``,
written before that epoch's first step), which the trainer reads back so that

- a resumed run goes on with the mapping it had, as an uninterrupted one does;
- the best state is evaluated with the mapping it was validated with (ILM-VP keeps the mapping
  in its best checkpoint), the last state with the last mapping;
- a user can read which source classes each target class was given, epoch by epoch.
"""

import json

import jax
import numpy as np
from etils import epath

from jprompt.methods import label_mapping
from jprompt.train import sharding
from jprompt.train.workdir import write_json

MAPPING_FILE = "label_mapping.json"


def is_counted(method) -> bool:
    """Whether ``method``'s head is a mapping counted from the model's predictions."""
    mapping = method.label_mapping
    return mapping is not None and mapping.name in label_mapping.COUNTED


def count(experiment, trained, epoch: int) -> np.ndarray:
    """``(T, m)``: the greedy assignment (``label_mapping.greedy_assignment``) on how often the
    model ``trained`` predicts each source class for each target label over the training
    batches of ``epoch``, padding left out. Every process must call it (a collective)."""
    method, mesh = experiment.method, experiment.mesh

    def batch_counts(trained, frozen, batch):
        _, aux = method.apply(trained, frozen, batch["image"], rng=experiment.eval_rng)
        logits = label_mapping.source_logits(frozen, aux["features"])
        return label_mapping.count_matrix(
            logits, batch["label"], method.num_classes, batch.get("mask")
        )

    batch_counts = jax.jit(batch_counts, out_shardings=sharding.replicated(mesh))
    batches = experiment.train_batches(start_step=epoch * experiment.steps_per_epoch)
    counts = sum(
        np.asarray(
            batch_counts(trained, experiment.frozen, sharding.to_global_batch(next(batches), mesh))
        )
        for _ in range(experiment.steps_per_epoch)
    )
    return label_mapping.greedy_assignment(counts, experiment.config.head.sources_per_class)


def use(experiment, index) -> None:
    """Point ``experiment.frozen`` (what its steps read) at the mapping ``index``; the jitted
    steps run on without recompiling."""
    frozen = label_mapping.remap(experiment.frozen, index)
    experiment.frozen = jax.device_put(frozen, sharding.frozen_shardings(frozen, experiment.mesh))


def read(workdir) -> dict[int, np.ndarray]:
    """``{epoch: index}`` recorded in ``workdir``; empty before the first."""
    path = epath.Path(workdir) / MAPPING_FILE
    if not path.exists():
        return {}
    recorded = json.loads(path.read_text())
    return {int(epoch): np.asarray(index, np.int32) for epoch, index in recorded.items()}


def record(workdir, history: dict[int, np.ndarray]) -> None:
    write_json(
        epath.Path(workdir) / MAPPING_FILE,
        {str(e): np.asarray(index).tolist() for e, index in sorted(history.items())},
    )


def in_effect(history: dict[int, np.ndarray], epoch: int) -> np.ndarray | None:
    """The mapping that epoch ``epoch`` trained with: the latest recorded at or before it."""
    earlier = [e for e in history if e <= epoch]
    return history[max(earlier)] if earlier else None


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The 0-based epoch training step ``step`` (1-based) belongs to."""
    return (step - 1) // steps_per_epoch
