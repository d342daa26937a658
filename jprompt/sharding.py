"""Device mesh and shardings for data-parallel training.

One mesh axis, ``data``, spans every device of every process (or a chosen subset). Batches are
split along it; the trainable state and the frozen backbone are replicated. Each process feeds
only its own slice of the global batch, which JAX assembles into one global array.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: all devices of all processes).

    Built with ``Mesh`` directly so the axis type is the classic automatic one on every JAX
    version (``jax.make_mesh`` defaults to explicit axes in newer releases).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch, checking that it divides evenly."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {num_devices} devices of "
            "the mesh; choose a multiple of the device count"
        )
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return global_batch_size * local_devices // num_devices


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over the ``data`` axis."""
    sharding = batch_sharded(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }


def replicate(tree, mesh: Mesh):
    """Place a pytree on every device of the mesh (the same value everywhere)."""
    return jax.device_put(tree, replicated(mesh))
