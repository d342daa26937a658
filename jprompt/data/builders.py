"""The tfds builders jprompt defines, for data tfds does not have: a local folder of class
folders (``LocalImageFolder``), CoOp's split files (``CoopSplit``) and PGN's (``PgnSplit``).

Importing this module registers them; each is prepared from local files, never downloaded. Their
names and what each reads are in ``jprompt.data.presets`` (``LOCAL_BUILDERS``).
"""

import json

import tensorflow_datasets as tfds

from jprompt.data import fewshot, presets


def _image_label_info(builder) -> tfds.core.DatasetInfo:
    """An image, a label whose class names the builder sets from the local files, and the
    image's path in the dataset's folder, by which errors name a bad image."""
    features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=None),
        "file_name": tfds.features.Text(),
    }
    return tfds.core.DatasetInfo(builder=builder, features=tfds.features.FeaturesDict(features))


class LocalImageFolder(tfds.core.GeneratorBasedBuilder):
    """Image-classification data from a local directory, for datasets tfds does not have.

    Reads ``<manual_dir>/<config>/{train,test}/<class name>/<image>`` (class names are the
    sorted folder names) into ordinary tfds records, so split slicing works as for any
    builder. Prepared by ``jprompt.data.pipeline.load_builder`` on first use, offline.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Each image's path (file_name)."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="nabirds", description="NABirds")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the images into <manual_dir>/<config>/train/<class>/ and .../test/<class>/."
    )

    def _info(self):
        return _image_label_info(self)

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir / self.builder_config.name
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        self.info.features["label"].names = classes
        return {
            split: self._generate_examples(root / split, classes) for split in ("train", "test")
        }

    def _generate_examples(self, directory, classes):
        for label, name in enumerate(classes):
            for path in sorted((directory / name).iterdir()):
                key = f"{name}/{path.name}"
                yield key, {"image": path, "label": label, "file_name": key}


class CoopSplit(tfds.core.GeneratorBasedBuilder):
    """The train / val / test splits of CoOp's ``split_zhou_<Dataset>.json`` files (Zhou et al.
    2022, also used by CoCoOp, MaPLe, PGN and others), over the user's copy of CoOp's dataset
    folder.

    Reads ``<manual_dir>/coop/<config>/split_zhou_*.json``, whose entries are ``[image path
    relative to the dataset's image directory, label, class name]``, and the images under
    ``<manual_dir>/coop/<config>/<image directory>`` (``presets.COOP_DATASETS``). Class names
    are CoOp's. Prepared by ``jprompt.data.pipeline.load_builder`` on first use, offline.

    Beside ``train``, ``validation`` and ``test`` it prepares CoOp's few-shot draws of train and
    validation for every K and seed of CoOp's protocol (``fewshot``): ``train_16shot_seed1``,
    ``validation_16shot_seed1``, ... They copy up to 31 train and 15 validation images per
    class and seed (all K together), which preparing and the disk pay for: 14% more images for
    Food101, 2.4 times as many for SUN397.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "CoOp's few-shot draws (K = 1, 2, 4, 8, 16; seeds 1, 2, 3) as splits, and each "
        "image's path in the split file (file_name).",
    }
    FOLDER = "coop"  # under the manual_dir
    DATASETS = presets.COOP_DATASETS
    SOURCE = "CoOp's folder of the dataset (github.com/KaiyangZhou/CoOp, DATASETS.md)"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in DATASETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Copy CoOp's folder of the dataset (its split_zhou_*.json beside the image directory) "
        "to <manual_dir>/coop/<config>/."
    )

    def _info(self):
        return _image_label_info(self)

    def _split_generators(self, dl_manager):
        name = self.builder_config.name
        split_file, images, _ = self.DATASETS[name]
        root = dl_manager.manual_dir / self.FOLDER / name
        image_dir = f"{images}/" if images else "the image folders"
        if not (root / split_file).exists():
            raise FileNotFoundError(
                f"split file {root / split_file} not found: {root} must hold {split_file} (a "
                "JSON object whose 'train', 'val' and 'test' lists hold [image path, label, "
                f"class name]) beside {image_dir}, the directory those paths are relative to; "
                f"both come from {self.SOURCE}"
            )
        splits = json.loads((root / split_file).read_text())
        names = {label: class_name for _, label, class_name in splits["train"]}
        self.info.features["label"].names = [names[label] for label in range(len(names))]
        image_root = root / images if images else root
        lists = {"train": splits["train"], "validation": splits["val"], "test": splits["test"]}
        for shots in fewshot.SHOTS:
            for seed in fewshot.SEEDS:
                draws = fewshot.select(splits["train"], splits["val"], shots, seed)
                for split, draw in zip(fewshot.DRAWN_SPLITS, draws, strict=True):
                    lists[fewshot.split_name(split, shots, seed)] = draw
        return {split: self._generate_examples(image_root, items) for split, items in lists.items()}

    def _generate_examples(self, image_root, items):
        for path, label, _ in items:
            yield path, {"image": image_root / path, "label": label, "file_name": path}


class PgnSplit(CoopSplit):
    """PGN's split files in CoOp's format (``presets.PGN_SPLIT_DATASETS``), read from
    ``<manual_dir>/pgn/<config>/``."""

    FOLDER = "pgn"
    DATASETS = presets.PGN_SPLIT_DATASETS
    SOURCE = (
        "PGN's data/resisc45/resisc45_json.json (github.com/jochemloedeman/PGN) and the "
        "NWPU-RESISC45 class folders"
    )
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in DATASETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put PGN's split file beside the image directory into <manual_dir>/pgn/<config>/."
    )


def manual_download_help(builder: tfds.core.DatasetBuilder, data_dir_root: str) -> str:
    """Where to put the source files of ``builder`` so that tfds prepares it without network.

    tfds takes a file from its manual_dir instead of downloading it when the file has the name
    tfds registered for that URL, so those names are listed.
    """
    manual_dir = f"{data_dir_root}/downloads/manual"
    files = sorted({i.filename for i in (builder.url_infos or {}).values() if i.filename})
    notes = [f" {p.name}: {p.download}." for p in presets.for_builder(builder.name) if p.download]
    if not files and not notes:
        return ""
    listed = f" ({', '.join(files)})" if files else ""
    return (
        f" Without network, put the source files{listed} into {manual_dir} and run "
        f"`tfds build {builder.name} --data_dir {data_dir_root} --manual_dir {manual_dir}`."
        + "".join(notes)
    )
