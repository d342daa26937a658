r"""E2VPT: key-value prompts in every attention plus VPT's visual prompts, pruned in a second
stage (Han et al., ICCV 2023; jprompt.methods.e2vpt).

    python -m jprompt.main --config=configs/e2vpt.py:demo --workdir=/tmp/e2vpt_demo
    python -m jprompt.main --config=configs/e2vpt.py:dataset=vtab/dtd,trainval \
        --workdir=/tmp/e2vpt_dtd
    python -m jprompt.main --config=configs/e2vpt.py:dataset=vtab/dtd,trainval \
        --config.method.rewind=true --config.method.pruned_tokens="(1, 4)" \
        --config.method.pruned_pieces="((0,), (3, 9), (), (2,), (5,))" \
        --workdir=/tmp/e2vpt_dtd_rewind         # the second stage: one rewind setting
    python -m jprompt.tools.e2vpt_prune --workdir=/tmp/e2vpt_dtd \
        --config=configs/e2vpt.py:dataset=vtab/dtd  # scores + every rewind setting's command
    python -m jprompt.tools.e2vpt_prune --workdir=/tmp/e2vpt_dtd --select  # after those runs
    python -m jprompt.tools.sweep --config=configs/e2vpt.py:dataset=vtab/dtd --sweep=lr_wd \
        --workdir=/tmp/e2vpt_dtd_sweep          # VPT's 40-point lr x wd grid, as commands

Args (comma-separated after the file name): those of configs/vpt.py but SPT's (backbone=,
head=, dataset=, trainval, demo; the same backbones and VPT's data protocol on VTAB-1k and FGVC,
which E2VPT's code shares; results.json names no protocol, as the card of "vpt" names VPT's
method and batch), with E2VPT's defaults (the official src/configs/config.py), and
  num_tokens=P    visual prompt tokens per layer (default 5, NUM_TOKENS_P)
  deep=false      shallow visual prompts (default deep, DEEP_P)
  kv_tokens=M     key-value prompts per head and layer (default 5, NUM_TOKENS)
  kv_deep=false   key-value prompts in the first layer only (default every layer, DEEP)
  share_kv=false  separate key and value prompts (default one array for both, SHARE_PARAM_KV)

Pruning (jprompt.methods.e2vpt, module docstring): a first run trains the pruning masks with
the prompts (rewind=False, the default; on train / val, without trainval, as the official
pruning stage). ``python -m jprompt.tools.e2vpt_prune`` computes the importance scores of its
trained masks and writes the official grid of rewind settings (5 token counts x 8 piece counts
at P=5) with one command each: a run from scratch with ``--config.method.rewind=true`` and that
setting's ``pruned_tokens`` / ``pruned_pieces`` (masks fixed), the rest of the first run's
config (lr, wd, seed) unchanged; ``--select`` then picks the setting as the official script
does. Those two fields hold commas, so they are ``--config.method.*`` overrides rather than args.

Recipe from the official code (configs/base-prompt_changed_P_VK.yaml, tune_vtab*.py and the
commands of tempo_command.txt): VPT's (configs/vpt.py: SGD momentum 0.9, coupled wd, 100 epochs,
10 warmup epochs then cosine per epoch, lr and wd from VPT's grid chosen on the validation split,
lr scaled by batch/256, head initialised as VPT's) at batch 64, visual prompt dropout 0.1 (every
released command; shallow keeps VPT's 0) and key-value prompt dropout 0 (DROPOUT). The demo is
VPT's demo (the same 5 epochs, lr, batch and zero head), so that the two compare; it trains
1,885 parameters on the tiny ViT (visual prompts 2 x 5 x 64, key-value prompts 2 x 2 x 5 x 32,
masks 5 + 5 x 16, head 64 x 8 + 8).
"""

import pathlib

from ml_collections import ConfigDict

from jprompt.train import config_lib

BATCH_SIZE = 64
# configs/vpt.py, whose args (but SPT's), recipe and sweeps E2VPT shares.
vpt = config_lib.load_module(str(pathlib.Path(__file__).with_name("vpt.py")))
SPT_ARGS = ("spt", "spt_sample", "spt_images")
ARGS = {k: v for k, v in vpt.ARGS.items() if k not in SPT_ARGS} | dict(
    num_tokens=5, deep=True, kv_tokens=5, kv_deep=True, share_kv=True
)


def get_config(arg=None):
    args = config_lib.parse_arg(arg, **ARGS)
    no_spt = {k: vpt.ARGS[k] for k in SPT_ARGS}
    config = vpt.vpt_config(ConfigDict({**args.to_dict(), **no_spt}))
    for spt_field in ("prompt_init", "spt_sample", "spt_images"):
        del config.method[spt_field]
    config.method.name = "e2vpt"
    config.method.kv_tokens = args.kv_tokens
    config.method.kv_deep = args.kv_deep
    config.method.share_kv = args.share_kv
    config.method.kv_init = "kaiming"  # ORIGIN_INIT=2
    config.method.kv_dropout = 0.0
    config.method.pieces = 16  # CLS_TOKEN_P_PIECES_NUM
    config.method.rewind = False
    config.method.pruned_tokens = ()
    config.method.pruned_pieces = ()
    return vpt.locked_successor(config, args, BATCH_SIZE)


def sweep(add, arg=None, name="lr_wd"):
    """configs/vpt.py's searches (E2VPT's lr and wd grids are VPT's), on this file's configs."""
    vpt.sweep(add, arg, name, get=get_config)
