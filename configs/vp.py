r"""VP: a learned pixel frame on a frozen backbone (Bahng et al. 2022).

    python -m jprompt.main --config=configs/vp.py:demo --workdir=/tmp/vp_demo
    python -m jprompt.main --config=configs/vp.py:demo,prompter=random_patch --workdir=/tmp/vp_rp
    python -m jprompt.main --config=configs/vp.py --workdir=/tmp/vp_cifar100
    python -m jprompt.main --config=configs/vp.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/vp_vit_cifar100

Args (comma-separated after the file name):
  backbone=NAME   a backbone from jprompt.models.backbones.NAMES. Default clip_b32, the paper's
                  setting: CLIP ViT-B/32 with its frozen zero-shot text head (convert OpenAI's
                  ViT-B-32.pt once with python -m jprompt.tools.convert_clip into
                  ~/jprompt_models/clip_b32.npz). A ViT (e.g. vit_b16, the augreg IN-21k file)
                  gets a linear head that trains next to the prompt.
  head=NAME       zeroshot or linear (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME    a preset of jprompt.data.presets (cifar10, eurosat, clevr_count, ...) or
                  any tfds name (default cifar100)
  prompt_size=P   width of the frame, or side of the patch, in pixels (default 30 at 224px;
                  the frame goes up to half the image, 112, where it covers all of it)
  prompter=NAME   padding (default: the frame), fixed_patch (one P x P patch at the top-left
                  corner) or random_patch (that patch at a random place on every forward pass,
                  evaluation included, as in the official code); see jprompt/methods/vp.py
  input_scale     AutoVP's learned input scale (padding prompter only; see
                  jprompt/methods/input_scaling.py): the image, shrunk to S - 2P, is magnified
                  about the centre by a trainable scale, and the frame (a whole S x S canvas,
                  masked) covers the border it leaves. P defaults to AutoVP's 128px image in a
                  224px canvas (48 at 224px, 7 in the demo)
  init_scale=X    with input_scale: the scale it starts at (default 1.5, AutoVP's demo.py;
                  within its clamp [0.1, 5])
  demo            offline, on 2 CPU cores: fixes the backbone to a shipped tiny one pretrained
                  on jprompt_shapes/shapes (the tiny CLIP with its frozen zero-shot head by
                  default or with backbone=clip_*, the tiny ViT with a linear head with
                  backbone=vit_*), the dataset to jprompt_shapes/colors (8 classes, chance
                  0.125; dataset= may name another jprompt_shapes task, any other dataset is an
                  error), 32px images and the demo recipe below. It prints the test accuracy
                  (README lists it)

Recipe from the paper's code: SGD lr 40, momentum 0.9, no weight decay, batch 256, 1000 epochs,
1000 warmup steps (step s at lr 40 (s + 1) / 1000), cosine decay per step, the template "This
is a photo of a {}" on every dataset. With a CLIP backbone on VP's datasets the whole VP
protocol applies (jprompt.train.protocols, recorded in results.json): CLIP's preprocess at train and
test (shorter side to 224, bicubic, centre crop), training on everything but the test split,
every epoch's last partial batch kept, the last epoch tested, and the official number (the best
test accuracy over training) reported beside it, labelled. The linear head trained next to the
prompt on a ViT (see jprompt/methods/vp.py) uses lr 0.1. The demo trains 5 epochs: on the tiny
CLIP an 8px frame at lr 10, on the tiny ViT a 4px frame at lr 1 and the head at lr 0.1.

With input_scale the scale trains in the prompt's group, at its lr, as in AutoVP, its gradient
clipped to +-0.001 / 2^16 (config.method.scale_grad_clip: AutoVP's clip_grad_value_ on a loss
scaled by GradScaler's 2^16), so at lr 40 it moves slowly, as in AutoVP's CLIP runs; its own lr
goes first in lr_by_path, e.g. --config.optim.lr_by_path='(("prompter/scale", 1.0), ("head/.*",
0.1))'.
"""

from jprompt.data import presets
from jprompt.errors import InputError
from jprompt.methods import input_scaling
from jprompt.methods.vp import PROMPTERS, check_input_scale
from jprompt.train import config_lib, protocols


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg,
        backbone="clip_b32",
        head="",
        dataset="cifar100",
        prompt_size=30,
        prompter="padding",
        input_scale=False,
        init_scale=input_scaling.INIT_SCALE,
        demo=False,
    )
    if args.prompter not in PROMPTERS:
        raise ValueError(f"unknown prompter {args.prompter!r}; valid choices: {PROMPTERS}")
    config = config_lib.config_for_args(args)
    config.method.name = "vp"
    config.method.prompt_size = args.prompt_size
    config.method.prompter = args.prompter
    config.method.head_init = "zeros"
    config.head.templates = protocols.VP_TEMPLATES  # VP's, on every dataset (main_clip.py)

    config.optim.lr = 40.0
    config.optim.lr_by_path = (("head/.*", 0.1),)  # a linear head, when there is one
    config.optim.warmup_steps = 1000
    config.num_epochs = 1000
    if args.demo:
        demo_size, config.optim.lr = config_lib.demo_pixel_prompt(config.backbone.name)
        config.method.prompt_size = demo_size if args.prompt_size == 30 else args.prompt_size
        config.optim.warmup_steps = 20
        config.num_epochs = 5
    elif config.head.name == "zeroshot" and config.dataset.preset in presets.VP_DATASETS:
        config_lib.apply_protocol(config, "vp")  # the paper's setting: CLIP, zero-shot head
    if args.input_scale:
        if args.prompt_size == 30:
            size = config.input.image_size
            config.method.prompt_size = input_scaling.autovp_prompt_size(size)
        check_input_scale(
            args.prompter, config.method.prompt_size, config.input.image_size, args.init_scale
        )
        config.method.input_scale = True
        config.method.init_scale = args.init_scale
        config.method.scale_grad_clip = input_scaling.GRAD_CLIP
    elif args.init_scale != input_scaling.INIT_SCALE:
        raise InputError(f"init_scale={args.init_scale} needs input_scale: add input_scale")
    return config_lib.lock(config)


# Sweeps (python -m jprompt.tools.sweep --sweep=NAME): prompt_size over the papers' sizes, or seeds.
sweep = config_lib.prompt_size_sweep
