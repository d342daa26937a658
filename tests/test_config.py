"""Config files build for each documented arg; bad names and typos fail clearly."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt import methods
from jprompt.methods.heads import HEAD_INITS, ZeroShotHead
from jprompt.models import backbones, clip, siglip
from jprompt.train import config_lib, optim, protocols

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every arg each config file documents in its docstring.
DOCUMENTED_ARGS = {
    "vp.py": [
        "",
        "demo",
        "backbone=vit_s16",
        "dataset=cifar10",
        "prompt_size=20",
        "demo,prompt_size=6",
        "prompter=fixed_patch",
        "demo,prompter=random_patch",
        "backbone=vit_b16",
        "demo,backbone=vit_b16",
        "head=linear",
        "input_scale",
        "demo,input_scale",
        "input_scale,init_scale=1.0",
        "demo,backbone=vit_b16,head=iterative",
    ],
    "vpt.py": [
        "",
        "demo",
        "deep",
        "demo,deep",
        "num_tokens=100",
        "deep,num_tokens=50,dataset=dtd",
        "backbone=vit_s16",
        "dataset=cifar10",
        "backbone=clip_b32",
        "demo,backbone=clip_b32,deep",
        "backbone=clip_b16,head=linear",
        "spt",
        "deep,spt,spt_sample=max_pooling",
        "backbone=dinov2_b14_reg",
        "deep,spt,backbone=mae_b16,dataset=vtab/dtd",
        "deep,backbone=siglip_b16_384",
        "backbone=siglip_b16_224,head=zeroshot",
    ],
    "adavipro.py": [
        "",
        "demo",
        "backbone=vit_s16",
        "dataset=cifar10",
        "prompt_size=20",
        "region_size=16",
        "demo,prompt_size=6",
        "backbone=clip_b32",
        "demo,backbone=clip_b32",
    ],
    "pgn.py": [
        "",
        "demo",
        "backbone=vit_s16",
        "dataset=cifar10",
        "num_tokens=8",
        "library_size=256",
        "baseline",
        "demo,baseline",
        "demo,num_tokens=4,library_size=64",
        "backbone=vit_b32",
        "demo,backbone=vit_b32",
        "head=linear",
        "backbone=mocov3_b16",
    ],
    "linear_probe.py": ["", "demo", "backbone=vit_s16", "dataset=cifar10", "backbone=clip_b32"],
    "finetune.py": ["", "demo", "backbone=vit_ti16", "dataset=cifar10", "backbone=clip_b32"],
    "pretrain_tiny.py": ["", "epochs=3", "backbone=clip_tiny4"],
    "evp.py": ["", "demo", "demo,backbone=vit_b16", "backbone=vit_b16", "prompt_size=20"],
    "lor_vp.py": ["", "demo", "demo,backbone=clip_b32", "rank=8,dataset=cifar10", "head=zeroshot"],
    "vfpt.py": ["", "demo", "demo,deep", "deep,fourier=1.0", "fourier_dims=sequence", "spt"],
    "e2vpt.py": [
        "",
        "demo",
        "demo,deep=false",
        "kv_deep=false,share_kv=false",
        "dataset=vtab/dtd,trainval",
    ],
    "zeroshot.py": [
        "",
        "demo",
        "demo,dataset=jprompt_shapes/shapes",
        "backbone=clip_l14",
        "dataset=cifar10",
    ],
}


def load_config_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_file_is_covered():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.py")) == sorted(DOCUMENTED_ARGS)


@pytest.mark.parametrize("file,arg", [(f, a) for f, args in DOCUMENTED_ARGS.items() for a in args])
def test_config_builds_method_and_optimizer(file, arg):
    config = load_config_module(file).get_config(arg)
    module_config = config.backbone
    assert module_config.name in backbones.NAMES
    assert config.method.name in methods.METHODS
    assert config.method.get("head_init", "zeros") in HEAD_INITS
    is_clip = module_config.name in clip.NAMES
    if is_clip:  # a zero-shot head by default; the linear probe always trains a linear one
        linear = "head=linear" in arg or file == "linear_probe.py"
        assert config.head.name == ("linear" if linear else "zeroshot")
    if file == "pretrain_tiny.py":  # the one config that trains a backbone from scratch
        assert config.backbone.checkpoint == ""
    elif "demo" in arg:
        assert config.dataset.name.startswith("jprompt_shapes/")
        assert config.backbone.checkpoint == config_lib.DEMO_CHECKPOINTS[module_config.name]
    elif is_clip:
        assert config.backbone.checkpoint == f"~/jprompt_models/{module_config.name}.npz"
    elif module_config.name in backbones.TORCH_VITS | backbones.SIGLIP_FILES:  # as downloaded
        file_name = (backbones.TORCH_VIT_FILES | backbones.SIGLIP_FILES)[module_config.name]
        assert config.backbone.checkpoint == f"~/jprompt_models/{file_name}"
    elif (
        file in ("vpt.py", "vfpt.py", "e2vpt.py")
        and module_config.name in protocols.VPT_CHECKPOINTS
    ):
        # VPT's backbones load the original IN-21k files VPT's code loads.
        assert config.backbone.checkpoint.startswith("gs://vit_models/imagenet21k/")
    else:
        assert config.backbone.checkpoint.startswith("gs://vit_models/augreg/")
    # Build the real method on the real backbone module, abstractly (no weights allocated).
    if is_clip:
        module = clip.image_tower(module_config.name)
    elif module_config.name in backbones.TORCH_VITS:
        module = backbones.torch_vit_module(module_config.name, pool=module_config.pool)
    elif module_config.name in siglip.NAMES:
        module = siglip.image_tower(module_config.name)
    else:
        module = backbones.vit.create(module_config.name, num_classes=0, pool=module_config.pool)
    backbone = backbones.Backbone(module_config.name, module, config.input.image_size, "x")
    options = {k: v for k, v in config.method.items() if k != "name"}
    if config.head.name == "zeroshot":
        options["zeroshot"] = ZeroShotHead(np.eye(10, module.feature_dim), logit_scale=4.6)
    method = methods.build(config.method.name, backbone=backbone, num_classes=10, **options)
    size = config.input.image_size
    backbone_params = jax.eval_shape(
        backbone.module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))
    )["params"]
    trained, _ = jax.eval_shape(method.init, jax.random.PRNGKey(0), backbone_params)
    tx, _ = optim.build(config.optim, trained["params"], total_steps=100, steps_per_epoch=10)
    jax.eval_shape(tx.init, trained["params"])


def test_configs_are_locked():
    config = load_config_module("vp.py").get_config("demo")
    with pytest.raises(AttributeError):
        config.optim.lrr = 0.1


def test_parse_arg_types_and_errors():
    args = config_lib.parse_arg(
        "backbone=vit_s16,deep,prompt_size=12", backbone="vit_b16", deep=False, prompt_size=30
    )
    assert args.backbone == "vit_s16" and args.deep is True and args.prompt_size == 12
    with pytest.raises(ValueError, match=r"unknown config arg 'backbon'; valid args: \['backbone'"):
        config_lib.parse_arg("backbon=vit_s16", backbone="vit_b16")
    with pytest.raises(ValueError, match="^config arg 'demo' expects true/false, got 'maybe'$"):
        config_lib.parse_arg("demo=maybe", demo=False)
    with pytest.raises(ValueError, match="^config arg 'prompt_size' expects an integer, got 'x'$"):
        config_lib.parse_arg("prompt_size=x", prompt_size=30)


def test_demo_keeps_an_offline_task_given_as_dataset():
    config = config_lib.load("configs/zeroshot.py:demo,dataset=jprompt_shapes/shapes")
    assert config.backbone.name == config_lib.DEMO_CLIP_BACKBONE
    assert (config.dataset.name, config.dataset.num_classes) == ("jprompt_shapes/shapes", 10)
    assert config_lib.load("configs/vp.py:demo").dataset.name == config_lib.DEMO_DATASET


def test_every_config_has_the_mixture_sampling_field():
    for file in DOCUMENTED_ARGS:
        assert load_config_module(file).get_config(None).dataset.sampling == "proportional"


def test_unknown_method_and_option_fail_listing_choices():
    with pytest.raises(ValueError, match=r"unknown method 'vtp'; valid choices: \["):
        methods.build("vtp", backbone=None, num_classes=10)
    with pytest.raises(ValueError, match=r"no option\(s\) \['prompt_sise'\]; valid options: "):
        methods.build("vp", backbone=None, num_classes=10, prompt_sise=3)
