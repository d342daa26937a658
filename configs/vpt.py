r"""VPT: learned prompt tokens in a frozen ViT, shallow or deep (Jia et al. 2022).

    python -m jprompt.main --config=configs/vpt.py:demo --workdir=/tmp/vpt_demo
    python -m jprompt.main --config=configs/vpt.py:demo,deep --workdir=/tmp/vpt_deep_demo
    python -m jprompt.main --config=configs/vpt.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/vpt_cifar100
    python -m jprompt.main --config=configs/vpt.py:deep,num_tokens=50,dataset=dtd \
        --workdir=/tmp/vpt_deep_dtd
    python -m jprompt.main --config=configs/vpt.py:dataset=vtab/dtd,deep --workdir=/tmp/vtab_dtd
    python -m jprompt.tools.sweep --config=configs/vpt.py:dataset=vtab/dtd,deep --sweep=lr_wd \
        --workdir=/tmp/vtab_dtd_sweep        # the 40-point lr x wd grid, as commands

Args (comma-separated after the file name):
  deep            VPT-deep: a fresh set of tokens before every layer (default: shallow)
  num_tokens=P    prompt tokens per layer (default 10); P >= 100 halves the batch to 64
  backbone=NAME   a backbone from jprompt.models.backbones.NAMES (default vit_b16). VPT's own
                  sizes (vit_b16, vit_l16, vit_h14) load the original IN-21k files VPT used
                  (gs://vit_models/imagenet21k/ViT-B_16.npz ...) with exact GELU and ImageNet
                  mean/std pixels, as VPT's PyTorch code runs them; other ViTs their augreg
                  files. On a CLIP backbone the tokens follow the class token and enter before
                  ln_pre
  head=NAME       linear or zeroshot (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME    a preset of jprompt.data.presets (vtab/dtd, fgvc/cub, cifar100, ...) or any
                  tfds name (default cifar100); the preset sets splits, classes, preprocessing
  spt             Self-Prompt Tuning init (jprompt.methods.vpt.spt_prompts): the tokens start
                  as prototypes of the training images' tokens, each layer's from the tokens
                  it sits among, instead of the uniform draw; the recipe stays VPT's (SPT's
                  README uses num_tokens=20 deep, 100 shallow). spt_sample=random (default),
                  mean_pooling or max_pooling (deep); spt_images=N images (default 0: as many
                  as the training split has, as the official code)
  trainval        train on the preset's train+validation split (VTAB: train800val200), VPT's
                  final run once lr and wd were chosen on val200; the validation split then
                  overlaps training, so the last epoch's state is tested (selection="last")
  demo            offline, on 2 CPU cores: fixes the backbone to the shipped tiny ViT
                  pretrained on jprompt_shapes/shapes (the tiny CLIP with backbone=clip_*), the
                  dataset to jprompt_shapes/colors (8 classes, chance 0.125; dataset= may name
                  another jprompt_shapes task, any other dataset is an error), 32px images and
                  the demo recipe below; 1,160 trainable parameters shallow (10 tokens + head),
                  1,800 deep. It prints the test accuracy (README lists it)

Recipe from the official code: SGD momentum 0.9 with coupled weight decay (L2 added to the
gradient; jprompt.train.optim leaves biases out of it), batch 128 (64 when num_tokens >= 100),
100 epochs, 10 warmup epochs then cosine, the schedule stepped once per epoch. Prompt dropout 0.1
for deep, 0 for shallow. VPT picks lr and wd per task on a validation split, from
lr {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05} x batch/256 and wd {0.01, 1e-3, 1e-4, 0}.
The defaults here are one point of that grid, not a tuned value: lr 0.25 x batch/256 (0.125 at
batch 128) and wd 1e-4 (the official base-prompt.yaml's default); override with
``--config.optim.lr=... --config.optim.weight_decay=...`` to search. The head (He-normal
fan_out, bias -log(99)) trains with the same lr as the prompts, as in the official code.
On VTAB-1k and FGVC presets (vtab/*, fgvc/*) with VPT's backbones the whole VPT protocol
applies (jprompt.train.protocols, recorded in results.json): VTAB images resized to 224 by
tf.image.resize without antialiasing, FGVC's torchvision Resize(256) (shorter side) + random
crop 224 + flip and Resize(256) + centre crop at test, every epoch's last partial batch kept
(800 examples at batch 128: 7 steps), KITTI as VPT's tfds version. ``trainval`` makes it VPT's
reported run (train800val200, last epoch); without it, a tuning run on train800.

Sweeps (python -m jprompt.tools.sweep --sweep=NAME, each run repeated for --seeds):
  lr_wd        the grid above: lr {50 ... 0.05} x batch/256, wd {0.01, 1e-3, 1e-4, 0}
  num_tokens   prompt lengths {1, 5, 10, 50, 100, 200} (batch 64 from 100 tokens on)
  seeds        this config once (for repeated seeds)

The demo trains 5 epochs at lr 0.25 (prompts and head), warming up over the first 20 steps and
stepping the cosine per step (with only 5 epochs, a per-epoch schedule would spend the whole
first epoch at lr 0), and starts the head at zero like the other demos: on the tiny backbone the
random VPT head init made the first epoch diverge and ended clearly below the zero head at every
lr from 0.1 to 5.
"""

from jprompt.data import presets
from jprompt.train import config_lib, protocols

BASE_LR = 0.25  # per 256 examples; VPT's grid point, scaled by batch/256 below
LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)  # per 256 examples
WD_GRID = (0.01, 1e-3, 1e-4, 0.0)
PROMPT_LENGTHS = (1, 5, 10, 50, 100, 200)
WEIGHT_DECAY = 1e-4
DEEP_DROPOUT = 0.1
DEMO_LR = 0.25
DEMO_WARMUP_STEPS = 20
# VPT's benchmarks, where configs/vpt.py follows VPT's protocol (jprompt.train.protocols) by
# default.
VPT_GROUPS = ("vtab-natural", "vtab-specialized", "vtab-structured", "fgvc")


# The config args and their defaults (configs/vfpt.py adds its own to these).
ARGS = dict(
    backbone="vit_b16",
    head="",
    dataset="cifar100",
    num_tokens=10,
    deep=False,
    trainval=False,
    spt=False,
    spt_sample="random",
    spt_images=0,
    demo=False,
)


def get_config(arg=None):
    return config_lib.lock(vpt_config(config_lib.parse_arg(arg, **ARGS)))


def vpt_config(args):
    """The unlocked config for parsed ``ARGS`` (configs/vfpt.py builds on it)."""
    config = config_lib.config_for_args(args)
    if args.trainval:
        config.dataset.train_split = _trainval_split(config.dataset.preset)
        config.selection = "last"  # validation is training data now: VPT reports the last epoch
    config.method.name = "vpt"
    config.method.num_tokens = args.num_tokens
    config.method.deep = args.deep
    config.method.dropout = DEEP_DROPOUT if args.deep else 0.0
    config.method.project_dim = -1
    config.method.head_init = "vpt"
    config.method.prompt_init = "spt" if args.spt else "uniform"
    config.method.spt_sample = args.spt_sample
    config.method.spt_images = args.spt_images

    config.batch_size = 64 if args.num_tokens >= 100 else 128
    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.lr = BASE_LR * config.batch_size / 256
    config.optim.weight_decay = WEIGHT_DECAY
    config.optim.schedule = "cosine"
    config.optim.warmup_epochs = 10
    config.optim.schedule_unit = "epoch"
    config.num_epochs = 100
    if not args.demo and args.backbone in protocols.VPT_CHECKPOINTS:
        # VPT's backbones as its code runs them: the original IN-21k file, exact GELU, pixels
        # normalised with ImageNet's mean and std; on its benchmarks, its whole protocol.
        file_name = protocols.VPT_CHECKPOINTS[args.backbone]
        config.backbone.checkpoint = config_lib.ORIGINAL_IN21K + file_name
        config.backbone.activation = "gelu_exact"
        config.input.normalization = "imagenet"
        if presets.get(config.dataset.preset).group in VPT_GROUPS:
            config_lib.apply_protocol(config, "vpt")
    if args.demo:
        config.method.head_init = "zeros"
        config.optim.lr = DEMO_LR
        config.optim.warmup_epochs = 0
        config.optim.warmup_steps = DEMO_WARMUP_STEPS
        config.optim.schedule_unit = "step"
        config.num_epochs = 5
    return config


def locked_successor(config, args, batch_size: int):
    """The locked config of a method built on VPT's code (VFPT, E2VPT): VPT's recipe at that
    method's ``batch_size`` (lr scaled by batch/256 as VPT's), outside the demo. VPT's data
    protocol stays, but no paper protocol is claimed: the card of "vpt" names VPT's method and
    batch."""
    if not args.demo:
        config.batch_size = batch_size
        config.optim.lr = BASE_LR * batch_size / 256
    config.protocol = ""
    return config_lib.lock(config)


def _trainval_split(preset_name: str) -> str:
    split = presets.get(preset_name).trainval
    if not split:
        with_trainval = [n for n, p in presets.PRESETS.items() if p.trainval]
        raise ValueError(
            f"dataset {preset_name!r} has no trainval split; presets with one: {with_trainval}"
        )
    return split


def sweep(add, arg=None, name="lr_wd", get=get_config):
    """VPT's searches; see the module docstring. ``get`` is the config file's ``get_config``."""
    if name == "lr_wd":
        batch_size = get(arg).batch_size
        for lr in LR_GRID:
            for wd in WD_GRID:
                add(**{"optim.lr": lr * batch_size / 256, "optim.weight_decay": wd})
    elif name == "num_tokens":
        for num_tokens in PROMPT_LENGTHS:
            add(arg=config_lib.with_args(arg, num_tokens=num_tokens))
    elif name == "seeds":
        add()
    else:
        raise ValueError(f"unknown sweep {name!r}; valid choices: ['lr_wd', 'num_tokens', 'seeds']")
