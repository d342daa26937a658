"""A run's TensorBoard event files in its workdir: the writer the trainer uses, and the scalars
read back (for notebooks and reports; TensorBoard itself shows them live).

A run resumed after SIGKILL redoes the steps since its last checkpoint, whose summaries the killed
run may already have written; TensorBoard would then show those steps twice. The writer leaves
out every (tag, step) the workdir's event files already hold: a resumed run recomputes exactly
the values it skips (training is a function of the step).
"""

import tensorflow as tf
from clu import metric_writers
from tensorboard.backend.event_processing import event_accumulator


def _accumulator(workdir) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        str(workdir),
        size_guidance={event_accumulator.TENSORS: 0},  # 0: keep every event
    )
    accumulator.Reload()
    return accumulator


def read_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar event in ``workdir``'s event files, by step
    (a step written twice appears twice)."""
    accumulator = _accumulator(workdir)
    scalars = {}
    for tag in accumulator.Tags()[event_accumulator.TENSORS]:
        events = accumulator.Tensors(tag)
        if events and not events[0].tensor_proto.tensor_shape.dim:  # rank 0: not an image
            values = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events]
            scalars[tag] = sorted(values, key=lambda step_value: step_value[0])
    return scalars


def last_steps(workdir) -> dict[str, int]:
    """``{tag: last step written}`` of every summary (scalar or image) in ``workdir``."""
    accumulator = _accumulator(workdir)
    return {
        tag: max(e.step for e in accumulator.Tensors(tag))
        for tag in accumulator.Tags()[event_accumulator.TENSORS]
    }


class Writer:
    """Scalars and images to TensorBoard in ``workdir`` (asynchronously), each (tag, step) once
    across the runs of the workdir; with ``enabled=False`` (processes other than 0) nothing."""

    def __init__(self, workdir, *, enabled: bool = True):
        self._writer = None
        self._written = {}
        if enabled:
            self._written = last_steps(workdir)
            self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))

    def _new(self, step: int, values: dict) -> dict:
        return {k: v for k, v in values.items() if step > self._written.get(k, -1)}

    def write_scalars(self, step: int, scalars: dict) -> None:
        if self._writer and (scalars := self._new(step, scalars)):
            self._writer.write_scalars(step, scalars)

    def write_images(self, step: int, images: dict) -> None:
        if self._writer and (images := self._new(step, images)):
            self._writer.write_images(step, images)

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
