#!/usr/bin/env bash
# The GPU figures of the step-speed harness in one run, on an H100/H200 that has JAX (with its
# CUDA plugin), flax, optax and PyTorch but no TensorFlow, ml_collections or clu.
#
#   0. benchmarks/attention_agreement.py: the cudnn attention's features against float32, beside
#      the default attention's (correct before fast);
#   1. ViT-B/16 at batch 128 in bfloat16, VPT-deep, PGN and VP, eager and compiled PyTorch
#      beside it (issue 25's targets for VPT-deep: >= 40% of the bf16 matmul peak measured in
#      the same run, >= 1.0x compiled PyTorch);
#   2. the same with backbone.attention=cudnn (jax.nn.dot_product_attention's fused kernel)
#      instead of the default heads-major XLA attention, to keep the faster one (eager PyTorch
#      only: part 1 has the compiled ratios, and inductor's compiles cost device time);
#   3. the VPT-deep step with remat, JAX alone: its memory against the plain step's;
#   4. ViT-Ti/16 and the CLIP-B/32 image tower, the same methods, for the rest of the table
#      (eager PyTorch only, as part 2).
#
# Each part writes its JSON to $OUT (or /tmp/gpu_check) as it ends, and everything printed goes
# to $OUT/log.txt, so what finished comes back even if a time limit stops a later part; a short
# table of all rows comes last. Parts 1 and 2 should take 2-3 minutes each on an H200, part 1
# more for inductor's three compiles (estimates: this script has not run on a GPU yet), after
# the machine started.
#
# The two missing pure-Python packages travel as wheels in .whl/ (ignored by git), fetched where
# pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       ml_collections==1.1.0 clu==0.0.12
# jprompt itself runs from the checkout (PYTHONPATH): `pip install -e .` would ask for
# TensorFlow, which only the input pipeline needs.
#
# Arguments are harness flags appended to parts 1-4 (the last of a flag wins), e.g. a smoke run
# anywhere (cudnn attention needs an NVIDIA GPU: xla stands in for it):
#   benchmarks/gpu_check.sh --backbones=vit_tiny16 --image_size=32 --batch_sizes=2 --warmup=0 \
#     --steps=1 --repeats=1 --attention=xla --torch_compile_backend=eager
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"

site=/tmp/jprompt_wheels
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in one process: JAX preallocates 75% of it by default.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, "flax",
flax.__version__, "optax", optax.__version__, "torch", torch.__version__, jax.devices())'
} 2>&1 | tee "$out/log.txt"

python3 benchmarks/attention_agreement.py 2>&1 | grep '^attention=' | tee -a "$out/log.txt"

speed() {  # speed NAME FLAGS...: one harness run, its rows in NAME.json
  local name=$1
  shift
  python3 benchmarks/step_speed.py --dtype=bfloat16 --batch_sizes=128 --json="$out/$name.json" \
    "$@" "${extra[@]}" 2>&1 | grep -v '^[IW][0-9]' | tee -a "$out/log.txt"
}
extra=("$@")

b16=(--backbones=vit_b16 --methods=vpt_deep,pgn,vp --warmup=2 --steps=10 --repeats=6)
speed b16 "${b16[@]}"
speed b16_cudnn "${b16[@]}" --attention=cudnn --notorch_compile
speed b16_remat --backbones=vit_b16 --methods=vpt_deep --remat --notorch --steps=5 --repeats=2
speed ti16_clip --backbones=vit_ti16,clip_b32 --methods=vpt_deep,pgn,vp --warmup=2 --steps=10 \
  --repeats=4 --notorch_compile

# The short table last: every row of every part.
python3 - "$out" <<'EOF' | tee -a "$out/log.txt"
import json, pathlib, sys
print("part      method   backbone      img/s  eager compiled  peak%  mem_MiB")
for part in ("b16", "b16_cudnn", "b16_remat", "ti16_clip"):
    path = pathlib.Path(sys.argv[1]) / f"{part}.json"
    for r in json.loads(path.read_text())["rows"] if path.exists() else []:
        eager, compiled = (f"{r[k]:.2f}" if r[k] else "-" for k in ("ratio", "ratio_compiled"))
        print(f"{part:<10}{r['method']:<9}{r['backbone']:<10}{r['img_s']:9.1f}{eager:>6}"
              f"{compiled:>9}{100 * r['peak_frac']:7.1f}{r['mem_mib']:9.0f}")
EOF
