r"""Pretrain the demo backbone: a tiny ViT trained from scratch on ``jprompt_shapes/shapes``.

    python -m jprompt.pretrain_demo --workdir=/tmp/pretrain_tiny \
        --out=jprompt/assets/vit_tiny4_shapes.npz

(or ``python -m jprompt.main --config=configs/pretrain_tiny.py --workdir=...`` to train only).
The shipped ``jprompt/assets/vit_tiny4_shapes.npz`` came from this config with seed 0: source
task test accuracy 0.44 (10 classes, chance 0.10) after 20 epochs, about 5 minutes on 2 CPU
cores. Every target-task demo adapts that file.

Args: epochs=N (default 20).
"""

from jprompt import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, epochs=20)
    config = config_lib.base_config(
        backbone=config_lib.DEMO_BACKBONE, dataset="jprompt_shapes/shapes", demo=True
    )
    config.backbone.checkpoint = ""  # from scratch
    config.method.name = "finetune"
    config.method.head_init = "zeros"
    config.input.flip = True
    config.num_epochs = args.epochs
    config.optim.name = "adamw"
    config.optim.lr = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.grad_clip_norm = 1.0
    config.optim.warmup_epochs = 2
    return config_lib.lock(config)
