"""PGN's dataset protocol: which data and splits each of its 12 datasets uses, the class names
and templates of its zero-shot head, and its split files (CoOp's and its own RESISC45 one) read
from tiny copies in their real format."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jprompt.data import pipeline, presets

# Class names as PGN's prompts hold them (its datamodules: "_" as a space, lower case), from
# the lists they are made of: torchvision's CIFAR-10 classes; CoOp's datasets/eurosat.py
# NEW_CNAMES; DTD's class folders; Oxford Pets' breeds in class-id order; SUN397's
# ClassName.txt with CoOp's datasets/sun397.py word order; PGN's resisc45_json.json.
CIFAR10 = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
EUROSAT = (
    "annual crop land",
    "forest",
    "herbaceous vegetation land",
    "highway or road",
    "industrial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings",
    "river",
    "sea or lake",
)
DTD = (
    "banded",
    "blotchy",
    "braided",
    "bubbly",
    "bumpy",
    "chequered",
    "cobwebbed",
    "cracked",
    "crosshatched",
    "crystalline",
    "dotted",
    "fibrous",
    "flecked",
    "freckled",
    "frilly",
    "gauzy",
    "grid",
    "grooved",
    "honeycombed",
    "interlaced",
    "knitted",
    "lacelike",
    "lined",
    "marbled",
    "matted",
    "meshed",
    "paisley",
    "perforated",
    "pitted",
    "pleated",
    "polka-dotted",
    "porous",
    "potholed",
    "scaly",
    "smeared",
    "spiralled",
    "sprinkled",
    "stained",
    "stratified",
    "striped",
    "studded",
    "swirly",
    "veined",
    "waffled",
    "woven",
    "wrinkled",
    "zigzagged",
)
PETS = (
    "abyssinian",
    "american bulldog",
    "american pit bull terrier",
    "basset hound",
    "beagle",
    "bengal",
    "birman",
    "bombay",
    "boxer",
    "british shorthair",
    "chihuahua",
    "egyptian mau",
    "english cocker spaniel",
    "english setter",
    "german shorthaired",
    "great pyrenees",
    "havanese",
    "japanese chin",
    "keeshond",
    "leonberger",
    "maine coon",
    "miniature pinscher",
    "newfoundland",
    "persian",
    "pomeranian",
    "pug",
    "ragdoll",
    "russian blue",
    "saint bernard",
    "samoyed",
    "scottish terrier",
    "shiba inu",
    "siamese",
    "sphynx",
    "staffordshire bull terrier",
    "wheaten terrier",
    "yorkshire terrier",
)
SUN397_FIRST = (
    "abbey",
    "airplane cabin",
    "airport terminal",
    "alley",
    "amphitheater",
    "amusement arcade",
    "amusement park",
    "anechoic chamber",
    "outdoor apartment building",  # /a/apartment_building/outdoor
    "indoor apse",
)


def test_pgn_datasets_splits_templates_and_class_names():
    merged = {
        "dtd",
        "oxford_flowers102",
        "food101",
        "eurosat",
        "sun397",
        "ucf101",
        "oxford_iiit_pet",
        "resisc45",
    }
    assert set(presets.PGN_DATASETS) == merged | {"cifar10", "cifar100", "svhn", "clevr_count"}
    specs = {}
    for name in presets.PGN_DATASETS:
        preset = presets.pgn_preset(name)
        specs[name] = preset.tfds_spec
        assert preset.train == ("train+validation" if name in merged else "train"), name
        assert preset.test != preset.val, name
        template = {"cifar100": "A photo of a {}", "clevr_count": "This is a photo of {} objects"}
        assert preset.templates == (template.get(name, "This is a photo of a {}"),), name
    assert specs["resisc45"] == "pgn_split/resisc45"
    assert specs["oxford_iiit_pet"] == "coop_split/oxford_pets"
    assert (specs["svhn"], specs["clevr_count"]) == ("svhn_cropped:3.*.*", "clevr:3.*.*")

    names = {n: presets.pgn_preset(n).class_names for n in presets.PGN_DATASETS}
    assert names["cifar10"] == CIFAR10
    assert names["eurosat"] == EUROSAT
    assert names["dtd"] == DTD and len(DTD) == 47
    assert names["oxford_iiit_pet"] == PETS
    assert names["sun397"][:10] == SUN397_FIRST and len(names["sun397"]) == 397
    assert names["sun397"][27] == "shop bakery"  # /b/bakery/shop
    assert names["food101"][15:18] == ("ceviche", "cheese plate", "cheesecake")  # sorted
    assert names["cifar100"][:2] == ("apple", "aquarium fish")
    assert names["resisc45"][:3] == ("airplane", "airport", "baseball diamond")
    assert names["svhn"] == tuple("0123456789")
    assert names["clevr_count"] == ("3", "4", "5", "6", "7", "8", "9", "10")
    # Only the split file has CoOp's Flowers and UCF101 names: read at run time.
    assert names["oxford_flowers102"] == names["ucf101"] == presets.FROM_TFDS
    with pytest.raises(ValueError, match="unknown PGN dataset 'oxford_pets'; did you mean"):
        presets.pgn_preset("oxford_pets")


def test_pgn_class_names_are_tfds_label_lists_as_coop_and_pgn_rewrite_them():
    # The class names jprompt states for PGN, against tfds's own label lists put through CoOp's
    # class order (sorted class folders for DTD and Food101) and naming (SUN397: the words after
    # the letter folder, last first), then PGN's ("_" as a space, lower case).
    def coop_sun397(name):
        return " ".join(reversed(name.strip("/").split("/")[1:]))

    rules = {
        "dtd": (sorted, str),
        "food101": (sorted, str),
        "oxford_iiit_pet": (list, str),
        "sun397": (list, coop_sun397),
        "resisc45": (list, str),
    }
    for name, (order, rename) in rules.items():
        preset = presets.pgn_preset(name)
        tfds_spec = presets.PRESETS[name].tfds_spec  # the dataset's tfds builder, not CoOp's
        tfds_names = tfds.builder(tfds_spec).info.features["label"].names
        expected = tuple(rename(n).replace("_", " ").lower() for n in order(tfds_names))
        assert preset.class_names == expected, name


def _write_split_folder(folder, split_file, image_dir, entries):
    """A split file in CoOp's format and a tiny JPEG for each of its entries."""
    for items in entries.values():
        for path, label, _ in items:
            (folder / image_dir / path).parent.mkdir(parents=True, exist_ok=True)
            image = np.full((4, 5, 3), 40 * label, np.uint8)
            Image.fromarray(image).save(folder / image_dir / path)
    (folder / split_file).write_text(json.dumps(entries, indent=4))


def _entry(directory, label, name, index):
    return [f"{directory}/{directory}_{index}.jpg", label, name]


# (PGN dataset, folder under the manual dir, split file, image directory, classes as
# (folder, label, name) from the real files; train / val / test labels).
SPLIT_FOLDERS = (
    (
        "eurosat",
        "coop/eurosat",
        "split_zhou_EuroSAT.json",
        "2750",
        (
            ("AnnualCrop", 0, "Annual Crop Land"),
            ("Forest", 1, "Forest"),
            ("HerbaceousVegetation", 2, "Herbaceous Vegetation Land"),
        ),
    ),
    (
        "resisc45",
        "pgn/resisc45",
        "resisc45_json.json",
        "images",
        (
            ("airplane", 0, "airplane"),
            ("airport", 1, "airport"),
            ("baseball_diamond", 2, "baseball_diamond"),
        ),
    ),
)
LABELS = {"train": [2, 0, 1], "val": [2, 0], "test": [1, 1]}


@pytest.mark.parametrize(("dataset", "folder", "split_file", "image_dir", "classes"), SPLIT_FOLDERS)
def test_split_file_gives_splits_labels_names_and_merged_train(
    tmp_path, dataset, folder, split_file, image_dir, classes
):
    entries = {
        split: [_entry(*classes[label], i) for i, label in enumerate(labels)]
        for split, labels in LABELS.items()
    }
    _write_split_folder(tmp_path / "downloads" / "manual" / folder, split_file, image_dir, entries)
    preset = presets.pgn_preset(dataset)
    data_dir = str(tmp_path)
    builder = pipeline.load_builder(preset.tfds_spec, data_dir)
    for split, size in ((preset.train, 5), (preset.val, 2), (preset.test, 2)):
        info = pipeline.dataset_info(preset.tfds_spec, split, data_dir=data_dir)
        assert info.num_examples == size, split
        assert info.class_names == tuple(name for _, _, name in classes)
    for split, coop_split in ((preset.train, ("train", "val")), (preset.test, ("test",))):
        ds = builder.as_dataset(split=split, shuffle_files=False)
        read = sorted((int(e["label"]), int(e["image"][0, 0, 0])) for e in tfds.as_numpy(ds))
        written = sorted(label for s in coop_split for label in LABELS[s])
        assert [label for label, _ in read] == written, split
        assert all(abs(pixel - 40 * label) <= 2 for label, pixel in read), split  # jpeg


def test_missing_split_file_names_path_and_layout(tmp_path):
    spec = presets.pgn_preset("resisc45").tfds_spec
    with pytest.raises(FileNotFoundError) as error:  # no manual directory at all
        pipeline.load_builder(spec, str(tmp_path))
    assert "put PGN's resisc45_json.json (data/resisc45/ of github.com/jochemloedeman/PGN)" in (
        str(error.value)
    )
    (tmp_path / "downloads" / "manual" / "pgn" / "resisc45" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        pipeline.load_builder(spec, str(tmp_path))
    message = str(error.value)
    assert f"{tmp_path}/downloads/manual/pgn/resisc45/resisc45_json.json not found" in message
    assert "'train', 'val' and 'test' lists hold [image path, label, class name]" in message
    assert "beside images/" in message and "\n" not in message
