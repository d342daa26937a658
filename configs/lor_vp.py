r"""LoR-VP: a low-rank pixel prompt B @ A over the whole image (Jin et al., ICLR 2025).

    python -m jprompt.main --config=configs/lor_vp.py:demo --workdir=/tmp/lor_vp_demo
    python -m jprompt.main --config=configs/lor_vp.py:demo,backbone=clip_b32 \
        --workdir=/tmp/lor_vp_clip_demo
    python -m jprompt.main --config=configs/lor_vp.py --workdir=/tmp/lor_vp_cifar100
    python -m jprompt.main --config=configs/lor_vp.py:rank=8,dataset=cifar10 \
        --workdir=/tmp/lor_vp_cifar10

Args (comma-separated after the file name):
  backbone=NAME   a backbone from jprompt.models.backbones.NAMES. Default vit_b16 (the augreg
                  IN-21k file; the paper's ViT-B/16-21k is timm's MIIL checkpoint, which jprompt
                  does not load) with a linear head that trains next to the prompt, the
                  official 'lp' mapping. A CLIP backbone gets its frozen zero-shot head.
  head=NAME       linear or zeroshot (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME    a preset of jprompt.data.presets (cifar10, cifar100, ...) or any tfds name
                  (default cifar100)
  rank=R          the rank of each channel's prompt B_c @ A_c (default 4, the official
                  bar_width); 2 x 3 x 224 x R parameters at 224px (5,376 at R=4)
  demo            offline, on 2 CPU cores: fixes the backbone to a shipped tiny one pretrained
                  on jprompt_shapes/shapes (the tiny ViT with a linear head by default or with
                  backbone=vit_*, the tiny CLIP with its frozen zero-shot head with
                  backbone=clip_*), the dataset to jprompt_shapes/colors (8 classes, chance
                  0.125; dataset= may name another jprompt_shapes task, any other dataset is an
                  error), 32px images and the demo recipe below. It prints the test accuracy
                  (README lists it)

Recipe from the official run script (run/run_lorvp.sh): SGD lr 0.02 for prompt and head alike,
momentum 0.9, weight decay 1e-4 (coupled; jprompt.train.optim leaves the head bias out of it,
the official code does not), batch 256, 20 epochs, cosine decay per step to 0 without warmup;
images resized to 224 x 224 (Resize((224, 224)), no augmentation, randomcrop=0); evaluated
after every epoch, and the official number is the best test accuracy over training, reported
here beside the selected state's, labelled. B starts at zero and A at N(0, 0.01^2) (see
jprompt/methods/lor_vp.py). The demo trains 5 epochs at rank 4 with lr 0.3 on the tiny ViT
(prompt and head) and 0.1 on the tiny CLIP.
"""

from jprompt.train import config_lib

# The demo's lr (prompt and head), measured on jprompt_shapes/colors: the tiny CLIP's prompt alone
# diverges above about 0.3 with momentum 0.9.
DEMO_LR = {"clip": 0.1, "vit": 0.3}


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg,
        backbone="vit_b16",
        head="",
        dataset="cifar100",
        rank=4,
        demo=False,
    )
    config = config_lib.config_for_args(args)
    config.method.name = "lor_vp"
    config.method.rank = args.rank
    config.method.head_init = "zeros"

    config.input.train_crop = "resize"  # Resize((224, 224)) at train and test
    config.input.eval_crop = "resize"
    config.input.flip = False
    config.optim.lr = 0.02
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    config.optim.warmup_steps = 0
    config.num_epochs = 20
    config.report_test_selected = True  # the official number: best test accuracy over epochs
    if args.demo:
        config.optim.lr = DEMO_LR["clip" if config_lib.is_clip(config.backbone.name) else "vit"]
        config.num_epochs = 5
    return config_lib.lock(config)
