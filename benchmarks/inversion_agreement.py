r"""Latent PGN vs its RGB deployment to the unmodified model, on the offline test split.

Trains (or, if ``--workdir`` holds the finished run, reloads) a deployable PGN demo:
``configs/pgn.py:demo,deployable`` on ``jprompt_shapes/colors`` at 32px, except that the backbone
is a RANDOMLY INITIALISED ``vit_tiny8`` (or ``clip_tiny8``) instead of the shipped pretrained
tiny4, whose 4x4 patches cannot be inverted exactly (3*4*4 = 48 < D = 64). The PGN and, on the
ViT, a linear head train on the frozen random backbone; on the CLIP the zero-shot head of its
random text tower stays frozen, so only the PGN trains. Then, over the test split, it compares
the latent model (``method.apply``: tokens appended in the deployed geometry) with the served
model (the backbone with an edge-padded position table, and the same head) on the deployed RGB
images, and prints:

- the largest |latent - served| logit deviation for the minimum-norm RGB solution (exact, may
  leave [0, 255]), after the box projection (inside [0, 255]) and after 8-bit rounding (what is
  sent);
- top-1 agreement between the latent model and the served model on the 8-bit images;
- the accuracy of both; the fraction of images whose minimum-norm solution left [0, 255] and
  of those whose in-range solve was exact.

``--figure`` writes a few test images next to their prompted versions (docs/deploy.md).

    python benchmarks/inversion_agreement.py --workdir=/tmp/pgn_rgb --figure=docs/inversion.png
"""

import functools
import pathlib

import jax
import numpy as np
from absl import app, flags
from etils import epath

from jprompt.deploy import client, run
from jprompt.methods import inversion
from jprompt.train import config_lib, trainer, visualize

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH_SIZE = 250
FIGURE_SCALE = 4  # nearest-neighbour upscaling of the 32px images in the figure

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the PGN run (trained if needed).")
_BACKBONE = flags.DEFINE_enum("backbone", "vit_tiny8", ["vit_tiny8", "clip_tiny8"], "Backbone.")
_ITERATIONS = flags.DEFINE_integer(
    "iterations", inversion.BOX_ITERATIONS, "Alternating projections per box-constrained solve."
)
_FIGURE = flags.DEFINE_string("figure", None, "Write originals next to prompted images here.")
_FIGURE_IMAGES = flags.DEFINE_integer("figure_images", 8, "Image pairs in the figure.")
flags.mark_flags_as_required(["workdir"])


def load_config(backbone: str):
    family = "clip_b32" if backbone.startswith("clip") else "vit_b32"
    config = config_lib.load(f"{ROOT / 'configs' / 'pgn.py'}:demo,backbone={family},deployable")
    config.backbone.name = backbone
    config.backbone.checkpoint = ""  # random initialisation
    return config


def figure(images: np.ndarray, prompted: np.ndarray) -> np.ndarray:
    """Each original (white below, to the prompted height) next to its prompted version."""
    padded = np.full_like(prompted, 255)
    padded[:, : images.shape[1]] = images
    pairs = np.stack([padded, prompted], axis=1).reshape(-1, *prompted.shape[1:])
    pairs = pairs.repeat(FIGURE_SCALE, axis=1).repeat(FIGURE_SCALE, axis=2)
    return visualize.grid(pairs / 255.0, pad=4)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = load_config(_BACKBONE.value)
    results = trainer.train_and_evaluate(config, _WORKDIR.value)
    experiment, trained = run.restore(config, _WORKDIR.value)
    pgn_client = run.export_client(experiment, trained)
    served = run.served_model(experiment, trained)
    latent_fn = jax.jit(functools.partial(experiment.method.apply, rng=None, train=False))
    normalization = experiment.method.backbone.normalization

    images, labels = run.dataset_images(config, config.dataset.test_split)
    stages = ("min_norm", "in_range", "images")
    deviation = dict.fromkeys(stages, 0.0)
    latent_top, served_top, exact, out_of_range = [], [], [], []
    for start in range(0, len(images), BATCH_SIZE):
        batch = images[start : start + BATCH_SIZE]
        latent, _ = latent_fn(trained, experiment.frozen, inversion.normalize(batch, normalization))
        prompted = client.deploy(pgn_client, batch, iterations=_ITERATIONS.value)
        logits = {stage: served.logits(getattr(prompted, stage)) for stage in stages}
        for stage in stages:
            deviation[stage] = max(deviation[stage], float(np.abs(logits[stage] - latent).max()))
        latent_top.append(np.argmax(latent, axis=-1))
        served_top.append(np.argmax(logits["images"], axis=-1))  # what the server would answer
        exact.append(np.asarray(prompted.exact))
        min_norm = np.asarray(prompted.min_norm)
        out_of_range.append(np.any((min_norm < 0) | (min_norm > 255), axis=(1, 2, 3)))
    latent_top, served_top = np.concatenate(latent_top), np.concatenate(served_top)
    exact, out_of_range = np.concatenate(exact), np.concatenate(out_of_range)

    geometry = pgn_client.geometry
    print(
        f"{config.backbone.name} (random init) + deployable PGN (K={geometry.num_tokens}, "
        f"{geometry.rows} extra patch rows), {config.dataset.name}:{config.dataset.test_split}, "
        f"{len(images)} images; training run's test accuracy {results['test']['accuracy']:.4f}"
    )
    print("largest |latent - served| logit deviation:")
    print(f"  min-norm float RGB (may leave [0, 255]): {deviation['min_norm']:.3g}")
    print(f"  after the box projection (float):        {deviation['in_range']:.3g}")
    print(f"  after 8-bit rounding (what is sent):     {deviation['images']:.3g}")
    print(f"top-1 agreement latent vs served (8-bit): {np.mean(latent_top == served_top):.2%}")
    print(f"accuracy latent: {np.mean(latent_top == labels):.4f}")
    print(f"accuracy served (8-bit): {np.mean(served_top == labels):.4f}")
    print(f"min-norm solution outside [0, 255]: {np.mean(out_of_range):.2%} of images")
    print(f"in-range solve exact ({_ITERATIONS.value} iterations): {np.mean(exact):.2%} of images")

    if _FIGURE.value:
        count = _FIGURE_IMAGES.value
        prompted = client.deploy(pgn_client, images[:count]).images
        path = epath.Path(_FIGURE.value)
        visualize.write_png(path, figure(images[:count], np.asarray(prompted)))
        print(f"Wrote {path} ({path.stat().length / 1024:.0f} KiB)")


if __name__ == "__main__":
    app.run(main)
