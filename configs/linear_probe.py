r"""Linear probe: a linear classifier on the frozen backbone's features.

    python -m jprompt.main --config=configs/linear_probe.py:demo --workdir=/tmp/linear_demo
    python -m jprompt.main --config=configs/linear_probe.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/linear_cifar100

Args: backbone=NAME (default vit_b16; on a CLIP backbone the probe reads its projected image
features), dataset=NAME (default cifar100), demo (offline tiny run).

Recipe as VPT's linear baseline: SGD momentum 0.9, batch 256, 100 epochs, 10 warmup epochs then
cosine; lr 0.1 here (VPT searches {50 ... 0.05} x batch/256 on a validation split).
"""

from jprompt import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, backbone="vit_b16", dataset="cifar100", demo=False)
    config = config_lib.config_for_args(args)
    config.head.name = "linear"  # on CLIP too: a zero-shot head would leave nothing to train
    config.method.name = "linear_probe"
    config.method.head_init = "zeros"

    config.optim.lr = 0.1
    config.num_epochs = 100
    config.optim.warmup_epochs = 10
    if args.demo:
        config.num_epochs = 5
        config.optim.warmup_epochs = 1
    return config_lib.lock(config)
