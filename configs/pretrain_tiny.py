r"""Pretrain a demo backbone: a tiny ViT or CLIP trained from scratch on ``jprompt_shapes/shapes``.

    python -m jprompt.tools.pretrain_demo --workdir=/tmp/pretrain_tiny \
        --out=jprompt/assets/vit_tiny4_shapes.npz
    python -m jprompt.tools.pretrain_demo --backbone=clip_tiny4 --workdir=/tmp/pretrain_clip \
        --out=jprompt/assets/clip_tiny4_shapes.npz

(or ``python -m jprompt.main --config=configs/pretrain_tiny.py --workdir=...`` to train only).
The shipped ``jprompt/assets/vit_tiny4_shapes.npz`` came from this config with seed 0 after 20
epochs (10 classes, chance 0.10); the command prints its source task test accuracy. Every ViT
target-task demo adapts that file.

The tiny CLIP is no contrastive model: its text tower keeps its random initialisation (seed 0)
and only the image tower trains, through the frozen zero-shot head made of that text tower's
embeddings of "This is a photo of a {shape}". That is enough for what the CLIP demos need: a
frozen image tower with useful features and a frozen text classifier the prompt methods must
work through, as with a real CLIP. Every CLIP target-task demo adapts the shipped
``jprompt/assets/clip_tiny4_shapes.npz``, which came from this config with seed 0 after 60
epochs; the command prints its source task zero-shot test accuracy.

Args: backbone=vit_tiny4 | clip_tiny4, epochs=N (default: 20 for the ViT, 60 for the CLIP, the
shipped files' settings).
"""

from jprompt.train import config_lib

DEFAULT_EPOCHS = {config_lib.DEMO_BACKBONE: 20, config_lib.DEMO_CLIP_BACKBONE: 60}


def get_config(arg=None):
    args = config_lib.parse_arg(arg, epochs=0, backbone=config_lib.DEMO_BACKBONE)
    demo_backbones = (config_lib.DEMO_BACKBONE, config_lib.DEMO_CLIP_BACKBONE)
    if args.backbone not in demo_backbones:
        raise ValueError(f"unknown backbone {args.backbone!r}; valid choices: {demo_backbones}")
    config = config_lib.base_config(
        backbone=args.backbone, dataset="jprompt_shapes/shapes", demo=True
    )
    config.backbone.checkpoint = ""  # from scratch
    config.method.name = "finetune"
    config.method.head_init = "zeros"
    config.input.flip = True
    config.num_epochs = args.epochs or DEFAULT_EPOCHS[args.backbone]
    config.optim.name = "adamw"
    config.optim.lr = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.grad_clip_norm = 1.0
    config.optim.warmup_epochs = 2
    return config_lib.lock(config)
