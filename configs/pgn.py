r"""PGN: a prompt generation network on a frozen backbone (Loedeman et al. 2022/2024).

    python -m jprompt.main --config=configs/pgn.py:demo --workdir=/tmp/pgn_demo
    python -m jprompt.main --config=configs/pgn.py:dataset=cifar10 --workdir=/tmp/pgn_cifar10
    python -m jprompt.main --config=configs/pgn.py:backbone=vit_b32,dataset=cifar100 \
        --workdir=/tmp/pgn_vit_cifar100
    python -m jprompt.main --config=configs/pgn.py:demo,baseline --workdir=/tmp/tokens_demo
    python -m jprompt.main --config=configs/pgn.py:demo,dataset=mix/jprompt_shapes/colors+\
jprompt_shapes/count+jprompt_shapes/textures --workdir=/tmp/pgn_mix
    python -m jprompt.main --config=configs/pgn.py:demo,backbone=vit_b32,deployable \
        --config.backbone.name=vit_tiny8 --config.backbone.checkpoint= --workdir=/tmp/pgn_rgb

Args (comma-separated after the file name):
  backbone=NAME     a backbone from jprompt.models.backbones.NAMES. Default clip_b32, the paper's
                    main setting: CLIP ViT-B/32 with its frozen zero-shot text head, only the PGN
                    trains (convert OpenAI's ViT-B-32.pt once with python -m
                    jprompt.tools.convert_clip into ~/jprompt_models/clip_b32.npz). A ViT (e.g.
                    vit_b32, the augreg IN-21k file; the paper's supervised setting is
                    torchvision's IN-1k ViT-B/32) gets a linear head that trains next to the PGN.
  head=NAME         zeroshot or linear (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME      one of PGN's 12 datasets (jprompt.data.presets.PGN_DATASETS: cifar10,
                    cifar100, dtd, oxford_flowers102, food101, eurosat, sun397, ucf101,
                    oxford_iiit_pet, svhn, resisc45, clevr_count), another preset, or any tfds
                    name (default cifar100). On PGN's datasets with CLIP the PGN protocol
                    applies: CoOp's split files (train and val merged for training) for seven
                    of them and PGN's own RESISC45 file, prepared from local copies (the error
                    names the files), PGN's class names. Or a mixture of presets,
                    mix/<preset>+<preset>+... (jprompt.data.mixture): one PGN trained on all of
                    them in the union of their classes, the zero-shot head over every class
                    name with the default template, selected on the pooled validation accuracy;
                    results.json adds per_dataset scores and division_of_labour (the mean
                    Jensen-Shannon divergence between the datasets' library use, in bits).
                    config.dataset.sampling: proportional (default) or uniform
  num_tokens=K      prompt tokens generated per image (default 16)
  library_size=N    rows of the token library (default: 256 on CLIP, 128 on ViT, the released
                    sizes; with K=16 and D=768 that is 1,032,304 and 669,808 trainable PGN
                    parameters, a linear head aside)
  baseline          train the paper's input-independent baseline instead ("prompt_tokens": K
                    learned tokens appended at the end, no generator), same recipe
  deployable        train the PGN in the geometry of prompt inversion
                    (jprompt.methods.inversion), so that it can be served as plain RGB rows
                    below the image to the unmodified backbone (python -m jprompt.deploy).
                    Needs pool "tok" and a patch of at least D/3 pixels: the demo's shipped tiny4
                    backbones have 3*4*4 = 48 < D = 64, so override them with a randomly
                    initialised tiny8 as in the example above (benchmarks/inversion_agreement.py
                    does). Not with baseline
  demo              offline, on 2 CPU cores: fixes the backbone to a shipped tiny one
                    pretrained on jprompt_shapes/shapes (the tiny CLIP with its frozen zero-shot
                    head by default or with backbone=clip_*, the tiny ViT with a linear head
                    with backbone=vit_*), the dataset to jprompt_shapes/colors (8 classes,
                    chance 0.125; dataset= may name another jprompt_shapes task or a mixture of
                    them, any other dataset is an error), 32px images, K=8, N=32 and the demo
                    recipe below. It prints the test accuracy (README and benchmarks/transfer.py
                    list them)

Recipe from the official code: SGD momentum 0.9, no weight decay, lr 0.1 for the PGN and the
head, 100 epochs, linear warmup (50 epochs, the training scripts' default; the first epoch at
lr/50 as the second, as PGN's CosineWithWarmup) then cosine to lr/100, the schedule stepped once
per epoch. With CLIP on PGN's datasets the PGN protocol (jprompt.train.protocols, recorded in
results.json) adds PGN's data and input: RandomResizedCrop(224, scale=(1, 1)) (bicubic), colour
jitter 0.4 (p 0.8), grayscale (p 0.2), solarize (p 0.2), horizontal flip; test images resized
(shorter side) to 224 and centre-cropped; class names with hyphens kept; the last epoch tested,
with the best test epoch (what PGN's scripts monitor) reported beside it, labelled. The batch
size is not in PGN's released scripts (their default, 2, is a debugging value): 256 here.

The demo trains 5 epochs at lr 0.1 with a 20-step warmup and a per-step cosine to lr/100 (with
so few epochs a per-epoch schedule would spend the whole first epoch at lr 0).
"""

from jprompt.data import mixture_name, presets
from jprompt.train import config_lib

RELEASED_LIBRARY_SIZE_CLIP = 256
RELEASED_LIBRARY_SIZE_VIT = 128
DEMO_NUM_TOKENS = 8
DEMO_LIBRARY_SIZE = 32
DEMO_EPOCHS = 5
DEMO_LR = 0.1
DEMO_WARMUP_STEPS = 20
# A demo mixture holds three times the examples of one dataset: fewer passes keep it near the
# single-dataset demo's steps (2 x 117 = 234 against 5 x 39 = 195).
DEMO_MIXTURE_EPOCHS = 2


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg,
        backbone="clip_b32",
        head="",
        dataset="cifar100",
        num_tokens=16,
        library_size=0,
        baseline=False,
        deployable=False,
        demo=False,
    )
    if args.baseline and args.deployable:
        raise ValueError("deployable applies to the PGN; the baseline has no generator to deploy")
    # The paper's setting: CLIP with its zero-shot head, on one of PGN's datasets.
    paper = not args.demo and config_lib.is_clip(args.backbone) and not args.baseline
    paper = paper and args.head in ("", "zeroshot") and args.dataset in presets.PGN_DATASETS
    if paper:  # PGN's data: CoOp's split files and its own RESISC45 file where it used them
        args.dataset = presets.PGN_DATASETS[args.dataset][0]
    mix = args.dataset if mixture_name.is_mixture(args.dataset) else ""
    if mix:  # the first component gives the input defaults; _use_mixture the rest
        components = [preset.name for preset in mixture_name.parse(mix)]
        if args.demo:
            for name in components:
                config_lib.check_demo_dataset(name)
        args.dataset = components[0]
    config = config_lib.config_for_args(args)
    if mix:
        _use_mixture(config, mix)
    config.head.name_rule = "pgn"
    config.method.name = "prompt_tokens" if args.baseline else "pgn"
    config.method.num_tokens = args.num_tokens
    if not args.baseline:
        released = (
            RELEASED_LIBRARY_SIZE_CLIP
            if config_lib.is_clip(args.backbone)
            else RELEASED_LIBRARY_SIZE_VIT
        )
        config.method.library_size = args.library_size or released
        config.method.deployable = args.deployable
    config.method.head_init = "zeros"
    config.input.flip = True

    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.weight_decay = 0.0
    config.optim.lr = 0.1
    config.optim.schedule = "cosine"
    config.optim.end_lr_factor = 0.01
    config.optim.warmup_epochs = 50
    config.optim.schedule_unit = "epoch"
    config.num_epochs = 100
    if args.demo:
        if args.num_tokens == 16:
            config.method.num_tokens = DEMO_NUM_TOKENS
        if not args.baseline and not args.library_size:
            config.method.library_size = DEMO_LIBRARY_SIZE
        config.optim.lr = DEMO_LR
        config.optim.warmup_epochs = 0
        config.optim.warmup_steps = DEMO_WARMUP_STEPS
        config.optim.schedule_unit = "step"
        config.num_epochs = DEMO_MIXTURE_EPOCHS if mixture_name else DEMO_EPOCHS
    if paper:
        config_lib.apply_protocol(config, "pgn")
    return config_lib.lock(config)


def _use_mixture(config, name: str) -> None:
    """Dataset and head fields of mixture ``name``: each component's own splits (the split
    roles of jprompt.data.mixture), labels and class names, one template for all."""
    config.dataset.update(
        dict(
            preset=name,
            name=name,
            train_split="train",
            val_split="val",
            test_split="test",
            label_map="",
            num_classes=sum(p.num_classes for p in mixture_name.parse(name)),
        )
    )
    config.head.class_names = ()  # the components' own, concatenated at run time
    config.head.templates = mixture_name.TEMPLATES


def sweep(add, arg=None, name="seeds"):
    """python -m jprompt.tools.sweep --sweep=seeds: this config once, repeated for --seeds."""
    if name != "seeds":
        raise ValueError(f"unknown sweep {name!r}; valid choices: ['seeds']")
    add()
