"""XLA compiler options for jprompt's jitted steps (``jax.jit(..., compiler_options=...)``).

On CPU, two options, each measured A/B in one process (``benchmarks/step_speed.py``; README,
"Training-step speed"):

- the memory-optimized scheduler. XLA's default one orders the ops of a step for concurrency:
  independent matmuls run side by side, and their operands and results stay alive together.
  The memory-optimized one frees activations early. On ViT-B/16 VPT-deep at batch 128
  (``compiled.memory_analysis()``) the plain step needs 21,451 instead of 36,979 MiB, and the
  rematerialised one (``backbone.remat``) 4,805 instead of 19,686 MiB: the default schedule
  recomputed every block's activations before using any, which defeated remat;
- YNNPACK fusions for reductions only. By default XLA:CPU also hands every single matmul to
  YNNPACK; its own matmuls ran the whole float32 step 5-11% faster (ViT-Ti/16 and ViT-B/16,
  VP and VPT-deep, batch 16), bfloat16 steps alike. The option is experimental, so it is
  passed only where the installed jaxlib accepts it.

Other platforms keep XLA's defaults.
"""

import functools

import jax
import numpy as np

CPU_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


def step_options(platform: str) -> dict[str, str]:
    """The compiler options of a training or evaluation step on ``platform`` ("cpu", "gpu"...)."""
    if platform != "cpu":
        return {}
    return {name: value for name, value in CPU_OPTIONS.items() if _cpu_accepts(name, value)}


@functools.cache
def _cpu_accepts(name: str, value: str) -> bool:
    """Whether this jaxlib's CPU compiler knows option ``name`` with ``value``: a jaxlib that
    renamed or dropped an experimental option rejects the whole compilation."""
    probe = jax.device_put(np.float32(0), jax.devices("cpu")[0])
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(probe).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True
