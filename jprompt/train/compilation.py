"""XLA compiler options for jprompt's jitted steps (``jax.jit(..., compiler_options=...)``).

On CPU, two options, each kept because an A/B run of ``benchmarks/step_speed.py`` in one
process showed it helps (benchmarks/README.md):

- the memory-optimized scheduler. XLA's default one orders the ops of a step for concurrency:
  independent matmuls run side by side, and their operands and results stay alive together.
  The memory-optimized one frees activations early, so a step needs much less memory; under the
  default schedule a rematerialised step (``backbone.remat``) recomputed every block's
  activations before using any, which defeated remat;
- YNNPACK fusions for reductions only. By default XLA:CPU also hands every single matmul to
  YNNPACK; XLA's own matmuls run the float32 step faster. The option is experimental, so it is
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
