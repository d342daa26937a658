r"""VFPT: VPT's prompt tokens, part of them Fourier-transformed (Zeng et al., NeurIPS 2024).

    python -m jprompt.main --config=configs/vfpt.py:demo --workdir=/tmp/vfpt_demo
    python -m jprompt.main --config=configs/vfpt.py:demo,deep --workdir=/tmp/vfpt_deep_demo
    python -m jprompt.main --config=configs/vfpt.py:dataset=vtab/dtd,deep,fourier=1.0 \
        --workdir=/tmp/vfpt_dtd
    python -m jprompt.tools.sweep --config=configs/vfpt.py:dataset=vtab/dtd,deep --sweep=lr_wd \
        --workdir=/tmp/vfpt_dtd_sweep        # VPT's 40-point lr x wd grid, as commands

Args (comma-separated after the file name): those of configs/vpt.py (backbone=, head=,
dataset=, num_tokens=, deep, trainval, spt..., demo; with the same backbones, VPT's data
protocol on VTAB-1k and FGVC (VFPT's code is VPT's; results.json names no protocol, as VPT's
card would name VPT's method and batch), and sweeps lr_wd, num_tokens, seeds), and
  fourier=F       the fraction of each prompt set that is Fourier-transformed, the first
                  floor(num_tokens * F) tokens (default 0.5, the official FOURIER_PERCENTAGE;
                  the official README's example trains deep with 1.0; 0 is VPT)
  fourier_dims=A  the FFT's axes: all (sequence and hidden, default), sequence or hidden
                  (the official FOURIER_DIMENSION)

Recipe from the official code (configs/base-prompt_fourier.yaml, tune_vtab.py, tune_fgvc.py):
VPT's (configs/vpt.py: SGD momentum 0.9, coupled wd 1e-4 by default, 100 epochs, 10 warmup
epochs then cosine per epoch, lr and wd chosen on the validation split from VPT's grid, lr scaled
by batch/256, prompt dropout 0.1 for deep as the README's example) with batch 64 at every prompt
length. The per-task yaml files' BASE_LR and WEIGHT_DECAY are overwritten by that search. The
demo is VPT's demo (the same 5 epochs, lr, batch and zero head), so that the two compare.
"""

import pathlib

from jprompt.train import config_lib

BATCH_SIZE = 64
# configs/vpt.py, whose args, recipe and sweeps VFPT shares.
vpt = config_lib.load_module(str(pathlib.Path(__file__).with_name("vpt.py")))


def get_config(arg=None):
    args = config_lib.parse_arg(arg, **vpt.ARGS, fourier=0.5, fourier_dims="all")
    config = vpt.vpt_config(args)
    config.method.name = "vfpt"
    config.method.fourier_fraction = args.fourier
    config.method.fourier_dims = args.fourier_dims
    return vpt.locked_successor(config, args, BATCH_SIZE)


def sweep(add, arg=None, name="lr_wd"):
    """configs/vpt.py's searches, on this file's configs."""
    vpt.sweep(add, arg, name, get=get_config)
