r"""Pretrain the demo backbone (``configs/pretrain_tiny.py``) and export it as a checkpoint.

The offline demos adapt a *pretrained* frozen backbone, as the papers do with ImageNet-21k
ViTs, without any download. This script makes that backbone with the project's own trainer
(full training of every parameter on the ``shapes`` source task, from scratch) and writes the
best-validation state as an ``.npz``: for the ViT in vit_jax Linen naming, head included, like a
published file; for the tiny CLIP in ``jprompt.models.clip_checkpoint``'s naming, with the text
tower and logit scale its zero-shot head was made of (see ``configs/pretrain_tiny.py``). The
package ships the results as ``jprompt/assets/{vit,clip}_tiny4_shapes.npz``; to reproduce them:

    python -m jprompt.tools.pretrain_demo --workdir=/tmp/pretrain_demo \
        --out=jprompt/assets/vit_tiny4_shapes.npz
    python -m jprompt.tools.pretrain_demo --backbone=clip_tiny4 --workdir=/tmp/pretrain_clip \
        --out=jprompt/assets/clip_tiny4_shapes.npz
"""

import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from jprompt.models import vit_checkpoint
from jprompt.train import config_lib, trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the pretraining run.")
_OUT = flags.DEFINE_string("out", None, "Where to write the .npz backbone.")
_EPOCHS = flags.DEFINE_integer(
    "epochs", 0, "Training epochs on jprompt_shapes/shapes (0: the config's default)."
)
_BACKBONE = flags.DEFINE_string("backbone", "vit_tiny4", "vit_tiny4 or clip_tiny4.")

PRETRAIN_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain_tiny.py"


def pretraining_config(epochs: int, backbone: str):
    return config_lib.load(f"{PRETRAIN_CONFIG}:epochs={epochs},backbone={backbone}")


def main(argv):
    del argv
    config = pretraining_config(_EPOCHS.value, _BACKBONE.value)
    results = trainer.train_and_evaluate(config, _WORKDIR.value)
    logging.info("Source task test accuracy: %.4f", results["test"]["accuracy"])
    experiment, trained = trainer.restore_best(config, _WORKDIR.value)
    params = dict(trained["params"]["backbone"])
    text = experiment.method.backbone.text
    if text is None:
        params["head"] = trained["params"]["head"]
    else:
        params = {"image": params, "text": text.params, "logit_scale": text.logit_scale}
    vit_checkpoint.save_npz(_OUT.value, jax.tree.map(np.asarray, params))
    print(f"Wrote {_OUT.value}; source test accuracy {results['test']['accuracy']:.4f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
