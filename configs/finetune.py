r"""Full fine-tuning: every backbone parameter and a new linear head train.

    python -m jprompt.main --config=configs/finetune.py:demo --workdir=/tmp/finetune_demo
    python -m jprompt.main --config=configs/finetune.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/finetune_cifar100

Args: backbone=NAME (default vit_b16; any of jprompt.models.backbones.NAMES), head=linear|zeroshot
(default: zeroshot on CLIP, which then stays frozen, linear on ViT), dataset=NAME (default
cifar100), demo (offline: fixes the backbone to the shipped tiny ViT, or the tiny CLIP with
backbone=clip_*, the dataset to jprompt_shapes/colors or another jprompt_shapes task given as
dataset=, 32px images, batch 128, lr 0.03 and 20 warmup steps).

Recipe of vit_jax's fine-tuning: SGD momentum 0.9, lr 0.01, no weight decay, global-norm gradient
clipping at 1, 500 warmup steps then cosine, batch 512, 10 epochs here.
"""

from jprompt.train import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, backbone="vit_b16", head="", dataset="cifar100", demo=False)
    config = config_lib.config_for_args(args)
    config.method.name = "finetune"
    config.method.head_init = "zeros"

    config.batch_size = 512
    config.optim.lr = 0.01
    config.optim.grad_clip_norm = 1.0
    config.optim.warmup_steps = 500
    config.num_epochs = 10
    if args.demo:
        config.batch_size = 128
        config.optim.lr = 0.03
        config.optim.warmup_steps = 20
    return config_lib.lock(config)
