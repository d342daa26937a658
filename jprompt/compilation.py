"""XLA compiler options for jprompt's jitted steps (``jax.jit(..., compiler_options=...)``).

On CPU, XLA's default scheduler orders the ops of a step for concurrency: independent matmuls
run side by side, and their operands and results stay alive together. Its memory-optimized
scheduler runs them in an order that frees activations early. Measured on ViT-B/16 VPT-deep
(``benchmarks/step_speed.py``, ``compiled.memory_analysis()``): at batch 128 the plain step
needs 21,451 instead of 36,979 MiB, and the rematerialised one (``backbone.remat``) 4,805
instead of 19,686 MiB: the default schedule recomputed every block's activations before
using any, which defeated remat. At batch 16 the step was no slower (10.2 against 11.6 s, one
A/B run on 2 cores). Other platforms keep XLA's defaults.
"""

CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def step_options(platform: str) -> dict[str, str]:
    """The compiler options of a training or evaluation step on ``platform`` ("cpu", "gpu"...)."""
    return dict(CPU_OPTIONS) if platform == "cpu" else {}
