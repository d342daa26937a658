r"""Does the input pipeline starve the training step? The trainer's step, timed side by side
with real input and with one batch already on the device.

Builds the run a config describes (``jprompt.train.trainer.create_experiment``) and times rounds of
``--steps`` training steps two ways, alternating, so a shared machine slows both alike:

- ``resident``: the same global batch, put on the device once, fed to every step: the step alone;
- ``real``: every step takes the next batch from ``Experiment.train_batches()`` (tfds read,
  decode, augmentation, batching, tf.data prefetch) and ``sharding.to_global_batch``, exactly as
  the training loop does; JAX's asynchronous dispatch lets the host prepare the next batch while
  the device runs the current step.

It prints images/s of both and their ratio (1.0 = the pipeline costs nothing). On a CPU-only
machine the pipeline and the step share the same cores, so the ratio there is a lower bound.

    python benchmarks/input_pipeline.py --config=configs/vpt.py:demo \
        --config.backbone.name=vit_ti16 --config.backbone.checkpoint= \
        --config.input.image_size=224 --config.batch_size=32

``--config`` and its ``--config.FIELD=VALUE`` overrides work as for ``jprompt.main``; the demo
dataset (jprompt_shapes, generated offline) is the default input.
"""

import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from jprompt.train import host_memory, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/vpt.py:demo", "Config file[:args], as for jprompt.main.", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating rounds of each kind.")


def main(argv):
    del argv
    host_memory.keep_freed_memory_on_cpu_hosts()  # as python -m jprompt.main does
    config = _CONFIG.value
    experiment = trainer.create_experiment(config)
    mesh = experiment.mesh
    batches = experiment.train_batches()
    resident = sharding.to_global_batch(next(batches), mesh)
    holder = {"state": experiment.state}

    def step(batch):
        holder["state"], metrics = experiment.train_step(
            holder["state"], experiment.frozen, batch, experiment.train_rng
        )
        return metrics

    def round_seconds(next_batch) -> float:
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            metrics = step(next_batch())
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    def real_batch():
        return sharding.to_global_batch(next(batches), mesh)

    jax.block_until_ready(step(resident))  # compilation
    round_seconds(real_batch)  # fills tf.data's buffers
    times = {"resident": [], "real": []}
    for _ in range(_REPEATS.value):
        times["resident"].append(round_seconds(lambda: resident))
        times["real"].append(round_seconds(real_batch))
    images = _STEPS.value * config.batch_size
    rates = {kind: images / statistics.median(seconds) for kind, seconds in times.items()}
    print(
        f"{config.method.name} on {config.backbone.name}, {config.input.image_size}px, batch "
        f"{config.batch_size}, {config.dataset.name}, {jax.device_count()} "
        f"{jax.devices()[0].device_kind} device(s)"
    )
    print(f"{'resident img/s':>15}{'real img/s':>12}{'real/resident':>15}")
    print(
        f"{rates['resident']:15.1f}{rates['real']:12.1f}{rates['real'] / rates['resident']:15.3f}"
    )


if __name__ == "__main__":
    app.run(main)
