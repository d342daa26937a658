"""Import closure as a contract: the pure pieces load without TensorFlow, tfds, orbax, clu or the
trainer, and config files load without TensorFlow.

One subprocess checks every case, each in a child forked from an interpreter that has imported
nothing of jprompt yet, so that a case sees only what its own import loads.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

HEAVY = ("tensorflow", "tensorflow_datasets", "orbax", "clu", "jprompt.train")
PURE = (
    "jprompt",
    "jprompt.models.vit",
    "jprompt.models.backbone",
    "jprompt.methods",
    "jprompt.methods.gumbel",
    "jprompt.methods.vpt",
    "jprompt.methods.pgn",
    "jprompt.methods.inversion",
    "jprompt.data.presets",
    "jprompt.deploy.client",
)
CONFIGS = tuple(
    f"configs/{name}.py:demo"
    for name in ("vp", "vpt", "pgn", "adavipro", "linear_probe", "finetune", "zeroshot")
) + ("configs/pgn.py:demo,dataset=mix/jprompt_shapes/colors+jprompt_shapes/count",)

# Forks one child per case (argv: the cases as JSON); each reports the modules it loaded. The
# third-party libraries every case may use load once, before the forks, to keep this fast.
CHILD = """
import importlib, json, os, sys
import absl.logging, etils.epath, flax.linen, ftfy, jax.numpy, ml_collections, regex

def loaded(case):
    if case.startswith("config:"):
        from jprompt.train import config_lib
        config_lib.load(case.removeprefix("config:"))
    else:
        importlib.import_module(case)
    return sorted(sys.modules)

results = {}
for case in json.loads(sys.argv[1]):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        with os.fdopen(write, "w") as out:
            json.dump(loaded(case), out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        results[case] = json.load(answer)
    os.wait()
print(json.dumps(results))
"""


def test_pure_pieces_load_without_tensorflow_or_the_trainer():
    cases = [*PURE, *(f"config:{config}" for config in CONFIGS)]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.splitlines()[-1])

    def heavy(modules):
        return [m for m in modules if any(m == h or m.startswith(f"{h}.") for h in HEAVY)]

    for case in PURE:
        assert heavy(loaded[case]) == [], case
    # One method loads its own module, not the others.
    assert "jprompt.methods.vp" not in loaded["jprompt.methods.vpt"]
    assert "jprompt.methods.pgn" not in loaded["jprompt.methods"]
    # Nor a checkpoint reader.
    readers = ("jprompt.models.vit_checkpoint", "jprompt.models.torch_checkpoint")
    assert not set(readers) & set(loaded["jprompt.methods.pgn"])
    # A config file reads the preset table, not the tf.data pipeline.
    for config in CONFIGS:
        config_heavy = heavy(loaded[f"config:{config}"])
        tf_modules = [m for m in config_heavy if m.split(".")[0].startswith("tensorflow")]
        assert not tf_modules, (config, tf_modules)
