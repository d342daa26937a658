"""How far ``backbone.attention``'s fused path is from the default heads-major attention.

ViT-B/16 at 224 px with random weights, VPT-deep prompts: the pooled features of a batch of 8
random images in bfloat16 compute, through ``attention="heads_major"`` and through
``attention="cudnn"`` on a GPU (``"xla"`` elsewhere, where cuDNN is absent), each against the
float32 heads-major features as ``||bf16 - f32|| / ||f32||``. The two ways differ only in how
the attention is summed, so the fused one should be about as close to float32 as the default
one is: bfloat16 rounding, not more. Run before timing the fused path
(``benchmarks/gpu_check.sh`` does).
"""

import dataclasses

import jax
import numpy as np

from jprompt.models import backbones

BATCH = 8
PROMPTS = 10


def main():
    # One set of weights and inputs; only the module's compute dtype and attention change.
    config = backbones.default_config("vit_b16")
    backbone, params = backbones.build(config, image_size=224, rng=jax.random.key(0))
    module = backbone.module
    images = jax.random.uniform(jax.random.key(1), (BATCH, 224, 224, 3), minval=-1, maxval=1)
    shape = (module.depth, BATCH, PROMPTS, module.hidden_size)
    deep = 0.02 * jax.random.normal(jax.random.key(2), shape)

    def features(attention: str, dtype: str) -> np.ndarray:
        variant = module.clone(dtype=backbones.DTYPES[dtype], attention=attention)
        twin = dataclasses.replace(backbone, module=variant)
        forward = jax.jit(lambda p, x, d: twin.features(p, x, deep_prompts=d)[0])
        return np.asarray(forward(params, images, deep), np.float32)

    # float32 matmuls at full precision on GPUs too (TF32 would blur the reference).
    with jax.default_matmul_precision("highest"):
        reference = features("heads_major", "float32")
    fused = "cudnn" if jax.default_backend() == "gpu" else "xla"
    for attention in ("heads_major", fused):
        got = features(attention, "bfloat16")
        difference = np.linalg.norm(got - reference) / np.linalg.norm(reference)
        print(
            f"attention={attention} on {jax.devices()[0].device_kind}: ViT-B/16 VPT-deep "
            f"features in bfloat16 differ from float32 by {difference:.2e} (relative)"
        )


if __name__ == "__main__":
    main()
