"""Device mesh and shardings: data parallelism, and a frozen backbone split over devices.

The mesh has two axes, ``data`` x ``model``, spanning every device of every process (or a
chosen subset). Batches are split over all devices (both axes). The trainable state is
replicated. The frozen backbone is replicated when the ``model`` axis has size 1 (the default)
and otherwise sharded fsdp-style over ``model``: each large array is split along one of its
axes, so a device holds ``1/model`` of the backbone, and XLA gathers each weight where it is
used. That is what lets a backbone too big for one device (ViT-g, ViT-22B shapes) be prompted;
with the batch split over every device, the step's arithmetic is the same as without it.

Each process feeds only its own slice of the global batch, which JAX assembles into one global
array.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Smaller arrays (biases, LayerNorm scales) are cheaper to replicate than to gather at each use.
MIN_SHARDED_SIZE = 2**14


def make_mesh(devices: Sequence[jax.Device] | None = None, model_axis_size: int = 1) -> Mesh:
    """A ``data`` x ``model`` mesh over ``devices`` (default: all devices of all processes).

    Built with ``Mesh`` directly so the axis type is the classic automatic one on every JAX
    version (``jax.make_mesh`` defaults to explicit axes in newer releases).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    if model_axis_size < 1 or len(devices) % model_axis_size:
        raise ValueError(
            f"model_axis_size={model_axis_size} must be a positive divisor of the "
            f"{len(devices)} devices"
        )
    grid = np.asarray(devices).reshape(-1, model_axis_size)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def frozen_shardings(tree, mesh: Mesh):
    """Shardings for the frozen tree (arrays or ``jax.ShapeDtypeStruct``s): each array of at
    least ``MIN_SHARDED_SIZE`` elements is split over ``model`` along its largest axis that the
    axis size divides; the rest, and everything on a ``model`` axis of size 1, is replicated."""
    size = mesh.shape[MODEL_AXIS]

    def sharding_of(x):
        if size == 1 or x.size < MIN_SHARDED_SIZE:
            return replicated(mesh)
        divisible = [axis for axis in range(x.ndim) if x.shape[axis] % size == 0]
        if not divisible:
            return replicated(mesh)
        axis = max(divisible, key=lambda a: x.shape[a])
        spec = [None] * x.ndim
        spec[axis] = MODEL_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(sharding_of, tree)


def bytes_per_device(tree, shardings) -> int:
    """Bytes of ``tree`` on each device under ``shardings`` (``frozen_shardings`` splits arrays
    evenly, so every device holds one equal shard of each)."""
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    return sum(
        int(np.prod(sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x, sharding in leaves
    )


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over every device of the mesh."""
    sharding = batch_sharded(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }


def replicate(tree, mesh: Mesh):
    """Place a pytree on every device of the mesh (the same value everywhere)."""
    return jax.device_put(tree, replicated(mesh))
