r"""Frozen-backbone memory per device when it is sharded over the mesh's ``model`` axis.

Computed from ``jax.eval_shape`` (nothing is allocated, so any size runs on a laptop) with the
shardings the trainer uses (``jprompt.train.sharding.frozen_shardings``,
``config.model_axis_size``):

    python benchmarks/backbone_memory.py --backbone=vit_g14 --model_axis_sizes=1,2,4,8,16
    python benchmarks/backbone_memory.py --backbone=dinov2_g14_reg
    python benchmarks/backbone_memory.py --backbone=siglip_so400m14_384 --image_size=384

Only the frozen weights are counted: activations, the batch and the (small) trainable prompt
come on top and depend on the method and batch size.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from jprompt.models import backbones, clip, siglip, vit
from jprompt.train import sharding

_BACKBONE = flags.DEFINE_enum("backbone", "vit_g14", backbones.NAMES, "backbone name")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "input resolution")
_MODEL_AXIS_SIZES = flags.DEFINE_list("model_axis_sizes", "1,2,4,8,16", "model axis sizes")
GIB = 2**30


def abstract_params(name: str, image_size: int):
    """Shapes and dtypes of the backbone's parameters, without computing them."""
    rng = jax.random.PRNGKey(0)
    if name in clip.NAMES:
        return jax.eval_shape(lambda r: clip.init_params(name, r, image_size=image_size), rng)[
            "image"
        ]
    if name in backbones.TORCH_VITS:
        module = backbones.torch_vit_module(name)
    elif name in siglip.NAMES:
        module = siglip.image_tower(name)
    else:
        module = vit.create(name)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, rng, images)["params"]


def main(argv):
    del argv
    params = abstract_params(_BACKBONE.value, _IMAGE_SIZE.value)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"{_BACKBONE.value} at {_IMAGE_SIZE.value}px: {count:,} frozen parameters")
    print("| model axis size | float32 GiB / device | bfloat16 GiB / device |")
    print("|---:|---:|---:|")
    for size in map(int, _MODEL_AXIS_SIZES.value):
        # Abstract devices: the mesh only needs their number, not real hardware.
        mesh = jax.sharding.AbstractMesh((1, size), (sharding.DATA_AXIS, sharding.MODEL_AXIS))
        shardings = sharding.frozen_shardings(params, mesh)
        f32 = sharding.bytes_per_device(params, shardings) / GIB
        as_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
        bf16 = sharding.bytes_per_device(as_bf16, shardings) / GIB
        print(f"| {size} | {f32:.2f} | {bf16:.2f} |")


if __name__ == "__main__":
    app.run(main)
