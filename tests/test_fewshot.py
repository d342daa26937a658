"""CoOp's few-shot protocol: the draws equal those of CoOp's own code (a fixture made by running
it), the CoOp builders prepare them as splits, and the config args point a run at them."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jprompt.data import fewshot, pipeline, presets
from jprompt.errors import InputError
from jprompt.train import config_lib
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "coop_fewshot"
SPLIT_FILE = json.loads((FIXTURES / "split_zhou_Made.json").read_text())
COOP_SELECTED = json.loads((FIXTURES / "selected.json").read_text())


def _paths(items):
    return [path for path, _, _ in items]


def test_draws_equal_coops_for_every_shots_and_seed():
    assert len(COOP_SELECTED) == len(fewshot.SHOTS) * len(fewshot.SEEDS) == 15
    for shots in fewshot.SHOTS:
        for seed in fewshot.SEEDS:
            train, val = fewshot.select(SPLIT_FILE["train"], SPLIT_FILE["val"], shots, seed)
            expected = COOP_SELECTED[f"{shots}shot_seed{seed}"]
            assert _paths(train) == expected["train"], (shots, seed)
            assert _paths(val) == expected["val"], (shots, seed)
    # A class with fewer images than the shots keeps them all, as CoOp (no repeats): 16 shots of
    # train classes of 25, 3, 17, 12 images, and min(16, 4) of val classes of 6, 2, 5, 4.
    sizes = {k: (len(v["train"]), len(v["val"])) for k, v in COOP_SELECTED.items()}
    assert sizes["16shot_seed1"] == (16 + 3 + 16 + 12, 4 + 2 + 4 + 4)


def test_builder_prepares_the_draws_a_config_reads(tmp_path):
    folder = tmp_path / "downloads" / "manual" / "coop" / "dtd"
    ids = {}  # path -> a pixel value naming the image
    for items in SPLIT_FILE.values():
        for path, _, _ in items:
            ids[path] = len(ids)
            (folder / "images" / path).parent.mkdir(parents=True, exist_ok=True)
            image = np.full((3, 2, 3), ids[path], np.uint8)
            Image.fromarray(image).save(folder / "images" / path, format="PNG")
    (folder / "split_zhou_DescribableTextures.json").write_text(json.dumps(SPLIT_FILE))

    config = config_lib.load("configs/zeroshot.py:dataset=coop/dtd,shots=16,fewshot_seed=2")
    data = config.dataset
    assert (data.train_split, data.val_split, data.test_split) == (
        "train_16shot_seed2",
        "validation_16shot_seed2",
        "test",
    )
    builder = pipeline.load_builder(data.name, str(tmp_path))
    for split, key in ((data.train_split, "train"), (data.val_split, "val")):
        read = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
        pixels = sorted(int(example["image"][0, 0, 0]) for example in read)
        assert pixels == sorted(ids[p] for p in COOP_SELECTED["16shot_seed2"][key]), split
    for name, paths in COOP_SELECTED.items():
        shots, seed = (int(n) for n in name.split("shot_seed"))
        for split, key in (("train", "train"), ("validation", "val")):
            drawn = builder.info.splits[fewshot.split_name(split, shots, seed)].num_examples
            assert drawn == len(paths[key]), (name, split)
    assert builder.info.splits["train"].num_examples == len(SPLIT_FILE["train"])


def test_protocol_splits_are_drawn_too():
    # PGN trains on CoOp's train and val lists merged: a few-shot run merges their draws.
    config = config_lib.load("configs/pgn.py:dataset=dtd,shots=4,fewshot_seed=3")
    assert config.protocol == "pgn"
    assert config.dataset.train_split == "train_4shot_seed3+validation_4shot_seed3"
    assert fewshot.fewshot_split("train[:50%]+test", 8, 1) == "train_8shot_seed1[:50%]+test"
    assert presets.get("pgn/resisc45").has_fewshot_draws
    assert not presets.get("cifar100").has_fewshot_draws


ALL_DRAWN = "'coop/caltech101', 'coop/dtd'"


@pytest.mark.parametrize(
    "arg,overrides,message",
    [
        (
            "dataset=cifar10,shots=16",
            {},
            "shots=16 draws from CoOp's split files, and dataset='cifar10' has none: use one of "
            f"[{ALL_DRAWN}",
        ),
        (
            "dataset=coop/dtd,shots=32",
            {},
            "shots=32 is not one of CoOp's [1, 2, 4, 8, 16] (images per class; 0 = the full "
            "training split): set the config arg to one of them",
        ),
        ("dataset=coop/dtd,shots=-1", {}, "shots=-1 is not one of CoOp's [1, 2, 4, 8, 16]"),
        (
            "dataset=coop/dtd,shots=1,fewshot_seed=0",
            {},
            "fewshot_seed=0 is not one of CoOp's seeds [1, 2, 3]: set the config arg to one of "
            "them",
        ),
        (
            "dataset=coop/dtd",
            {"dataset.shots": "4"},
            "dataset.train_split='train' does not read the draw 'train_4shot_seed1' of "
            "dataset.shots=4, dataset.fewshot_seed=1: set them as config args",
        ),
    ],
)
def test_bad_fewshot_input_fails_in_one_line(arg, overrides, message):
    with pytest.raises(InputError) as error:
        config = config_lib.load(f"configs/vp.py:{arg}", overrides)
        config_lib.validate(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
