"""Paper protocols: each paper's config realises its protocol, and the card says when not."""

import pytest

from jprompt.data import pipeline
from jprompt.models import backbones
from jprompt.train import config_lib, protocols
from tests.helpers import ROOT


def load(spec: str):
    file, _, arg = spec.partition(":")
    return config_lib.load(f"{ROOT / 'configs' / file}:{arg}")


def card_of(config) -> dict:
    normalization = config.input.normalization or (
        "clip" if config_lib.is_clip(config.backbone.name) else "minus_one_to_one"
    )
    return protocols.card(
        config.to_dict(),
        activation=backbones.activation(config.backbone),
        normalization=normalization,
        checkpoint_sha256="",
    )


@pytest.mark.parametrize(
    "spec, protocol",
    [
        ("vpt.py:dataset=vtab/dtd,deep,trainval", "vpt"),
        ("vpt.py:dataset=vtab/kitti_distance,trainval,num_tokens=100", "vpt"),
        ("vpt.py:dataset=fgvc/cub", "vpt"),
        ("vp.py", "vp"),
        ("vp.py:dataset=eurosat,prompter=random_patch", "vp"),
        ("adavipro.py:dataset=cifar10", "adavipro"),
        ("pgn.py:dataset=dtd", "pgn"),
        ("pgn.py:dataset=resisc45", "pgn"),
        ("pgn.py", "pgn"),
    ],
)
def test_each_paper_config_follows_its_protocol(spec, protocol):
    config = load(spec)
    assert config.protocol == protocol
    assert protocols.differences(card_of(config), protocol) == []


def test_vpt_protocol_is_vpts_code():
    config = load("vpt.py:dataset=vtab/kitti_distance,deep,trainval")
    assert config.backbone.checkpoint == "gs://vit_models/imagenet21k/ViT-B_16.npz"
    assert config.backbone.activation == "gelu_exact"
    assert config.input.normalization == "imagenet"
    assert (config.input.train_crop, config.input.resize, config.input.flip) == (
        "resize",
        "bilinear",
        False,
    )
    assert config.dataset.name == "kitti:3.2.0"
    assert config.dataset.train_split == "train[:800]+validation[:200]"
    assert config.selection == "last" and not config.input.drop_last
    # VPT's loader keeps the last partial batch: 1,000 examples at batch 128 are 8 steps.
    assert pipeline.steps_per_epoch(1000, config.batch_size, drop_last=False) == 8
    fgvc = load("vpt.py:dataset=fgvc/stanford_dogs")
    assert (fgvc.input.train_crop, fgvc.input.eval_crop, fgvc.input.flip) == (
        "resize_random_crop",
        "resize_center_crop",
        True,
    )
    # A tuning run (train800, selected on val200) is VPT's protocol but not its reported run.
    tuning = card_of(load("vpt.py:dataset=vtab/dtd,deep"))
    assert protocols.differences(tuning, "vpt") == [
        "dataset.train_split: 'train[:800]' (paper: 'train[:800]+validation[:200]')",
        "selection: 'val' (paper: 'last')",
    ]
    # Other backbones keep their own checkpoint and stay off the protocol.
    other = load("vpt.py:dataset=vtab/dtd,backbone=vit_s16")
    assert other.protocol == "" and "augreg" in other.backbone.checkpoint


def test_vp_and_adavipro_protocols_are_vps_code():
    for spec in ("vp.py", "adavipro.py"):
        config = load(spec)
        assert config.backbone.name == "clip_b32" and config.head.name == "zeroshot"
        assert config.head.templates == ("This is a photo of a {}",)
        assert (config.input.train_crop, config.input.eval_crop, config.input.resize) == (
            "center_crop",
            "center_crop",
            "bicubic",
        )
        assert config.dataset.train_split == "train[:90%]+train[90%:]"  # all of CIFAR-100's
        assert config.report_test_selected and config.optim.warmup_rule == "vp"
    # EuroSAT's test part is carved out of tfds's train: VP trains on everything else.
    assert load("vp.py:dataset=eurosat").dataset.train_split == "train[:60%]+train[60%:80%]"
    assert load("adavipro.py:backbone=vit_b16").protocol == ""  # the ViT option stays


def test_pgn_protocol_reads_coop_splits_and_pgn_names():
    config = load("pgn.py:dataset=dtd")
    assert config.dataset.preset == "coop/dtd"
    assert config.dataset.train_split == "train+validation"
    assert config.head.name_rule == "pgn" and "polka-dotted" in config.head.class_names
    assert (config.input.train_crop, config.input.train_resize, config.input.augment) == (
        "random_resized_crop_scale_1",
        "bicubic",
        "pgn",
    )
    assert config.input.eval_crop == "center_crop" and config.optim.warmup_rule == "pgn"
    # The paper's numbers are CLIP's: the ViT option and the baseline stay off the protocol.
    assert load("pgn.py:dataset=dtd,backbone=vit_b32").protocol == ""
    assert load("pgn.py:dataset=dtd,baseline").protocol == ""


def test_a_departure_is_named_field_by_field():
    config = load("pgn.py:dataset=eurosat")
    config.unlock()
    config.input.augment = "none"
    config.optim.lr = 0.5
    assert protocols.differences(card_of(config), "pgn") == [
        "input.augment: 'none' (paper: 'pgn')",
        "optim.lr: 0.5 (paper: 0.1)",
    ]
    assert protocols.differences(card_of(load("vpt.py:dataset=vtab/dtd")), "pgn") == [
        "method.name: 'vpt' (paper: one of ['pgn'])"
    ]
    with pytest.raises(ValueError, match="unknown protocol 'vtab'; valid choices"):
        protocols.get("vtab")
