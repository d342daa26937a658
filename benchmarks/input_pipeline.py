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

``--mode=decode`` times the input pipeline alone (``pipeline.train_iterator``: tfds read, JPEG
decode, the train transform of each preset recipe at 224 px, batching) on ``--images`` JPEGs it
generates in a temporary tfds dataset (smooth colour fields with noise, ``--jpeg_size``), and
reports images/s per core: the rate divided by the cores the process may run on, so pin it
(``taskset -c 0``). For each recipe, in alternating runs: ``uncached`` (every epoch decodes:
``cache_decoded="off"``), and with ``cache_decoded="on"`` its ``first`` epoch (decode, cache)
and the ``later`` ones (the random part only). Each run's clock starts once the transforms are
traced. A cached run's first batch waits for the whole split's decode: its shuffle, now of the
kept images, holds all of them. ``cores@target`` divides ``--target_img_s`` by the per-core
rate: the cores that feed a step taking that many images per second.

    taskset -c 0 python benchmarks/input_pipeline.py --mode=decode --repeats=3
"""

import dataclasses
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags
from ml_collections import config_flags

from jprompt.data import pipeline
from jprompt.data.preprocess import PreprocessSpec
from jprompt.train import host_memory, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/vpt.py:demo", "Config file[:args], as for jprompt.main.", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating rounds of each kind.")
_MODE = flags.DEFINE_enum(
    "mode", "step", ["step", "decode"], "step: the step fed two ways; decode: the pipeline alone."
)
# The presets' train transforms at 224 px, as jprompt.train.protocols sets them.
RECIPES = {
    "vtab": PreprocessSpec(224, resize="bilinear", normalization="imagenet"),
    "fgvc": PreprocessSpec(
        224, train_crop="resize_random_crop", flip=True, normalization="imagenet"
    ),
    "vp": PreprocessSpec(224, train_crop="center_crop", resize="bicubic", normalization="clip"),
    "pgn": PreprocessSpec(
        224,
        train_crop="random_resized_crop_scale_1",
        train_resize="bicubic",
        augment="pgn",
        flip=True,
        normalization="clip",
    ),
}
COLUMNS = ("uncached", "first", "later")  # decode: timed per recipe (module docstring)
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "decode: the recipes timed.")
_IMAGES = flags.DEFINE_integer("images", 1000, "decode: JPEGs generated (VTAB-1k's 1,000).")
_JPEG_SIZE = flags.DEFINE_string("jpeg_size", "500x375", "decode: the JPEGs' width x height.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "decode: epochs timed per run, the first included.")
_BATCH = flags.DEFINE_integer("batch", 50, "decode: batch size; must divide --images.")
# ViT-B/16 VPT-deep training at 224 px: 67.24 GFLOP per image (benchmarks/step_speed.py's
# model_flops), at 40% of an H100's 989 TFLOP/s bf16 dense peak: 0.4 * 989e12 / 67.24e9.
_TARGET = flags.DEFINE_float("target_img_s", 5883.6, "decode: the step's images/s to feed.")


def main(argv):
    del argv
    host_memory.keep_freed_memory_on_cpu_hosts()  # as python -m jprompt.main does
    if _MODE.value == "decode":
        decode_rates()
    else:
        step_rates()


def step_rates():
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


class BenchJpegs(tfds.core.GeneratorBasedBuilder):
    """``--images`` JPEGs of ``--jpeg_size``: smooth random colour fields with pixel noise, which
    compress about as photographs do (the mean file size is printed)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        width, height = (int(n) for n in _JPEG_SIZE.value.split("x"))
        for index in range(_IMAGES.value):
            rng = np.random.default_rng(index)
            coarse = rng.uniform(0, 255, (1, 6, 8, 3))
            smooth = tf.image.resize(coarse, (height, width), "bicubic")[0].numpy()
            noisy = smooth + rng.normal(0, 12, smooth.shape)
            yield index, {"image": np.clip(noisy, 0, 255).astype(np.uint8), "label": index % 10}


def epoch_rates(data_dir: str, spec: PreprocessSpec, cache: str) -> list[float]:
    """Images/s of each of ``--epochs`` epochs (the first one from the iterator's start)."""
    batch = _BATCH.value
    batches = pipeline.train_iterator(
        "bench_jpegs",
        "train",
        global_batch_size=batch,
        spec=dataclasses.replace(spec, cache_decoded=cache),
        seed=0,
        data_dir=data_dir,
        process_index=0,
        process_count=1,
    )
    per_epoch = _IMAGES.value // batch
    rates, start = [], time.perf_counter()  # the transforms are traced: not timed
    for _ in range(_EPOCHS.value):
        for _ in range(per_epoch):
            next(batches)
        now = time.perf_counter()
        rates.append(per_epoch * batch / (now - start))
        start = now
    return rates


def decode_rates():
    if _IMAGES.value % _BATCH.value or _EPOCHS.value < 2:
        raise ValueError("--batch must divide --images, and --epochs be 2 or more")
    cores = len(os.sched_getaffinity(0))
    data_dir = tempfile.mkdtemp(prefix="bench_jpegs-")
    builder = tfds.builder("bench_jpegs", data_dir=data_dir)
    builder.download_and_prepare()
    kib = builder.info.splits["train"].num_bytes / _IMAGES.value / 1024
    runs = {(recipe, column): [] for recipe in _RECIPES.value for column in COLUMNS}
    for _ in range(_REPEATS.value):
        for recipe in _RECIPES.value:
            uncached = epoch_rates(data_dir, RECIPES[recipe], "off")
            cached = epoch_rates(data_dir, RECIPES[recipe], "on")
            runs[recipe, "uncached"].append(statistics.mean(uncached))
            runs[recipe, "first"].append(cached[0])
            runs[recipe, "later"].append(statistics.mean(cached[1:]))
    print(
        f"{_IMAGES.value} JPEGs of {_JPEG_SIZE.value} ({kib:.0f} KiB each) to 224 px, batch "
        f"{_BATCH.value}, {_EPOCHS.value} epochs per run, {_REPEATS.value} runs, {cores} core(s); "
        f"img/s per core: median (min-max over runs); cores@target: {_TARGET.value:.0f} img/s "
        "over the median"
    )
    print(f"{'recipe':8}" + "".join(f"{c:>22}{'cores@target':>14}" for c in COLUMNS))
    for recipe in _RECIPES.value:
        cells = []
        for column in COLUMNS:
            per_core = [rate / cores for rate in runs[recipe, column]]
            median = statistics.median(per_core)
            spread = f"{median:.0f} ({min(per_core):.0f}-{max(per_core):.0f})"
            cells.append(f"{spread:>22}{_TARGET.value / median:>14.1f}")
        print(f"{recipe:8}" + "".join(cells))


if __name__ == "__main__":
    app.run(main)
