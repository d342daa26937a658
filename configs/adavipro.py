r"""AdaViPro: a VP frame applied per region where a learned Gumbel mask says so (Yang et al. 2024).

    python -m jprompt.main --config=configs/adavipro.py:demo --workdir=/tmp/adavipro_demo
    python -m jprompt.main --config=configs/adavipro.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/adavipro_cifar100

Args (comma-separated after the file name):
  backbone=NAME    a backbone from jprompt.models.backbones.NAMES (default clip_b32 with its
                   frozen zero-shot head, the paper's setting, which follows VP's; a ViT such as
                   vit_b16 gets a linear head)
  head=NAME        linear or zeroshot (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME     a preset of jprompt.data.presets (cifar10, eurosat, ...) or any tfds name
                   (default cifar100)
  prompt_size=P    width of the VP frame in pixels (default 30 at 224px; 4 in the demo)
  region_size=S    side of a mask region in pixels, must divide the image size (default 32:
                   7x7 regions at 224px; 8 in the demo: 4x4 regions at 32px). The convergence
                   conv's kernel follows it (method.kernel_size; see jprompt/methods/adavipro.py)
  demo             offline, on 2 CPU cores: fixes the backbone to a shipped tiny one pretrained
                   on jprompt_shapes/shapes (the tiny CLIP with its frozen zero-shot head by
                   default or with backbone=clip_*, the tiny ViT with a linear head with
                   backbone=vit_*), the dataset to jprompt_shapes/colors (dataset= may name
                   another jprompt_shapes task; any other dataset is an error), 32px images and
                   the demo recipe below. It prints the test accuracy (README lists it)

Recipe: VP's (SGD lr 40 for the prompt template, momentum 0.9, no weight decay, batch 256,
1000 epochs, 1000 warmup steps, cosine decay per step), with the paper's lr 1 for the mask
generator and lr 0.1 for the linear head trained on the frozen features (as configs/vp.py).
Gumbel temperature 5 * 0.98**epoch, straight-through hard masks (method.hard=False: soft).
With CLIP on VP's datasets the AdaViPro protocol applies: VP's (see configs/vp.py) with the
paper's changes (jprompt.train.protocols). The demo trains 5 epochs with the VP demo's frame and
template lr (8px at lr 10 on the tiny CLIP, 4px at lr 1 on the tiny ViT), lr 1 for the mask
generator and 0.1 for a linear head, with 4x4 regions of 8px.
"""

from jprompt.data import presets
from jprompt.train import config_lib, protocols


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg,
        backbone="clip_b32",
        head="",
        dataset="cifar100",
        prompt_size=30,
        region_size=32,
        demo=False,
    )
    config = config_lib.config_for_args(args)
    config.method.name = "adavipro"
    config.method.prompt_size = args.prompt_size
    config.method.region_size = args.region_size
    config.method.embed_dim = 64
    config.method.kernel_size = args.region_size
    config.method.policy_kernel_size = 1
    config.method.edge_input = "gray"  # gray | rgb
    config.method.hard = True
    config.method.tau0 = 5.0
    config.method.tau_decay = 0.98
    config.method.head_init = "zeros"
    config.head.templates = protocols.VP_TEMPLATES  # AdaViPro follows VP

    config.optim.lr = 40.0  # the prompt template
    config.optim.lr_by_path = (("prompter/mask_generator/.*", 1.0), ("head/.*", 0.1))
    config.optim.warmup_steps = 1000
    config.num_epochs = 1000
    if args.demo:
        demo_size, config.optim.lr = config_lib.demo_pixel_prompt(config.backbone.name)
        if args.prompt_size == 30:
            config.method.prompt_size = demo_size
        if args.region_size == 32:
            config.method.region_size = config.method.kernel_size = 8
        config.optim.warmup_steps = 20
        config.num_epochs = 5
    elif config.head.name == "zeroshot" and config.dataset.preset in presets.VP_DATASETS:
        config_lib.apply_protocol(config, "adavipro")  # the paper's setting: CLIP, zero-shot head
    return config_lib.lock(config)


# Sweeps (python -m jprompt.tools.sweep --sweep=NAME): prompt_size over the papers' sizes, or seeds.
sweep = config_lib.prompt_size_sweep
