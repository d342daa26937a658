"""Dataset presets: one entry per dataset the papers use, so a run names a dataset, not a recipe.

A preset fixes what the papers' protocols fix and tfds does not: which tfds builder and version,
the train / validation / test split strings, the number of classes, class names fit for CLIP
text prompts, the CLIP templates, how a label is derived when the task is not the builder's
``label`` feature (CLEVR count, dSprites location, ...), and preprocessing defaults.

Groups:
- the 12 VP / PGN datasets (``cifar10`` ... ``clevr_count``). The official VP and PGN code
  select on the test split; here validation is held out of train where tfds has no validation
  split, and the test split is only evaluated at the end.
- the 19 VTAB-1k tasks (``vtab/<task>``): ``train800`` / ``val200`` / ``test`` exactly as the
  VTAB code (google-research/task_adaptation, reused by VPT) slices them: 800 from the start of
  the tfds train split, 200 validation examples from the start of the task's own validation
  part (tfds ``validation``, or the first example after the task's train part of tfds
  ``train``), and the task's full test split. ``trainval`` is ``train800val200``, the final
  training set once lr / wd were chosen on ``val200``.
- CoOp's splits (``coop/<name>``): the ``split_zhou_*.json`` files of CoOp, when the user has
  CoOp's dataset folders (``builders.CoopSplit``), with CoOp's few-shot draws of them
  (``jprompt.data.fewshot``; ``FEWSHOT_PRESETS``).
- PGN's protocol (``pgn_preset``, ``PGN_DATASETS``): its 12 datasets as PGN's code reads them,
  CoOp's split files with train and val merged, its own RESISC45 split (``pgn/resisc45``,
  ``builders.PgnSplit``), the whole train split of CIFAR, SVHN and CLEVR, and its class names.
- FGVC (``fgvc/<name>``, VPT's fine-grained benchmark): tfds builders, 10% of train held out
  (VPT's own split files are random 10% too). NABirds is not in tfds: see ``LOCAL_FOLDER``.
- ``jprompt_shapes/*``, the offline demo datasets.

Any other tfds name works with ``DEFAULT_SPLITS`` and the builder's own labels.

This module is the table alone, without TensorFlow (config files read it): the derived labels it
names are ``jprompt.data.label_maps``, class names ``jprompt.data.class_names``, and the tfds
builders jprompt defines ``jprompt.data.builders``. The CLIP templates of every dataset are here.
"""

import dataclasses
import difflib

from jprompt.data.class_names import (
    CIFAR10_NAMES,
    CIFAR100_NAMES,
    COUNT_NAMES,
    DIGIT_NAMES,
    PGN_CLASS_NAMES,
    TFDS_NAME_RULES,
)

# Used for tfds names that have no preset: tfds has no validation split for most datasets.
DEFAULT_SPLITS = ("train[:90%]", "train[90%:]", "test")
DEFAULT_TEMPLATES = ("This is a photo of a {}",)  # VP and PGN code
CLIP_CIFAR100_TEMPLATES = ("A photo of a {}",)  # PGN code for CIFAR-100
CLIP_COUNT_TEMPLATES = ("This is a photo of {} objects",)  # PGN code for CLEVR
FROM_TFDS = "from tfds"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One dataset as a protocol uses it. ``class_names``: explicit names, ``FROM_TFDS``, or
    a key of ``class_names.TFDS_NAME_RULES`` applied to tfds's names."""

    name: str
    tfds_name: str  # builder[/config]
    version: str  # tfds version expression, e.g. "3.*.*"
    train: str
    val: str
    test: str
    num_classes: int
    group: str  # vp | vtab-natural | vtab-specialized | vtab-structured | fgvc | coop | demo
    source: str  # where the split protocol comes from
    trainval: str = ""  # final-run training split (VTAB: train800val200)
    label_map: str = ""  # key of label_maps.EXAMPLE_MAPS; "" = the builder's "label" feature
    class_names: tuple[str, ...] | str = FROM_TFDS
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    train_crop: str = "resize"
    eval_crop: str = "resize"
    flip: bool = False
    download: str = ""  # what tfds cannot fetch by itself, and where to put it

    @property
    def has_fewshot_draws(self) -> bool:
        """Whether the builder prepares CoOp's few-shot draws (``jprompt.data.fewshot``)."""
        return self.tfds_name.split("/")[0] in (COOP_SPLIT, PGN_SPLIT)

    @property
    def tfds_spec(self) -> str:
        """``builder[/config]:version``, as ``tfds.builder`` takes it."""
        return f"{self.tfds_name}:{self.version}" if self.version else self.tfds_name

    def clean_class_names(self, tfds_names) -> tuple[str, ...]:
        """Names for CLIP prompts; ``tfds_names`` are the builder's label names."""
        if isinstance(self.class_names, tuple):
            return self.class_names
        if self.class_names == FROM_TFDS:
            return tuple(tfds_names)
        return tuple(TFDS_NAME_RULES[self.class_names](n) for n in tfds_names)


# tfds's own "validation" then "test": VP/PGN use the builder's splits as they are.
_OFFICIAL = ("train", "validation", "test")
_RESISC45_DOWNLOAD = (
    "tfds cannot download RESISC45 (OneDrive): download NWPU-RESISC45.rar from "
    "https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs and extract it into the manual_dir, "
    "so that <manual_dir>/NWPU-RESISC45/<class>/<image>.jpg exist"
)
_RETINOPATHY_DOWNLOAD = (
    "tfds cannot download Diabetic Retinopathy (Kaggle login): from "
    "https://www.kaggle.com/c/diabetic-retinopathy-detection/data put train/ (train.zip.00* "
    "unpacked), test/ (test.zip.00* unpacked), sample/, trainLabels.csv and "
    "retinopathy_solution.csv into the manual_dir"
)
_CARS_DOWNLOAD = (
    "Stanford's Cars URLs are gone: put the original cars_train.tgz, cars_test.tgz, "
    "car_devkit.tgz and cars_test_annos_withlabels.mat into the manual_dir (tfds takes files "
    "of those names from there instead of downloading them)"
)


def _vp(name, tfds_name, version, splits, num_classes, **kw) -> Preset:
    source = "VP/PGN dataset; validation held out of train where tfds has none"
    return Preset(name, tfds_name, version, *splits, num_classes, "vp", source, **kw)


_VP_PRESETS = (
    _vp("cifar10", "cifar10", "3.*.*", DEFAULT_SPLITS, 10, class_names=CIFAR10_NAMES),
    _vp(
        "cifar100",
        "cifar100",
        "3.*.*",
        DEFAULT_SPLITS,
        100,
        class_names=CIFAR100_NAMES,
        templates=CLIP_CIFAR100_TEMPLATES,
    ),
    _vp("dtd", "dtd", "3.*.*", _OFFICIAL, 47),
    _vp("oxford_flowers102", "oxford_flowers102", "2.*.*", _OFFICIAL, 102),
    # tfds's food101 "validation" is the official test set (25,250 images).
    _vp("food101", "food101", "2.*.*", ("train[:90%]", "train[90%:]", "validation"), 101),
    _vp(
        "eurosat",
        "eurosat/rgb",
        "2.*.*",
        ("train[:60%]", "train[60%:80%]", "train[80%:]"),
        10,
        class_names="camel_case",
    ),
    _vp("sun397", "sun397/tfds", "4.*.*", _OFFICIAL, 397, class_names="sun397"),
    # Split 1 of UCF101, the middle frame of every clip (as CoOp's image version of it).
    _vp(
        "ucf101",
        "ucf101/ucf101_1_256",
        "2.*.*",
        DEFAULT_SPLITS,
        101,
        label_map="ucf101_middle_frame",
        class_names="camel_case",
    ),
    _vp("oxford_iiit_pet", "oxford_iiit_pet", "4.*.*", DEFAULT_SPLITS, 37),
    _vp("svhn_cropped", "svhn_cropped", "3.*.*", DEFAULT_SPLITS, 10, class_names=DIGIT_NAMES),
    _vp(
        "resisc45",
        "resisc45",
        "3.*.*",
        ("train[:60%]", "train[60%:80%]", "train[80%:]"),
        45,
        download=_RESISC45_DOWNLOAD,
    ),
    # CLEVR's test split has no scenes (no labels): its validation split is the test set.
    _vp(
        "clevr_count",
        "clevr",
        "3.*.*",
        ("train[:90%]", "train[90%:]", "validation"),
        8,
        label_map="clevr_count",
        class_names=COUNT_NAMES,
        templates=CLIP_COUNT_TEMPLATES,
    ),
)


def _vtab(task, group, tfds_name, version, val200, test, num_classes, **kw) -> Preset:
    """A VTAB-1k task: ``train[:800]``, ``val200``, and the task's test split."""
    return Preset(
        name=f"vtab/{task}",
        tfds_name=tfds_name,
        version=version,
        train="train[:800]",
        val=val200,
        test=test,
        num_classes=num_classes,
        group=f"vtab-{group}",
        source="VTAB-1k (task_adaptation / VPT): train800, val200, test",
        trainval=f"train[:800]+{val200}",
        **kw,
    )


def _after(train_examples: int, percent: int) -> str:
    """VTAB's val200 for a task whose validation part starts after ``percent``% of train."""
    start = train_examples * percent // 100
    return f"train[{start}:{start + 200}]"


_VTAB_PRESETS = (
    # natural
    _vtab("caltech101", "natural", "caltech101", "3.*.*", _after(3060, 90), "test", 102),
    _vtab("cifar100", "natural", "cifar100", "3.*.*", _after(50000, 90), "test", 100),
    _vtab("dtd", "natural", "dtd", "3.*.*", "validation[:200]", "test", 47),
    _vtab(
        "oxford_flowers102",
        "natural",
        "oxford_flowers102",
        "2.*.*",
        "validation[:200]",
        "test",
        102,
    ),
    # VTAB used oxford_iiit_pet 3.x, which current tfds no longer builds; 4.x has the same
    # 3,680 / 3,669 train / test images.
    _vtab("oxford_iiit_pet", "natural", "oxford_iiit_pet", "4.*.*", _after(3680, 80), "test", 37),
    _vtab("svhn", "natural", "svhn_cropped", "3.*.*", _after(73257, 90), "test", 10),
    _vtab("sun397", "natural", "sun397/tfds", "4.*.*", "validation[:200]", "test", 397),
    # specialized
    _vtab(
        "patch_camelyon",
        "specialized",
        "patch_camelyon",
        "2.*.*",
        "validation[:200]",
        "test",
        2,
    ),
    # EuroSAT and RESISC45 have one tfds split: 60% train, 20% validation, 20% test.
    _vtab("eurosat", "specialized", "eurosat/rgb", "2.*.*", _after(27000, 60), "train[21600:]", 10),
    _vtab(
        "resisc45",
        "specialized",
        "resisc45",
        "3.*.*",
        _after(31500, 60),
        "train[25200:]",
        45,
        download=_RESISC45_DOWNLOAD,
    ),
    _vtab(
        "diabetic_retinopathy",
        "specialized",
        "diabetic_retinopathy_detection/btgraham-300",
        "3.*.*",
        "validation[:200]",
        "test",
        5,
        download=_RETINOPATHY_DOWNLOAD,
    ),
    # structured
    _vtab(
        "clevr_count",
        "structured",
        "clevr",
        "3.*.*",
        _after(70000, 90),
        "validation",
        8,
        label_map="clevr_count",
        class_names=COUNT_NAMES,
        templates=CLIP_COUNT_TEMPLATES,
    ),
    _vtab(
        "clevr_distance",
        "structured",
        "clevr",
        "3.*.*",
        _after(70000, 90),
        "validation",
        6,
        label_map="clevr_distance",
    ),
    _vtab("dmlab", "structured", "dmlab", "2.0.1", "validation[:200]", "test", 6),
    _vtab(
        "kitti_distance",
        "structured",
        "kitti",
        "3.2.0",  # VPT's src/data/vtab_datasets/kitti.py
        "validation[:200]",
        "test",
        4,
        label_map="kitti_distance",
    ),
    # dSprites has one tfds split of 737,280: 80% train, 10% validation, 10% test.
    _vtab(
        "dsprites_location",
        "structured",
        "dsprites",
        "2.*.*",
        _after(737280, 80),
        "train[663552:]",
        16,
        label_map="dsprites_location",
    ),
    _vtab(
        "dsprites_orientation",
        "structured",
        "dsprites",
        "2.*.*",
        _after(737280, 80),
        "train[663552:]",
        16,
        label_map="dsprites_orientation",
    ),
    # smallNORB: validation is the first half of tfds's test split, test the second half.
    _vtab(
        "smallnorb_azimuth",
        "structured",
        "smallnorb",
        "2.*.*",
        "test[:200]",
        "test[50%:]",
        18,
        label_map="smallnorb_azimuth",
    ),
    _vtab(
        "smallnorb_elevation",
        "structured",
        "smallnorb",
        "2.*.*",
        "test[:200]",
        "test[50%:]",
        9,
        label_map="smallnorb_elevation",
    ),
)


def _fgvc(name, tfds_name, version, splits, num_classes, **kw) -> Preset:
    """VPT's FGVC recipe: resize 256, random crop 224 and flip; evaluation centre crop 224."""
    return Preset(
        name=f"fgvc/{name}",
        tfds_name=tfds_name,
        version=version,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=num_classes,
        group="fgvc",
        source="VPT FGVC: 10% of train validates (VPT's split files: a random 10%)",
        train_crop="resize_random_crop",
        eval_crop="resize_center_crop",
        flip=True,
        **kw,
    )


# The tfds builders jprompt defines (``jprompt.data.builders``), prepared from local files, never
# downloaded: a local folder of class folders (NABirds, which tfds does not have), CoOp's split
# files and PGN's.
LOCAL_FOLDER = "local_image_folder"
COOP_SPLIT = "coop_split"
PGN_SPLIT = "pgn_split"
LOCAL_BUILDERS = (LOCAL_FOLDER, COOP_SPLIT, PGN_SPLIT)
DEMO_BUILDER = "jprompt_shapes"  # jprompt.data.synthetic, the offline demo datasets

_NABIRDS_DOWNLOAD = (
    "NABirds is not in tfds: arrange the images as <manual_dir>/nabirds/train/<class>/*.jpg "
    "and <manual_dir>/nabirds/test/<class>/*.jpg (train_test_split.txt of the NABirds release "
    "says which is which; one folder per class id)"
)

_FGVC_PRESETS = (
    _fgvc("cub", "caltech_birds2011", "0.*.*", DEFAULT_SPLITS, 200),
    _fgvc(
        "nabirds", f"{LOCAL_FOLDER}/nabirds", "", DEFAULT_SPLITS, 555, download=_NABIRDS_DOWNLOAD
    ),
    _fgvc("oxford_flowers102", "oxford_flowers102", "2.*.*", _OFFICIAL, 102),
    _fgvc("stanford_dogs", "stanford_dogs", "0.*.*", DEFAULT_SPLITS, 120),
    _fgvc(
        "stanford_cars",
        "cars196",
        "2.*.*",
        DEFAULT_SPLITS,
        196,
        download=_CARS_DOWNLOAD,
    ),
)

# CoOp's folder of each dataset (its DATA.md layout): the split file, and the image directory
# the file's paths are relative to.
COOP_DATASETS = {
    "caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories", 100),
    "dtd": ("split_zhou_DescribableTextures.json", "images", 47),
    "eurosat": ("split_zhou_EuroSAT.json", "2750", 10),
    "food101": ("split_zhou_Food101.json", "images", 101),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", "jpg", 102),
    "oxford_pets": ("split_zhou_OxfordPets.json", "images", 37),
    "stanford_cars": ("split_zhou_StanfordCars.json", "", 196),
    "sun397": ("split_zhou_SUN397.json", "SUN397", 397),
    "ucf101": ("split_zhou_UCF101.json", "UCF-101-midframes", 101),
}
# PGN's own split of RESISC45 (jochemloedeman/PGN data/resisc45/resisc45_json.json and
# data/README.md): CoOp's format, 18,900 / 6,300 / 6,300 images of images/<class>/<file>.jpg.
PGN_SPLIT_DATASETS = {"resisc45": ("resisc45_json.json", "images", 45)}


def _unversioned(name, tfds_name, num_classes, group, source, **kw) -> Preset:
    """A builder defined in jprompt, read with its own train / validation / test splits."""
    return Preset(name, tfds_name, "", *_OFFICIAL, num_classes, group, source, **kw)


_COOP_PRESETS = tuple(
    _unversioned(
        f"coop/{name}",
        f"{COOP_SPLIT}/{name}",
        classes,
        "coop",
        f"CoOp (Zhou et al. 2022), {split_file}",
        download=(
            f"copy CoOp's {name} folder ({split_file} and {images or 'the images'}/) to "
            f"<manual_dir>/coop/{name}/"
        ),
    )
    for name, (split_file, images, classes) in COOP_DATASETS.items()
)
_PGN_SPLIT_PRESETS = (
    _unversioned(
        "pgn/resisc45",
        f"{PGN_SPLIT}/resisc45",
        45,
        "coop",
        "PGN (Loedeman et al.), resisc45_json.json",
        download=(
            "put PGN's resisc45_json.json (data/resisc45/ of github.com/jochemloedeman/PGN) into "
            "<manual_dir>/pgn/resisc45/ and the NWPU-RESISC45 class folders under "
            "<manual_dir>/pgn/resisc45/images/ (images/<class>/<class>_<nnn>.jpg)"
        ),
    ),
)

_DEMO_PRESETS = tuple(
    _unversioned(
        f"{DEMO_BUILDER}/{task}",
        f"{DEMO_BUILDER}/{task}",
        classes,
        "demo",
        "jprompt's offline procedural dataset",
    )
    for task, classes in (("shapes", 10), ("colors", 8), ("count", 6), ("textures", 8))
)

PRESETS = {
    p.name: p
    for p in _VP_PRESETS
    + _VTAB_PRESETS
    + _FGVC_PRESETS
    + _COOP_PRESETS
    + _PGN_SPLIT_PRESETS
    + _DEMO_PRESETS
}
VTAB_TASKS = tuple(p.name for p in _VTAB_PRESETS)
FGVC_TASKS = tuple(p.name for p in _FGVC_PRESETS)
VP_DATASETS = tuple(p.name for p in _VP_PRESETS)
FEWSHOT_PRESETS = tuple(p.name for p in PRESETS.values() if p.has_fewshot_draws)
GROUPS = ("vp", "vtab-natural", "vtab-specialized", "vtab-structured", "fgvc", "coop", "demo")
_PREFIXES = ("vtab/", "fgvc/", "coop/", "pgn/")


def get(name: str) -> Preset:
    """The preset ``name``; any other plain tfds name gets ``DEFAULT_SPLITS`` and tfds's labels.

    ``num_classes`` 0 there means: the builder's ``label`` feature decides.
    """
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith(_PREFIXES):
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        prefix = name.split("/")[0] + "/"
        valid = sorted(n for n in PRESETS if n.startswith(prefix))
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} Valid choices: {valid}")
    base, _, version = name.partition(":")
    train, val, test = DEFAULT_SPLITS
    return Preset(name, base, version, train, val, test, 0, "", "tfds defaults")


def for_builder(builder_name: str) -> list[Preset]:
    """The presets reading tfds builder ``builder_name`` (for error messages)."""
    return [p for p in PRESETS.values() if p.tfds_name.split("/")[0] == builder_name]


# --- PGN's protocol (Loedeman et al.; github.com/jochemloedeman/PGN) ---

# PGN's dataset -> (the preset holding its data and splits, the split PGN trains on). Its
# datamodules (pgn/datamodules/*_datamodule.py) read CoOp's split files, or PGN's own for
# RESISC45, through pgn/datasets/json_dataset.py, which appends the "val" list to "train"; the
# others train on the whole torchvision train split. All of them validate and test on the test
# split, so PGN holds nothing out: the preset's val split here lies inside the training data
# and only monitors (select the last state). Which checkpoint the paper reports is unclear
# (the training scripts keep the 5 lowest test-loss ones and the last).
PGN_DATASETS = {
    "cifar10": ("cifar10", "train"),
    "cifar100": ("cifar100", "train"),
    "dtd": ("coop/dtd", "train+validation"),
    "oxford_flowers102": ("coop/oxford_flowers", "train+validation"),
    "food101": ("coop/food101", "train+validation"),
    "eurosat": ("coop/eurosat", "train+validation"),
    "sun397": ("coop/sun397", "train+validation"),
    "ucf101": ("coop/ucf101", "train+validation"),
    "oxford_iiit_pet": ("coop/oxford_pets", "train+validation"),
    "svhn": ("svhn_cropped", "train"),  # torchvision SVHN "train" (73,257), not "extra"
    "resisc45": ("pgn/resisc45", "train+validation"),
    # data/create_clevr_annotations.py: every CLEVR train scene; CLEVR val is the test split.
    "clevr_count": ("clevr_count", "train"),
}

# CoOp's renaming of a dataset's own class names (KaiyangZhou/CoOp datasets/eurosat.py
# NEW_CNAMES; datasets/sun397.py read_data drops the letter folder and puts words like


def _pgn_name(name: str) -> str:
    """The words PGN puts into its template: ``_`` as a space, lower case (its datamodules'
    index_to_classes and _create_prompts)."""
    return name.replace("_", " ").lower()


def pgn_preset(name: str) -> Preset:
    """The preset of PGN's protocol for its dataset ``name`` (a key of ``PGN_DATASETS``): the
    data and splits of ``PGN_DATASETS[name]``, trained on PGN's training split, with PGN's
    class names and templates."""
    if name not in PGN_DATASETS:
        close = difflib.get_close_matches(name, list(PGN_DATASETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown PGN dataset {name!r}{hint} Valid choices: {sorted(PGN_DATASETS)}"
        )
    preset_name, train = PGN_DATASETS[name]
    preset = PRESETS[preset_name]
    if name in PGN_CLASS_NAMES:
        names = PGN_CLASS_NAMES[name]
    elif isinstance(preset.class_names, tuple):  # CIFAR, SVHN, CLEVR: the preset's own
        names = tuple(_pgn_name(n) for n in preset.class_names)
    else:  # Flowers, UCF101: only the split file has CoOp's names, read at run time
        names = preset.class_names
    return dataclasses.replace(
        preset,
        train=train,
        class_names=names,
        source=f"PGN protocol (jochemloedeman/PGN) over {preset.source}",
    )
