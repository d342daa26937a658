r"""AdaViPro: a VP frame applied per region where a learned Gumbel mask says so (Yang et al. 2024).

    python -m jprompt.main --config=configs/adavipro.py:demo --workdir=/tmp/adavipro_demo
    python -m jprompt.main --config=configs/adavipro.py:backbone=vit_b16,dataset=cifar100 \
        --workdir=/tmp/adavipro_cifar100

Args (comma-separated after the file name):
  backbone=NAME    a backbone from jprompt.models.backbones.NAMES (default vit_b16, the augreg
                   IN-21k file; clip_b32 for the VP paper's CLIP setting)
  head=NAME        linear or zeroshot (default: zeroshot on CLIP, linear on ViT)
  dataset=NAME     a preset of jprompt.data.presets (cifar10, eurosat, ...) or any tfds name
                   (default cifar100)
  prompt_size=P    width of the VP frame in pixels (default 30 at 224px; 4 in the demo)
  region_size=S    side of a mask region in pixels, must divide the image size (default 32:
                   7x7 regions at 224px; 8 in the demo: 4x4 regions at 32px). The convergence
                   conv's kernel follows it (method.kernel_size; see jprompt/methods/adavipro.py)
  demo             offline: the shipped tiny ViT pretrained on jprompt_shapes/shapes, adapted to
                   jprompt_shapes/colors at 32px; about a minute on 2 CPU cores (68 s measured
                   on 2 busy cores); test accuracy 0.831 with seed 0 (chance is 1/8; the VP demo
                   reaches 0.84). On this task the learned masks end up applying the frame in
                   every region at evaluation

Recipe: VP's (SGD lr 40 for the prompt template, momentum 0.9, no weight decay, batch 256,
1000 epochs, 1000 warmup steps, cosine decay per step), with the paper's lr 1 for the mask
generator and lr 0.1 for the linear head trained on the frozen features (as configs/vp.py).
Gumbel temperature 5 * 0.98**epoch, straight-through hard masks (method.hard=False: soft).
The demo trains 5 epochs at lr 1 for the template (as the VP demo), 1 for the mask generator and
0.1 for the head, with 4x4 regions of 8px and a 4px frame.
"""

from jprompt import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(
        arg,
        backbone="vit_b16",
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

    config.optim.lr = 40.0  # the prompt template
    config.optim.lr_by_path = (("prompter/mask_generator/.*", 1.0), ("head/.*", 0.1))
    config.optim.warmup_steps = 1000
    config.num_epochs = 1000
    if args.demo:
        if args.prompt_size == 30:
            config.method.prompt_size = 4
        if args.region_size == 32:
            config.method.region_size = config.method.kernel_size = 8
        config.optim.lr = 1.0
        config.optim.warmup_steps = 20
        config.num_epochs = 5
    return config_lib.lock(config)


# Sweeps (python -m jprompt.sweep --sweep=NAME): prompt_size over the papers' sizes, or seeds.
sweep = config_lib.prompt_size_sweep
