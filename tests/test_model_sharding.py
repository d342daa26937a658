"""A frozen backbone sharded over the mesh's ``model`` axis computes what a replicated one does."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jprompt.models import vit
from jprompt.train import sharding, trainer


def test_mesh_has_data_and_model_axes():
    mesh = sharding.make_mesh(jax.devices(), model_axis_size=4)
    assert mesh.shape == {"data": 2, "model": 4}
    assert sharding.make_mesh(jax.devices()).shape == {"data": 8, "model": 1}
    with pytest.raises(ValueError, match="model_axis_size=3 must be a positive divisor of the 8"):
        sharding.make_mesh(jax.devices(), model_axis_size=3)


def test_frozen_shardings_split_large_arrays_along_a_divisible_axis():
    mesh = sharding.make_mesh(jax.devices(), model_axis_size=4)
    tree = {
        "kernel": jax.ShapeDtypeStruct((64, 512), jnp.float32),  # largest divisible axis: 1
        "odd": jax.ShapeDtypeStruct((12, 2049), jnp.float32),  # only axis 0 is divisible
        "prime": jax.ShapeDtypeStruct((2053, 17), jnp.float32),  # no divisible axis
        "bias": jax.ShapeDtypeStruct((512,), jnp.float32),  # too small to be worth a gather
    }
    specs = {k: s.spec for k, s in sharding.frozen_shardings(tree, mesh).items()}
    assert specs == {
        "kernel": P(None, "model"),
        "odd": P("model", None),
        "prime": P(),
        "bias": P(),
    }
    expected = 64 * 512 // 4 + 12 * 2049 // 4 + 2053 * 17 + 512
    shardings = sharding.frozen_shardings(tree, mesh)
    assert sharding.bytes_per_device(tree, shardings) == 4 * expected


def test_vit_g14_fits_in_an_eighth_per_device():
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(vit.create("vit_g14").init, jax.random.PRNGKey(0), images)["params"]
    sizes = [x.size for x in jax.tree.leaves(params)]
    assert sum(sizes) == 1_011_202_432  # 1011M in "Scaling Vision Transformers" (Zhai et al.)
    mesh = jax.sharding.AbstractMesh((1, 8), ("data", "model"))
    per_device = sharding.bytes_per_device(params, sharding.frozen_shardings(params, mesh))
    # Everything but the small arrays is split eight ways.
    small = sum(s for s in sizes if s < sharding.MIN_SHARDED_SIZE)
    assert per_device <= 4 * ((sum(sizes) - small) / 8 + small)
    assert per_device < 4 * sum(sizes) / 7.5


@pytest.mark.parametrize("file", ["vpt.py:demo,deep", "pgn.py:demo"])
def test_sharded_backbone_matches_replicated_loss_and_updates(file, shapes_data_dir, monkeypatch):
    # The tiny demo backbones' arrays are all small: shard every array the axis size divides.
    monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 1)

    def experiment(model_axis_size, devices):
        config = helpers.shrink(helpers.load_config(*file.split(":")), shapes_data_dir)
        config.model_axis_size = model_axis_size
        return trainer.create_experiment(config, devices=devices)

    reference = experiment(1, jax.devices()[:1])
    sharded = experiment(4, jax.devices())
    assert sharded.mesh.shape == {"data": 2, "model": 4}
    specs = [s.sharding.spec for s in jax.tree.leaves(sharded.frozen)]
    assert sum("model" in spec for spec in specs) >= len(specs) // 2
    total = sum(x.nbytes for x in jax.tree.leaves(sharded.frozen))
    on_one_device = sum(
        shard.data.nbytes
        for x in jax.tree.leaves(sharded.frozen)
        for shard in x.addressable_shards
        if shard.device == jax.devices()[0]
    )
    assert on_one_device < 0.4 * total

    losses, state = helpers.run_steps(reference, 3)
    sharded_losses, sharded_state = helpers.run_steps(sharded, 3)
    # Sharded matmuls sum float32 partial products in another order: relative 1e-4.
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        helpers.to_numpy(sharded_state["trained"]),
        helpers.to_numpy(state["trained"]),
    )
    split = "validation[:64]"
    val = reference.evaluate(state["trained"], split)
    sharded_val = sharded.evaluate(sharded_state["trained"], split)
    assert sharded_val["num_examples"] == val["num_examples"] == 64
    np.testing.assert_allclose(sharded_val["loss"], val["loss"], rtol=1e-4)
