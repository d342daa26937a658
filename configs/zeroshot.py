r"""Zero-shot CLIP: the untuned accuracy of the frozen model with its text head, no training.

    python -m jprompt.main --config=configs/zeroshot.py --workdir=/tmp/zeroshot_cifar100
    python -m jprompt.main --config=configs/zeroshot.py:demo --workdir=/tmp/zeroshot_demo

Args (comma-separated after the file name):
  backbone=NAME   a CLIP backbone (default clip_b32; convert OpenAI's ViT-B-32.pt once with
                  python -m jprompt.tools.convert_clip into ~/jprompt_models/clip_b32.npz)
  dataset=NAME    a tfds dataset name (default cifar100); class names come from its info and
                  templates from jprompt.data.presets ("This is a photo of a {}", CIFAR-100
                  "A photo of a {}")
  demo            offline: fixes the backbone to the shipped tiny CLIP, 32px images and the
                  dataset to jprompt_shapes/colors, whose colours it was never trained on (its
                  source task is shapes), so it sits near chance (0.125): the starting point
                  the CLIP demos of the prompt methods improve on. dataset= may name another
                  jprompt_shapes task (demo,dataset=jprompt_shapes/shapes evaluates it on its
                  source task); any other dataset is an error

The run evaluates the validation and test splits once (``num_epochs=0``) and writes
results.json like any other run.
"""

from jprompt.train import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, backbone="clip_b32", dataset="cifar100", demo=False)
    if not config_lib.is_clip(args.backbone):
        raise ValueError(f"zero-shot evaluation needs a CLIP backbone, got {args.backbone!r}")
    config = config_lib.config_for_args(args)
    config.method.name = "zeroshot"
    config.num_epochs = 0
    return config_lib.lock(config)
