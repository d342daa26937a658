"""A trained run (its config and workdir) -> what deployment needs.

Its restored state (failing with one line, touching nothing, when the workdir is wrong), the
PGN client, the served model with the dataset's class names, and test images as a client
sends them. This side loads the trainer and TensorFlow; ``client.py`` needs neither.
"""

import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jprompt.data import label_maps, pipeline
from jprompt.deploy.client import ClientModel, at_model_size
from jprompt.deploy.server import ServedModel
from jprompt.errors import InputError
from jprompt.train import checkpoint, config_lib, trainer
from jprompt.train.workdir import CONFIG_FILE, differences, listing


def restore(config, workdir) -> tuple[trainer.Experiment, dict]:
    """``trainer.restore_best`` of a workdir that holds a trained run; InputError otherwise."""
    workdir = epath.Path(workdir)
    if not workdir.is_dir():
        raise InputError(
            f"workdir {workdir} does not exist: pass the --workdir of a run trained with "
            "python -m jprompt.main"
        )
    # The checkpoint managers create their folders: look first, so a wrong workdir stays as is.
    if not (workdir / checkpoint.BEST_DIR).is_dir():
        raise InputError(
            f"{workdir} holds no trained checkpoint: train it first with python -m jprompt.main "
            f"--config=... --workdir={workdir}"
        )
    _check_trained_config(config, workdir)
    try:
        return trainer.restore_best(config, workdir)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None


def _check_trained_config(config, workdir: epath.Path) -> None:
    """The run in ``workdir`` was trained with ``config``: a state restored into another model
    would fail late with shape errors or, worse, load and answer wrongly."""
    saved = workdir / CONFIG_FILE
    if not saved.exists():
        return
    found = differences(json.loads(saved.read_text()), json.loads(config_lib.to_json(config)))
    if found:
        raise InputError(
            f"{workdir} was trained with another config ({saved}): {listing(found)}. Pass the "
            "--config it was trained with"
        )


def export_client(experiment: trainer.Experiment, trained: dict) -> ClientModel:
    """The run's PGN client, cropping images as the run's evaluation does."""
    inputs = experiment.config.input
    return ClientModel.from_pgn(
        experiment.method,
        trained,
        experiment.frozen,
        eval_crop=inputs.eval_crop,
        resize=inputs.resize,
    )


def served_model(experiment: trainer.Experiment, trained: dict) -> ServedModel:
    """The run's backbone and head, with its dataset's class names."""
    data = experiment.config.dataset
    info = pipeline.dataset_info(
        data.name, data.train_split, data_dir=data.data_dir or None, label_map=data.label_map
    )
    return ServedModel.from_trained(
        experiment.method.backbone, trained, experiment.frozen, info.class_names
    )


def dataset_images(config, split: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` (default: all) images of ``split`` of ``config``'s dataset, with their
    labels, as a client of the served model sends them: uint8 at the model's resolution,
    cropped as the evaluation pipeline does (``client.at_model_size``), not normalized."""
    data, inputs = config.dataset, config.input
    example_map = label_maps.example_map(data.label_map)
    builder = pipeline.load_builder(data.name, data.data_dir or None)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={example_map.image_key: tfds.decode.SkipDecoding()},
    )
    images, labels = [], []
    for example in ds.take(-1 if count is None else count):
        encoded, label = example_map.fn(example)
        image = example_map.decode(encoded).numpy()
        images.append(at_model_size(image, inputs.image_size, inputs.eval_crop, inputs.resize))
        labels.append(int(label))
    return np.stack(images), np.array(labels, np.int32)
