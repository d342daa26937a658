r"""EVP: the image shrunk and a learned frame padded around it (Wu et al., TMLR 2024).

    python -m jprompt.main --config=configs/evp.py:demo --workdir=/tmp/evp_demo
    python -m jprompt.main --config=configs/evp.py:demo,backbone=vit_b16 \
        --workdir=/tmp/evp_vit_demo
    python -m jprompt.main --config=configs/evp.py --workdir=/tmp/evp_cifar100
    python -m jprompt.main --config=configs/evp.py --config.method.normalize_gradient=false \
        --workdir=/tmp/evp_plain_gradient

Args (comma-separated after the file name):
  backbone=NAME   a backbone from jprompt.models.backbones.NAMES. Default clip_b32, the paper's
                  setting: CLIP ViT-B/32 with its frozen zero-shot text head (convert OpenAI's
                  ViT-B-32.pt once with python -m jprompt.tools.convert_clip into
                  ~/jprompt_models/clip_b32.npz). A ViT gets a linear head that trains next to
                  the prompt (the official code maps labels to the source head instead)
  head=NAME       zeroshot or linear (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME    a preset of jprompt.data.presets or any tfds name (default cifar100)
  prompt_size=P   width of the frame in pixels; the image is shrunk to S - 2P (default 30 at
                  224px: 164, the official sizes)
  demo            offline, on 2 CPU cores: fixes the backbone to a shipped tiny one pretrained
                  on jprompt_shapes/shapes (the tiny CLIP with its frozen zero-shot head by
                  default or with backbone=clip_*, the tiny ViT with a linear head with
                  backbone=vit_*), the dataset to jprompt_shapes/colors (8 classes, chance
                  0.125; dataset= may name another jprompt_shapes task, any other dataset is an
                  error), 32px images and the demo recipe below. It prints the test accuracy
                  (README lists it)

Recipe from the official code (main.py): the frame starts at zero and each step moves it by the
learning rate times the unit-norm gradient (method.normalize_gradient; see
jprompt/methods/evp.py), so the optimizer is SGD without momentum or weight decay, lr 70, cosine
annealing stepped once per epoch (CosineAnnealingLR, T_max = epochs) without warmup, batch 256,
1000 epochs. Input diversity: random horizontal flips in training; the images are resized with
bicubic interpolation, shorter side first, then centre-cropped (the official code crops at
random in training, which differs only on images that are not square). The zero-shot template
is "this is a photo of a {}" on every dataset, names lower-cased with "_" and "-" as spaces;
the official number is the best test accuracy over training, reported beside the selected
state's, labelled. A linear head on a ViT trains at lr 0.1. The demo trains 5 epochs with a 4px
frame (the image shrunk to 24px) at lr 3 on the tiny CLIP, 10 on the tiny ViT (0.1 for its
linear head).
"""

from jprompt.train import config_lib

EVP_TEMPLATES = ("this is a photo of a {}",)  # main.py, lower-case "this"
DEMO_PROMPT_SIZE = 4
# The demo's frame lr, measured on jprompt_shapes/colors: lower through the tiny CLIP's frozen
# zero-shot head than next to the tiny ViT's trainable linear head.
DEMO_LR = {"clip": 3.0, "vit": 10.0}


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg,
        backbone="clip_b32",
        head="",
        dataset="cifar100",
        prompt_size=30,
        demo=False,
    )
    config = config_lib.config_for_args(args)
    config.method.name = "evp"
    config.method.prompt_size = args.prompt_size
    config.method.normalize_gradient = True
    config.method.head_init = "zeros"
    config.head.templates = EVP_TEMPLATES
    config.head.name_rule = "vp"  # refine_classname: lower case, "_" and "-" as spaces

    config.input.resize = "bicubic"
    config.input.train_crop = "center_crop"
    config.input.eval_crop = "center_crop"
    config.input.flip = True
    config.optim.lr = 70.0
    config.optim.lr_by_path = (("head/.*", 0.1),)  # a linear head, when there is one
    config.optim.momentum = 0.0
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 0
    config.optim.schedule_unit = "epoch"
    config.num_epochs = 1000
    config.report_test_selected = True  # the official number: best test accuracy over epochs
    if args.demo:
        if args.prompt_size == 30:
            config.method.prompt_size = DEMO_PROMPT_SIZE
        config.optim.lr = DEMO_LR["clip" if config_lib.is_clip(config.backbone.name) else "vit"]
        config.num_epochs = 5
    return config_lib.lock(config)
