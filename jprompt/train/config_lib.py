"""Helpers shared by the files in ``configs/``.

A config file is chosen as ``--config=configs/vp.py:backbone=vit_s16,dataset=cifar10,demo``: the
text after ``:`` is a comma-separated list of ``key=value`` pairs and bare flags, parsed here
against the defaults the config file declares, and the args every config with a ``dataset``
takes (``COMMON_ARGS``: CoOp's few-shot draw). Single fields are overridden afterwards with
``--config.optim.lr=0.1``; the configs are locked, so a misspelt field fails. ``validate`` checks
the values before any work starts. Bad input fails with an ``InputError``: one line naming the
problem and the fix.
"""

import ast
import difflib
import importlib.resources
import importlib.util
import pathlib
from collections.abc import Mapping

from ml_collections import ConfigDict

from jprompt.data import fewshot, presets
from jprompt.errors import InputError, MissingFileError
from jprompt.models import backbones
from jprompt.train import optim, protocols

# Published checkpoints: the ImageNet-21k runs of "How to train your ViT?" (Steiner et al. 2021)
# that its authors recommend for transfer (also big_vision's "howto-i21k" list). Point
# ``backbone.checkpoint`` at a local copy when offline.
AUGREG = "gs://vit_models/augreg/"
CHECKPOINTS = {
    "vit_ti16": AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_s32": AUGREG + "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz",
    "vit_s16": AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_b32": AUGREG + "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
    "vit_b16": AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "vit_b8": AUGREG + "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
    "vit_l16": AUGREG + "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz",
}

# The original ImageNet-21k files (Dosovitskiy et al. 2021), which VPT and its successors load.
ORIGINAL_IN21K = "gs://vit_models/imagenet21k/"

# CLIP weights are not published as .npz: convert a downloaded file once with
# ``python -m jprompt.tools.convert_clip`` into this directory (or point backbone.checkpoint
# elsewhere).
CLIP_CHECKPOINT_DIR = "~/jprompt_models"
RELEASED_CLIP = ("clip_b32", "clip_b16", "clip_l14")  # OpenAI's ViT-B-32.pt, ViT-B-16.pt, ...
CHECKPOINTS.update({name: f"{CLIP_CHECKPOINT_DIR}/{name}.npz" for name in RELEASED_CLIP})
# DINOv2, MAE, MoCo-v3 (.pth) and SigLIP (big_vision .npz) load their released files as
# downloaded, from the same directory.
CHECKPOINTS.update(
    {
        name: f"{CLIP_CHECKPOINT_DIR}/{file}"
        for name, file in (backbones.TORCH_VIT_FILES | backbones.SIGLIP_FILES).items()
    }
)

# The offline demos: tiny backbones pretrained on the procedural ``shapes`` task (shipped with
# the package, made by ``python -m jprompt.tools.pretrain_demo``) adapted to the ``colors`` task,
# which their colour-invariant shape features do not solve on their own. ``demo`` fixes the
# backbone (``backbone=clip_*`` selects the tiny CLIP, ``vit_*`` the tiny ViT), the dataset (a
# ``DEMO_DATASETS`` task: ``colors`` unless ``dataset=`` names another), 32px images, and each
# config file's short demo recipe.
DEMO_BACKBONE = "vit_tiny4"
DEMO_CLIP_BACKBONE = "clip_tiny4"
DEMO_IMAGE_SIZE = 32
DEMO_DATASET = "jprompt_shapes/colors"
DEMO_DATASETS = tuple(name for name, preset in presets.PRESETS.items() if preset.group == "demo")
_ASSETS = importlib.resources.files("jprompt") / "assets"
DEMO_CHECKPOINTS = {
    DEMO_BACKBONE: str(_ASSETS / "vit_tiny4_shapes.npz"),
    DEMO_CLIP_BACKBONE: str(_ASSETS / "clip_tiny4_shapes.npz"),
}


def is_clip(backbone: str) -> bool:
    return backbone.startswith("clip_")


def demo_pixel_prompt(backbone: str) -> tuple[int, float]:
    """The pixel-prompt demos' (frame width, template lr) on the 32 px demo backbone: through the
    tiny CLIP's frozen zero-shot head the prompt needs more room and a larger step than next to
    a trainable linear head (measured on jprompt_shapes/colors)."""
    return (8, 10.0) if is_clip(backbone) else (4, 1.0)


# Args of every config that takes a ``dataset``: ``shots=K,fewshot_seed=S`` trains on CoOp's
# K-shot draw with seed S of a CoOp split-file preset (jprompt.data.fewshot); 0 shots: the full
# splits.
COMMON_ARGS = {"shots": 0, "fewshot_seed": 1}


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """Parse ``"key=value,flag"`` against ``defaults`` (with ``COMMON_ARGS`` where there is a
    ``dataset``), converting values to the default's type.

    A bare ``flag`` sets a boolean default to True. Unknown keys fail listing the valid ones, and
    so does an unknown ``backbone``. With ``demo`` set, ``backbone`` becomes the tiny backbone of
    its family and ``dataset``, unless given, ``DEMO_DATASET`` (``base_config`` rejects a dataset
    the demo cannot use).
    """
    if "dataset" in defaults:
        defaults = COMMON_ARGS | defaults
    args = dict(defaults)
    given = set()
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise InputError(f"unknown config arg {key!r}; valid args: {sorted(defaults)}")
        if not has_value and not isinstance(defaults[key], bool):
            raise InputError(f"config arg {key!r} needs a value: {key}=...")
        args[key] = _from_text(f"config arg {key!r}", defaults[key], value) if has_value else True
        given.add(key)
    if "backbone" in args:
        check_backbone(args["backbone"])
    if args.get("demo"):
        args["backbone"] = DEMO_CLIP_BACKBONE if is_clip(args["backbone"]) else DEMO_BACKBONE
        if "dataset" not in given:
            args["dataset"] = DEMO_DATASET
    return ConfigDict(args)


def check_backbone(name: str) -> None:
    if name not in backbones.NAMES:
        raise InputError(f"unknown backbone {name!r}; valid choices: {list(backbones.NAMES)}")


def check_demo_dataset(name: str) -> None:
    """``demo`` trains on an offline task only: any other dataset fails saying what to do."""
    if name not in DEMO_DATASETS:
        raise InputError(
            f"demo trains a shipped tiny backbone at {DEMO_IMAGE_SIZE}px on an offline "
            f"jprompt_shapes task, not on dataset={name!r}: choose one of {list(DEMO_DATASETS)}, "
            f"or drop demo to train on {name} (its download and a full-size backbone)"
        )


def with_args(arg: str | None, **items) -> str:
    """``arg`` with ``key=value`` items replaced or added (for sweeps over config args)."""
    kept = [i for i in (arg or "").split(",") if i and i.partition("=")[0].strip() not in items]
    return ",".join(kept + [f"{key}={value}" for key, value in items.items()])


# VP's and AdaViPro's prompt sizes at 224px; 112 covers the whole image.
PROMPT_SIZES = (5, 30, 60, 90, 112)


def prompt_size_sweep(add, arg=None, name="prompt_size"):
    """The pixel-prompt configs' sweeps: ``prompt_size`` over ``PROMPT_SIZES``, or ``seeds``
    (the config once, repeated for ``--seeds``)."""
    if name == "prompt_size":
        for size in PROMPT_SIZES:
            add(arg=with_args(arg, prompt_size=size))
    elif name == "seeds":
        add()
    else:
        raise ValueError(f"unknown sweep {name!r}; valid choices: ['prompt_size', 'seeds']")


_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", tuple: "a tuple literal"}


def _from_text(what: str, current, text: str):
    """Command-line ``text`` as the type of ``current`` (text for text); ``what`` names it."""
    try:
        if isinstance(current, bool):
            return _parse_bool(text)
        if isinstance(current, (int, float)):
            return type(current)(text)
        if isinstance(current, tuple):
            return tuple(ast.literal_eval(text))
    except (ValueError, TypeError, SyntaxError):
        raise InputError(f"{what} expects {_EXPECTED[type(current)]}, got {text!r}") from None
    return text


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError(text)


def check_fewshot(dataset: str, shots: int, seed: int) -> None:
    """``shots``/``fewshot_seed`` name one of CoOp's draws, of a dataset that has them."""
    problem = fewshot.problem(shots, seed)
    if problem:
        raise InputError(f"{problem}: set the config arg to one of them")
    if shots and not presets.get(dataset).has_fewshot_draws:
        raise InputError(
            f"shots={shots} draws from CoOp's split files, and dataset={dataset!r} has none: "
            f"use one of {list(presets.FEWSHOT_PRESETS)}, or drop shots"
        )


def use_fewshot(config: ConfigDict) -> None:
    """Point the train and validation splits at the few-shot draw ``config.dataset`` names (after
    anything that sets the splits, such as a protocol)."""
    data = config.dataset
    if data.shots:
        for field in ("train_split", "val_split"):
            data[field] = fewshot.fewshot_split(data[field], data.shots, data.fewshot_seed)


def base_config(
    *, backbone: str, dataset: str, demo: bool, shots: int = 0, fewshot_seed: int = 1
) -> ConfigDict:
    """Fields every run has; each config file fills in its method and recipe."""
    if demo:
        check_demo_dataset(dataset)
        if backbone not in DEMO_CHECKPOINTS:
            raise InputError(f"demo runs the backbones {list(DEMO_CHECKPOINTS)}, not {backbone!r}")
    check_fewshot(dataset, shots, fewshot_seed)
    config = ConfigDict()
    config.seed = 0
    # Continue an unfinished workdir whose saved config differs, on purpose (jprompt.train.workdir).
    config.resume_with_changes = False
    # The paper protocol this run follows (jprompt.train.protocols; "" = none), set by the config
    # files for their paper's benchmarks with apply_protocol.
    config.protocol = ""

    preset = presets.get(dataset)
    config.dataset = ConfigDict(
        dict(
            preset=preset.name,  # a jprompt.data.presets name, or the plain tfds name
            name=preset.tfds_spec,  # what tfds reads: builder[/config][:version]
            data_dir="",  # "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
            train_split=preset.train,
            val_split=preset.val,  # model selection; never the test split
            test_split=preset.test,  # evaluated once, with the selected state
            label_map=preset.label_map,  # a label_maps.EXAMPLE_MAPS key; "" = the label feature
            num_classes=preset.num_classes,  # 0 = the builder's label feature decides
            # A mixture's (dataset=mix/...) training order: proportional | uniform
            # (jprompt.data.mixture_name.SAMPLINGS); a single dataset ignores it.
            sampling="proportional",
            # CoOp's few-shot draw (COMMON_ARGS): images per class (0 = the full splits), seed
            shots=shots,
            fewshot_seed=fewshot_seed,
        )
    )
    use_fewshot(config)
    # Also report the accuracy of the state that is best on the test split, labelled as such:
    # the official VP and PGN code select on test. Never used for model selection.
    config.report_test_selected = False
    # The state tested at the end: "val", the best on the validation split, or "last", the
    # final one (when the validation split is part of the training data, as in VPT's trainval).
    config.selection = "val"
    config.input = ConfigDict(
        dict(
            # SigLIP's files are trained at one resolution each (siglip_b16_384: 384 px).
            image_size=DEMO_IMAGE_SIZE if demo else backbones.native_image_size(backbone),
            # jprompt.data.preprocess.PreprocessSpec: crops, interpolation, augmentation
            train_crop=preset.train_crop,
            eval_crop=preset.eval_crop,
            resize="bilinear_antialias",  # bilinear_antialias | bilinear | bicubic
            train_resize="",  # the train crop's interpolation, where it differs; "" = resize
            augment="none",  # none | pgn
            flip=preset.flip,
            # "" = the backbone's own (its checkpoint's); minus_one_to_one | clip | imagenet
            normalization="",
            # False keeps every epoch's last, partial batch (padded and masked), as PyTorch's
            # DataLoader(drop_last=False) in the VPT and VP code
            drop_last=True,
            shuffle_buffer=10_000,
            # Leave out examples whose image does not decode (counted in a warning) instead of
            # stopping with an error that names them.
            skip_undecodable=False,
            # Keep each image decoded (and resized, where the train crop resizes before its
            # random draw; eval: the finished input) in memory after a split's first pass:
            # auto (when the split's estimate fits 2 GiB) | on | off. Same batches either way.
            cache_decoded="auto",
        )
    )
    checkpoint = DEMO_CHECKPOINTS[backbone] if demo else CHECKPOINTS.get(backbone, "")
    config.backbone = backbones.default_config(backbone, checkpoint=checkpoint)
    config.method = ConfigDict()
    text_backbone = DEMO_CLIP_BACKBONE if demo else "clip_b32"
    config.head = ConfigDict(
        dict(
            # linear (trains) | zeroshot (CLIP's frozen text classifier, the CLIP default) |
            # a label mapping onto a ViT checkpoint's own classifier: first_c (VP's), random,
            # frequency, iterative, semantic, fully_connected (jprompt.methods.label_mapping)
            name="zeroshot" if is_clip(backbone) else "linear",
            sources_per_class=1,  # label mappings: source classes averaged per target class
            remap_every_epochs=1,  # iterative: ILM-VP's --mapping-interval
            # semantic (AutoVP's): a file naming the source head's classes, one per line, and
            # the text tower that embeds them and the dataset's (AutoVP: CLIP ViT-B/32)
            source_class_names="",
            text_backbone=text_backbone,
            text_checkpoint=(DEMO_CHECKPOINTS if demo else CHECKPOINTS)[text_backbone],
            # zeroshot: () = the dataset's own class names (the preset's, where it has them)
            class_names=preset.class_names if isinstance(preset.class_names, tuple) else (),
            templates=preset.templates,  # zeroshot
            name_rule="vp",  # zeroshot: how class names are cleaned (heads.NAME_RULES)
        )
    )
    config.optim = ConfigDict(
        dict(
            name="sgd",  # sgd | adamw
            lr=0.1,
            lr_by_path=(),  # ((regex, lr), ...) over "/"-joined trainable parameter paths
            momentum=0.9,
            nesterov=False,
            b1=0.9,
            b2=0.999,
            weight_decay=0.0,
            grad_clip_norm=0.0,
            schedule="cosine",  # cosine | constant
            warmup_steps=0,
            warmup_epochs=0.0,  # added to warmup_steps
            warmup_rule="from_zero",  # from_zero | vp | pgn (jprompt.train.optim.WARMUP_RULES)
            end_lr_factor=0.0,
            schedule_unit="step",  # step | epoch (the schedule advances once per epoch)
        )
    )
    # Devices along the mesh's ``model`` axis, over which the frozen backbone is sharded
    # (jprompt.train.sharding); 1 replicates it on every device.
    config.model_axis_size = 1
    config.batch_size = 128 if demo else 256
    config.eval_batch_size = 256
    config.num_epochs = 10
    config.log_every_steps = 20 if demo else 100
    return config


def config_for_args(args: ConfigDict) -> ConfigDict:
    """``base_config`` for parsed ``backbone``/``dataset``/``demo`` (and optional ``head``) args
    (``parse_arg`` has resolved what ``demo`` fixes)."""
    config = base_config(
        backbone=args.backbone,
        dataset=args.dataset,
        demo=args.demo,
        shots=args.shots,
        fewshot_seed=args.fewshot_seed,
    )
    if args.get("head"):
        config.head.name = args.head
    return config


def apply_protocol(config: ConfigDict, name: str) -> ConfigDict:
    """Set every field that paper protocol ``name`` fixes (``jprompt.train.protocols``), except the
    backbone itself (the user's ``backbone=``) and the fields its runs vary.

    The checkpoint follows the protocol's file where the backbone is the paper's own.
    """
    protocol = protocols.get(name)
    config.protocol = name
    fields = protocol.fields(protocols.flatten(config.to_dict()))
    for field, value in fields.items():
        if field == "backbone.checkpoint_file":
            if fields["backbone.name"] == config.backbone.name:
                config.backbone.checkpoint = _checkpoint_path(value)
        elif field != "backbone.name" and field not in protocol.chosen_per_run:
            set_field(config, field, value)
    use_fewshot(config)  # a few-shot run trains on the draw of the protocol's splits
    return config


def _checkpoint_path(file_name: str) -> str:
    """Where a protocol's checkpoint file is found: the published IN-21k directory, or the
    converted CLIP directory."""
    if file_name in protocols.VPT_CHECKPOINTS.values():
        return ORIGINAL_IN21K + file_name
    return f"{CLIP_CHECKPOINT_DIR}/{file_name}"


def load_module(config_file: str):
    """The config file ``config_file`` as a module (``get_config``, and ``sweep`` if any)."""
    path = pathlib.Path(config_file)
    if not path.is_file():
        there = sorted(str(p) for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
        raise MissingFileError(
            f"config file {config_file!r} does not exist; "
            + (f"config files there: {there}" if there else "e.g. --config=configs/vp.py:demo")
        )
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str, overrides: Mapping[str, object] | None = None) -> ConfigDict:
    """The config of ``python -m jprompt.main --config=SPEC --config.FIELD=VALUE ...``.

    ``spec`` is ``path/to/file.py[:args]``; ``overrides`` maps dotted fields to values (a text
    value is converted to the field's type, as on the command line). The config is locked, so a
    misspelt field fails. E.g. ``load("configs/pgn.py:demo", {"num_epochs": 1})``.
    """
    config_file, _, arg = spec.partition(":")
    config = load_module(config_file).get_config(arg or None)
    for dotted, value in (overrides or {}).items():
        set_field(config, dotted, value)
    return config


def set_field(config: ConfigDict, dotted: str, value) -> None:
    """``config.<dotted> = value``; a text value is converted to the field's type. A field that
    does not exist fails naming the closest one."""
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not isinstance(node, ConfigDict):
            raise InputError(f"unknown config field {dotted!r}: {where!r} is a value, not a group")
        if part not in node:
            close = difflib.get_close_matches(part, list(node), n=1)
            meant = ".".join([*parts[:depth], *close, *parts[depth + 1 :]])
            hint = f"did you mean {meant!r}?" if close else f"fields there: {sorted(node)}"
            raise InputError(f"unknown config field {dotted!r}; {hint}")
        if depth < len(parts) - 1:
            node = node[part]
    if isinstance(value, str):
        value = _from_text(f"config field {dotted!r}", node[parts[-1]], value)
    node[parts[-1]] = value


def validate(config: ConfigDict) -> None:
    """One line naming the field and the fix for a value no run can use, before any work starts
    (``python -m jprompt.main`` and the trainer call it)."""
    check_backbone(config.backbone.name)
    if config.num_epochs < 0:
        raise InputError(
            f"num_epochs={config.num_epochs} is negative; set --config.num_epochs to 0 "
            "(evaluate only) or more"
        )
    for field in ("batch_size", "eval_batch_size", "log_every_steps"):
        if config[field] < 1:
            raise InputError(f"{field}={config[field]} is not positive; set --config.{field} >= 1")
    optim.validate(config.optim)
    data = config.dataset
    check_fewshot(data.preset, data.shots, data.fewshot_seed)
    for field in ("train_split", "val_split") if data.shots else ():
        drawn = fewshot.fewshot_split(data[field], data.shots, data.fewshot_seed)
        if data[field] != drawn:
            raise InputError(
                f"dataset.{field}={data[field]!r} does not read the draw {drawn!r} of "
                f"dataset.shots={data.shots}, dataset.fewshot_seed={data.fewshot_seed}: set "
                "them as config args (configs/FILE.py:...,shots=K,fewshot_seed=S), which set "
                "the splits"
            )


def lock(config: ConfigDict) -> ConfigDict:
    """Freeze the set of fields: overriding a field that does not exist fails."""
    config.lock()
    return config


def to_json(config: ConfigDict) -> str:
    return config.to_json_best_effort(sort_keys=True)
