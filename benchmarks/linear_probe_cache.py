r"""Linear probe wall time with cached features against the backbone at every step.

Trains the same linear-probe config twice in one process, once with
``config.method.cache_features=True`` (the backbone runs once per image of each split;
``jprompt.train.feature_cache``) and once with it False (the backbone runs at every training step
and every validation), and prints the wall time of each whole run (data reading, compilation,
training, validation and test included), its CPU time (all threads of this process: steadier
than wall time on a shared machine), the test accuracies (equal: the two train the same head)
and the ratios. Both use the config's deterministic training preprocessing. Rounds alternate
which mode runs first; each mode reports its medians over the rounds.

    python benchmarks/linear_probe_cache.py                       # the offline demo
    python benchmarks/linear_probe_cache.py --num_epochs=2 --train_split='train[:2048]'
    python benchmarks/linear_probe_cache.py \
        --config=configs/linear_probe.py:backbone=vit_b16,dataset=cifar100 --num_epochs=10
"""

import pathlib
import statistics
import tempfile
import time

from absl import app, flags

from jprompt.data import pipeline
from jprompt.train import config_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = flags.DEFINE_string(
    "config", f"{ROOT / 'configs' / 'linear_probe.py'}:demo", "Linear-probe config file and args."
)
_NUM_EPOCHS = flags.DEFINE_integer("num_epochs", None, "Epochs (default: the config's).")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", None, "Training split (default: the config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the config's).")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds of both runs, alternating their order.")

MODES = {"cached": True, "uncached": False}


def load_config(cache: bool):
    overrides = {"method.cache_features": cache}
    for field, flag in (
        ("num_epochs", _NUM_EPOCHS),
        ("dataset.train_split", _TRAIN_SPLIT),
        ("dataset.data_dir", _DATA_DIR),
    ):
        if flag.value is not None:
            overrides[field] = flag.value
    return config_lib.load(_CONFIG.value, overrides)


def timed_run(cache: bool) -> tuple[dict[str, float], dict]:
    """Wall and CPU seconds of a whole training run in a fresh workdir, and its results."""
    config = load_config(cache)
    with tempfile.TemporaryDirectory() as workdir:
        wall, cpu = time.perf_counter(), time.process_time()
        results = trainer.train_and_evaluate(config, workdir)
        seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        return seconds, results


def main(argv):
    del argv
    config = load_config(True)
    # Prepared before timing (the offline demo dataset is generated on first use).
    data = config.dataset
    pipeline.dataset_info(data.name, data.train_split, data_dir=data.data_dir or None)
    seconds = {mode: [] for mode in MODES}
    results = {}
    for round_ in range(_ROUNDS.value):
        order = list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            run_seconds, results[mode] = timed_run(MODES[mode])
            seconds[mode].append(run_seconds)
            print(
                f"round {round_}: {mode} {run_seconds['wall']:.1f} s wall, "
                f"{run_seconds['cpu']:.1f} s CPU",
                flush=True,
            )
    median = {
        mode: {kind: statistics.median(s[kind] for s in runs) for kind in ("wall", "cpu")}
        for mode, runs in seconds.items()
    }
    print(
        f"\n{config.backbone.name} on {config.dataset.name}:{config.dataset.train_split}, "
        f"{results['cached']['total_steps']} steps of batch {config.batch_size}, "
        f"{_ROUNDS.value} round(s)"
    )
    print(f"{'features':<18}{'wall_s':>9}{'cpu_s':>9}{'test_acc':>10}")
    for mode in MODES:
        print(
            f"{mode:<18}{median[mode]['wall']:9.1f}{median[mode]['cpu']:9.1f}"
            f"{results[mode]['test']['accuracy']:10.4f}"
        )
    ratio = {kind: median["uncached"][kind] / median["cached"][kind] for kind in ("wall", "cpu")}
    print(f"{'uncached / cached':<18}{ratio['wall']:8.2f}x{ratio['cpu']:8.2f}x")


if __name__ == "__main__":
    app.run(main)
