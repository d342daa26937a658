"""Paper protocols: what each paper's official code did at every step that changes its numbers,
as one named value, so that a run says which protocol it followed and a table refuses a
comparison the run has not earned.

A protocol maps dotted config fields to the values the official code used, given the choices the
paper itself varies (backbone size, prompt length, shallow or deep, the dataset):
``Protocol.fields(card)``. The config files apply a protocol by default for that paper's
benchmarks (``config_lib.apply_protocol``); every run writes its card (``card``: the config
flattened, with the activation and normalization it resolved to, and the checkpoint's file name
and sha256) into results.json; ``differences`` lists each field where a run departs from the
paper, and ``jprompt.tools.tables`` prints a paper's number beside a run only when there is none.
What jprompt still does differently from the official code, and why, is in ``Protocol.notes``.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping

from etils import epath

from jprompt.data import presets

# The original ImageNet-21k ViT files (Dosovitskiy et al.; gs://vit_models/imagenet21k/), which
# VPT's code loads (src/models/build_vit_backbone.py), not the later augreg files.
VPT_CHECKPOINTS = {"vit_b16": "ViT-B_16.npz", "vit_l16": "ViT-L_16.npz", "vit_h14": "ViT-H_14.npz"}
VP_TEMPLATES = ("This is a photo of a {}",)  # main_clip.py
# OpenAI's ViT-B-32.pt as python -m jprompt.tools.convert_clip names it.
CLIP_B32_FILE = "clip_b32.npz"


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    paper: str
    code: str  # the official repository the fields were read in
    fields: Callable[[Mapping], dict]  # card -> {dotted field: the official value}
    methods: tuple[str, ...]  # config.method.name values it covers
    seeds: int  # runs the paper averages per reported number
    # Fields a user varies between the paper's own runs (VPT: tuning runs on train800, final runs
    # on train800val200): checked in the card, never set by ``config_lib.apply_protocol``.
    chosen_per_run: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # remaining differences from the official code, with reasons


def _sgd(lr=None, **schedule) -> dict:
    fields = {
        "optim.name": "sgd",
        "optim.momentum": 0.9,
        "optim.nesterov": False,
        "optim.grad_clip_norm": 0.0,
        "optim.schedule": "cosine",
    }
    if lr is not None:
        fields["optim.lr"] = lr
    return fields | {f"optim.{k}": v for k, v in schedule.items()}


def _vpt_fields(card: Mapping) -> dict:
    preset = presets.get(card["dataset.preset"])
    backbone = card["backbone.name"] if card["backbone.name"] in VPT_CHECKPOINTS else "vit_b16"
    fields = {
        "backbone.name": backbone,
        "backbone.checkpoint_file": VPT_CHECKPOINTS[backbone],
        "backbone.activation": "gelu_exact",  # PyTorch's nn.GELU in VPT's ViT
        "backbone.pool": "tok",
        "backbone.representation_size": 0,  # the file's pre_logits are not loaded
        "dataset.name": preset.tfds_spec,
        "dataset.test_split": preset.test,
        "input.image_size": 224,
        "input.normalization": "imagenet",  # transforms.py and tf_dataset.py alike
        "input.augment": "none",
        "input.drop_last": False,  # loader.py, on one GPU as the paper ran
        "head.name": "linear",
        "method.head_init": "vpt",
        "method.project_dim": -1,
        "batch_size": 64 if card.get("method.num_tokens", 0) >= 100 else 128,
        "num_epochs": 100,
        **_sgd(
            schedule_unit="epoch",
            warmup_epochs=10.0,
            warmup_steps=0,
            warmup_rule="from_zero",
            end_lr_factor=0.0,
        ),
    }
    if preset.group == "fgvc":  # src/data/transforms.py
        geometry = ("resize_random_crop", "resize_center_crop", "bilinear_antialias", True)
        fields |= {"dataset.train_split": preset.train, "selection": "val"}
    else:  # VTAB: src/data/vtab_datasets/tf_dataset.py, final runs of tune_vtab.py
        geometry = ("resize", "resize", "bilinear", False)
        fields |= {"dataset.train_split": preset.trainval, "selection": "last"}
    for field, value in zip(("train_crop", "eval_crop", "resize", "flip"), geometry, strict=True):
        fields[f"input.{field}"] = value
    fields["input.train_resize"] = ""
    return fields


def _clip_zero_shot(templates, name_rule: str) -> dict:
    return {
        "backbone.name": "clip_b32",
        "backbone.checkpoint_file": CLIP_B32_FILE,
        "backbone.activation": "quick_gelu",
        "input.image_size": 224,
        "input.normalization": "clip",
        "head.name": "zeroshot",
        "head.templates": tuple(templates),
        "head.name_rule": name_rule,
    }


def _vp_fields(card: Mapping) -> dict:
    preset = presets.get(card["dataset.preset"])
    # The official code trains on everything but the test set and tests every epoch; jprompt's
    # presets hold a validation part out of "train" where tfds has no validation split.
    carved = preset.val.startswith("train[")
    train = f"{preset.train}+{preset.val}" if carved else preset.train
    return {
        **_clip_zero_shot(VP_TEMPLATES, "vp"),
        "dataset.train_split": train,
        "dataset.test_split": preset.test,
        "input.train_crop": "center_crop",  # CLIP's preprocess, at train and test
        "input.eval_crop": "center_crop",
        "input.resize": "bicubic",
        "input.train_resize": "",
        "input.augment": "none",
        "input.flip": False,
        "input.drop_last": False,
        "selection": "last",
        "report_test_selected": True,  # the official number: the best test epoch
        "batch_size": 256,
        "num_epochs": 1000,
        "optim.weight_decay": 0.0,
        **_sgd(
            lr=40.0,
            schedule_unit="step",
            warmup_steps=1000,
            warmup_epochs=0.0,
            warmup_rule="vp",
            end_lr_factor=0.0,
        ),
    }


def _adavipro_fields(card: Mapping) -> dict:
    # No public code: VP's protocol with the paper's stated changes (lr 1 for the mask
    # generator; Gumbel temperature 5, times 0.98 per epoch; 7x7 regions at 224 px).
    return _vp_fields(card) | {
        "optim.lr_by_path": (("prompter/mask_generator/.*", 1.0), ("head/.*", 0.1)),
        "method.tau0": 5.0,
        "method.tau_decay": 0.98,
        "method.region_size": 32,
        "method.embed_dim": 64,
    }


PGN_DATASET_OF_PRESET = {preset: name for name, (preset, _) in presets.PGN_DATASETS.items()}


def pgn_dataset(preset_name: str) -> str:
    """PGN's name of the dataset a preset holds ("coop/dtd" -> "dtd"), or ``preset_name``."""
    return PGN_DATASET_OF_PRESET.get(preset_name, preset_name)


def _pgn_fields(card: Mapping) -> dict:
    preset = presets.pgn_preset(pgn_dataset(card["dataset.preset"]))
    fields = {
        **_clip_zero_shot(preset.templates, "pgn"),
        "dataset.preset": preset.name,
        "dataset.name": preset.tfds_spec,
        "dataset.train_split": preset.train,
        "dataset.test_split": preset.test,
        "input.train_crop": "random_resized_crop_scale_1",
        "input.train_resize": "bicubic",
        "input.eval_crop": "center_crop",
        "input.resize": "bilinear_antialias",
        "input.augment": "pgn",
        "input.flip": True,
        "selection": "last",
        "report_test_selected": True,  # PGN validates on the test split
        "method.num_tokens": 16,
        "method.library_size": 256,
        "num_epochs": 100,
        "optim.weight_decay": 0.0,
        **_sgd(
            lr=0.1,
            schedule_unit="epoch",
            warmup_epochs=50.0,
            warmup_steps=0,
            warmup_rule="pgn",
            end_lr_factor=0.01,
        ),
    }
    if isinstance(preset.class_names, tuple):
        fields["head.class_names"] = preset.class_names
    return fields


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol(
            "vpt",
            "Jia et al. 2022, Visual Prompt Tuning",
            "KMnP/vpt",
            _vpt_fields,
            methods=("vpt",),
            seeds=5,
            chosen_per_run=("dataset.train_split", "selection"),
            notes=(
                "lr and weight decay are chosen per task on val200 (VTAB) or the validation "
                "split (FGVC) from VPT's grid (python -m jprompt.tools.sweep --sweep=lr_wd); the "
                "card records them, the protocol does not fix them.",
                "FGVC validation: VPT's split files hold out a random 10% of train; jprompt's "
                "presets hold out the last 10% (the files are not public in a fetchable form).",
                "The backbone runs in float32 as VPT's; jprompt's bfloat16 option is off.",
            ),
        ),
        Protocol(
            "vp",
            "Bahng et al. 2022, Exploring Visual Prompts for Adapting Large-Scale Models",
            "hjbahng/visual_prompting",
            _vp_fields,
            methods=("vp",),
            seeds=1,
            notes=(
                "The official code trains under torch.cuda.amp autocast (float16 matmuls); "
                "jprompt trains in float32.",
                "The official code only loads CIFAR-100; for the other datasets the protocol "
                "trains on their whole training split and tests on the presets' test split.",
            ),
        ),
        Protocol(
            "pgn",
            "Loedeman et al. 2022/2024, Prompt Generation Networks",
            "jochemloedeman/PGN",
            _pgn_fields,
            methods=("pgn",),
            seeds=1,
            notes=(
                "Batch size: the training scripts' default (2) is a debugging value and the "
                "paper's is not in the released code; configs/pgn.py keeps 256 (VP's) and the "
                "protocol does not fix it.",
                "The last partial batch of an epoch is dropped: PGN's BatchNorm would see the "
                "padding jprompt needs to keep a partial batch (PyTorch keeps it).",
                "CLEVR-count: PGN trains it with Resize + RandomCrop + vertical flip; jprompt "
                "uses the other datasets' augmentation.",
                "The random draws of the augmentation come from TensorFlow's stateless "
                "generator (same distributions, other samples than torch's).",
            ),
        ),
        Protocol(
            "adavipro",
            "Yang et al. 2024, AdaViPro",
            "no public code; VP's (hjbahng/visual_prompting) with the paper's changes",
            _adavipro_fields,
            methods=("adavipro",),
            seeds=1,
            notes=(
                "The edge detector's input, the convolutions' kernel sizes and hard or soft "
                "Gumbel samples are not published: see jprompt/methods/adavipro.py.",
            ),
        ),
    )
}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid choices: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_sha256(path: str) -> str:
    """The sha256 of a (local or gs://) file, read in chunks; "" without a file."""
    if not path:
        return ""
    digest = hashlib.sha256()
    with epath.Path(path).expanduser().open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def card(config: Mapping, *, activation: str, normalization: str, checkpoint_sha256: str) -> dict:
    """A run's protocol card: its config (a dict) flattened, with what "" resolved to."""
    flat = flatten(config)
    checkpoint = flat.get("backbone.checkpoint", "")
    return _jsonable(
        flat
        | {
            "backbone.activation": activation,
            "input.normalization": normalization,
            "backbone.checkpoint_file": epath.Path(checkpoint).name if checkpoint else "",
            "backbone.checkpoint_sha256": checkpoint_sha256,
        }
    )


def _jsonable(value):
    """Tuples as lists, as they come back from results.json."""
    return json.loads(json.dumps(value))


def differences(card: Mapping, protocol: str) -> list[str]:
    """Where ``card`` departs from ``protocol``: ``field: run value (paper: value)`` each."""
    spec = get(protocol)
    if card.get("method.name") not in spec.methods:
        return [f"method.name: {card.get('method.name')!r} (paper: one of {list(spec.methods)})"]
    expected = _jsonable(spec.fields(card))
    return [
        f"{field}: {card.get(field)!r} (paper: {value!r})"
        for field, value in expected.items()
        if card.get(field) != value
    ]
