"""A run's TensorBoard scalars, read back from the event files the trainer writes in its workdir
(for notebooks and reports; TensorBoard itself shows them live)."""

import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in ``workdir``'s event files, by step."""
    accumulator = event_accumulator.EventAccumulator(
        str(workdir),
        size_guidance={event_accumulator.TENSORS: 0},  # 0: keep every event
    )
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()[event_accumulator.TENSORS]:
        events = accumulator.Tensors(tag)
        if events and not events[0].tensor_proto.tensor_shape.dim:  # rank 0: not an image
            values = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events}
            scalars[tag] = sorted(values.items())
    return scalars
