r"""Linear probe: a linear classifier on the frozen backbone's features.

    python -m jprompt.main --config=configs/linear_probe.py:demo --workdir=/tmp/linear_demo
    python -m jprompt.main --config=configs/linear_probe.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/linear_cifar100

Args: backbone=NAME (default vit_b16; on a CLIP backbone the probe reads its projected image
features), dataset=NAME (default cifar100), demo (offline: fixes the backbone to the shipped tiny
ViT, or the tiny CLIP with backbone=clip_*, the dataset to jprompt_shapes/colors or another
jprompt_shapes task given as dataset=, 32px images, 5 epochs with 1 warmup epoch).

Recipe as VPT's linear baseline: SGD momentum 0.9, batch 256, 100 epochs, 10 warmup epochs then
cosine; lr 0.1 here (VPT searches {50 ... 0.05} x batch/256 on a validation split).

Features are cached (``config.method.cache_features``, ``jprompt.train.feature_cache``): the
backbone runs once per image of the train, validation and test splits, and the head trains on those
features. That needs deterministic training images, so this config trains on plain resized
images (``config.input.train_crop="resize"``, ``config.input.flip=False``) whatever the
dataset preset augments with (the FGVC presets crop and flip at random); evaluation keeps the
preset's ``eval_crop``. For the preset's augmentation, at one backbone forward per image per
epoch, add
``--config.method.cache_features=False --config.input.train_crop=resize_random_crop
--config.input.flip=True``.
"""

from jprompt.train import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, backbone="vit_b16", dataset="cifar100", demo=False)
    config = config_lib.config_for_args(args)
    config.head.name = "linear"  # on CLIP too: a zero-shot head would leave nothing to train
    config.method.name = "linear_probe"
    config.method.head_init = "zeros"
    config.method.cache_features = True
    config.input.train_crop = "resize"  # cached features cannot follow random augmentation
    config.input.flip = False

    config.optim.lr = 0.1
    config.num_epochs = 100
    config.optim.warmup_epochs = 10
    if args.demo:
        config.num_epochs = 5
        config.optim.warmup_epochs = 1
    return config_lib.lock(config)
