r"""Training-step speed of jprompt, side by side with a PyTorch reference of the same workload.

For each method x backbone x batch size the harness builds the real library step
(``jprompt.models.backbones.build``, ``jprompt.methods.build``,
``jprompt.train.step.make_train_step`` with SGD + momentum, jitted with the state donated and
with ``jprompt.train.compilation``'s options, as the trainer does; random weights, a linear head on
100 classes) and reports:

- ``img/s``: batch / median step time over all timed steps, after compilation and warm-up, each
  step ended by ``block_until_ready``;
- ``compile_s``: seconds of ``lower(...).compile()``;
- ``peak%``: model FLOP/s as a percentage of the device's matmul peak (``GFLOP/s``), measured
  in the same run by timing a large square matmul of the compute dtype the same way, three
  times in every round of the row (median). Model FLOPs count the
  backbone's matmuls and patch convolution: the forward pass, plus the activation gradients
  (not weight gradients) wherever a gradient must flow back to the prompt; E2VPT's key-value
  prompts count as m more keys and values in both attention matmuls of every layer (forward,
  and both operands' gradients), with no projection FLOPs (they enter already projected); the
  PGN generator, AdaViPro's mask generator, the head, EVP's shrink, VFPT's FFTs, E2VPT's masks
  and elementwise work are not counted, nor are outputs whose result is discarded (the deep
  prompt rows before their overwrite, all but the class token in the last block), which
  jprompt skips;
- ``mem_MiB``: from ``compiled.memory_analysis()`` (arguments + temporaries + outputs not
  aliased to donated inputs), on every platform; on GPU also ``device_peak_MiB``, the allocator's
  ``peak_bytes_in_use`` (cumulative over the process, so rows should run smallest first);
- with torch importable (``--torch``), the same workload on ``torch_reference`` (its docstring
  says exactly what runs; ``--torch_skip_discarded_rows`` lets it skip the discarded outputs
  too), side by side, eager and (``--torch_compile``, on by default) the same step function
  wrapped in ``torch.compile`` (``--torch_compile_backend``, inductor by default; default
  mode; a separate twin with the same seed). Dynamo breaks the step into graphs at
  ``zero_grad``, ``backward()`` and inside SGD's ``step``: the forward, its backward and the
  update run compiled, the calls between them eagerly.
  The compiled step is called before timing until a call compiles no new graph (the second
  call recompiles, as the optimizer's momentum buffers appear): ``torch_compile_s`` is the
  wall time of those calls. In each of ``--repeats`` rounds jprompt, eager torch and compiled
  torch run ``--steps`` steps in turn. ``eager`` and ``compiled`` img/s are medians over all
  their steps; ``ratio_eager`` is jprompt / eager torch speed paired by round (torch's median
  step time over JAX's in the same round), the median over rounds and, in brackets, the lowest
  and highest round; ``ratio_compiled`` the same against compiled torch. Pairing by round
  cancels the drift of a shared machine's speed, which moves both sides alike but can move by
  20% within a minute. JSON: eager torch keeps the keys ``torch_img_s``, ``round_ratios``,
  ``ratio`` and ``ratio_range``; compiled torch has ``compiled_img_s``,
  ``compiled_round_ratios``, ``ratio_compiled``, ``ratio_compiled_range`` and
  ``torch_compile_s`` (null without ``--torch_compile``); ``load`` is the host's 1-minute
  load average after each round (this run's own threads included), since other processes on
  the host slow eager PyTorch far more than XLA. ``speed_runs.py`` gives the spread over
  several runs' JSON files.

    python benchmarks/step_speed.py --methods=vp,vpt_deep --backbones=vit_ti16,vit_b16 \
        --batch_sizes=16 --json=/tmp/step_speed.json

A smoke run: ``--backbones=vit_tiny16 --image_size=32 --batch_sizes=2 --steps=1 --repeats=1
--torch_compile_backend=eager`` (dynamo's tracing alone, about 3 s: inductor takes 12 to 45 s
to compile even the tiny ViT's step on 2 cores).
XLA flags go through the ``XLA_FLAGS`` environment variable as usual.
"""

import dataclasses
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from jprompt import methods
from jprompt.data import normalization
from jprompt.models import backbones, vit
from jprompt.train import compilation, host_memory
from jprompt.train.step import make_train_step

# harness name -> (jprompt method, its options)
METHODS = {
    "vp": ("vp", {}),
    "vpt": ("vpt", {"deep": False}),
    "vpt_deep": ("vpt", {"deep": True}),
    "pgn": ("pgn", {}),
    "adavipro": ("adavipro", {}),
    "linear_probe": ("linear_probe", {}),
    "evp": ("evp", {}),
    "lor_vp": ("lor_vp", {}),
    "e2vpt": ("e2vpt", {}),
    "vfpt": ("vfpt", {"deep": False}),
    "vfpt_deep": ("vfpt", {"deep": True}),
}
# Pixel prompts: the activation gradient reaches the patch embedding.
PIXEL_PROMPTS = ("vp", "evp", "lor_vp", "adavipro")
# The methods whose pixel frame is VP's (30 px at 224 px, scaled with the image size).
FRAMES = ("vp", "evp", "adavipro")
# The jprompt defaults of each token method: prompt tokens in the sequence, E2VPT's key-value
# prompts per layer, and the methods whose prompt rows are overwritten before every layer.
PROMPT_TOKENS = {"vpt": 10, "vpt_deep": 10, "vfpt": 10, "vfpt_deep": 10, "e2vpt": 5, "pgn": 16}
KV_TOKENS = {"e2vpt": 5}
DEEP = ("vpt_deep", "vfpt_deep", "e2vpt")
NUM_CLASSES = 100
MIB = 2**20

_METHODS = flags.DEFINE_list("methods", ["vp", "vpt_deep", "pgn"], f"Of {list(METHODS)}.")
_BACKBONES = flags.DEFINE_list("backbones", ["vit_ti16", "vit_b16", "clip_b32"], "Backbones.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16"], "Batch sizes.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "float32", ["float32", "bfloat16"], "Storage dtype of the frozen backbone."
)
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each encoder block in the backward.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "heads_major", vit.ATTENTIONS, "How the backbone computes self-attention."
)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating JAX/torch rounds.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_TORCH = flags.DEFINE_bool(
    "torch", importlib.util.find_spec("torch") is not None, "Run the PyTorch reference."
)
_TORCH_SKIP = flags.DEFINE_bool(
    "torch_skip_discarded_rows",
    False,
    "Let the torch reference skip the outputs whose result is discarded, as jprompt does. By "
    "default it computes them, as timm and the official VPT code do.",
)
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile",
    True,
    "With --torch, also time the torch step wrapped in torch.compile (default mode).",
)
_TORCH_COMPILE_BACKEND = flags.DEFINE_string(
    "torch_compile_backend",
    "inductor",
    "torch.compile's backend; eager or aot_eager trace without generating code (smoke runs).",
)
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory",
    True,
    "On CPU hosts keep freed host memory in the process (jprompt.train.host_memory), as "
    "python -m jprompt.main does.",
)
_JSON = flags.DEFINE_string("json", None, "Write the rows (and the machine) here as JSON.")


@dataclasses.dataclass
class Row:
    method: str
    backbone: str
    batch: int
    img_s: float
    compile_s: float
    model_tflop: float  # per step
    peak_flops: float  # the matmul peak measured alongside this row
    peak_frac: float
    mem_mib: float
    device_peak_mib: float | None = None
    torch_img_s: float | None = None  # eager
    round_ratios: list[float] | None = None  # jprompt / eager torch speed in each round
    compiled_img_s: float | None = None
    compiled_round_ratios: list[float] | None = None  # jprompt / compiled torch, by round
    torch_compile_s: float | None = None
    load: list[float] | None = None  # the host's 1-minute load average after each round

    @property
    def ratio(self) -> float | None:
        return median(self.round_ratios)

    @property
    def ratio_range(self) -> tuple[float, float] | None:
        return spread(self.round_ratios)

    @property
    def ratio_compiled(self) -> float | None:
        return median(self.compiled_round_ratios)

    @property
    def ratio_compiled_range(self) -> tuple[float, float] | None:
        return spread(self.compiled_round_ratios)


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float] | None) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def timed(fn, sync) -> float:
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def matmul_timer(dtype: str):
    """``(run, flops)``: a large square matmul in ``dtype`` and its FLOPs, for the peak. Of
    random data: GPUs multiply constant data faster (less power, higher clocks), which would
    overstate the peak."""
    n = 8192 if jax.default_backend() == "gpu" else 2048
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda x: x @ a)
    matmul(a).block_until_ready()
    return (lambda: matmul(a)), 2 * n**3


def model_flops(module, method: str, batch: int, image_size: int) -> float:
    """Backbone FLOPs of one step (module docstring): forward, plus activation gradients from
    the first layer a prompt enters (the patch embedding for VP) up to the loss, for the rows
    whose outputs are read (class-token pooling)."""
    d, mlp, depth, patch = module.hidden_size, module.mlp_dim, module.depth, module.patch_size
    patches = (image_size // patch) ** 2
    extra = PROMPT_TOKENS.get(method, 0)
    tokens = patches + 1 + extra
    keys = tokens + KV_TOKENS.get(method, 0)

    def layer(rows: int) -> tuple[int, int]:
        """(linear, attention) FLOPs of a block computing ``rows`` outputs."""
        linear = 2 * (tokens * 2 * d * d + rows * (2 * d * d + 2 * d * mlp))  # k, v; q, out, MLP
        attention = 2 * 2 * rows * keys * d  # scores and the weighted sum
        return linear, attention

    inner_rows = tokens - extra if method in DEEP else tokens
    layers = [layer(inner_rows)] * (depth - 1) + [layer(1)]
    embed = 2 * patches * patch * patch * 3 * d
    forward = embed + sum(linear + attention for linear, attention in layers)
    if method == "linear_probe":
        return batch * forward
    # Activation gradients: one matmul per linear layer, two per attention matmul.
    backward = sum(linear + 2 * attention for linear, attention in layers)
    backward += embed if method in PIXEL_PROMPTS else 0
    return batch * (forward + backward)


def vp_prompt_size() -> int:
    """VP's padding width: the paper's 30 px at 224 px, scaled with the image size."""
    return max(1, 30 * _IMAGE_SIZE.value // 224)


def build_jax_step(name: str, method: str, batch: int):
    """``(run, compile_s, mem_mib, built)``: ``run()`` performs one jitted training step of
    ``built``, the jprompt method."""
    config = backbones.default_config(
        name,
        compute_dtype=_DTYPE.value,
        param_dtype=_PARAM_DTYPE.value,
        remat=_REMAT.value,
        attention=_ATTENTION.value,
    )
    image_size = _IMAGE_SIZE.value
    backbone, params = backbones.build(config, image_size=image_size, rng=jax.random.key(0))
    method_name, options = METHODS[method]
    if method in FRAMES:
        options = {"prompt_size": vp_prompt_size()}
    built = methods.build(method_name, backbone=backbone, num_classes=NUM_CLASSES, **options)
    trained, frozen = built.init(jax.random.key(1), params)
    tx = optax.sgd(0.01, momentum=0.9)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trained": trained,
        "opt_state": tx.init(trained["params"]),
    }
    rng = np.random.default_rng(0)
    batch_arrays = {
        "image": jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
    }
    step = jax.jit(
        make_train_step(built, tx, steps_per_epoch=1000),
        donate_argnums=(0,),
        compiler_options=compilation.step_options(jax.default_backend()),
    )
    key = jax.random.key(2)
    lowered = step.lower(state, frozen, batch_arrays, key)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mem_mib = float("nan")
    if memory is not None:
        live = (
            memory.argument_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )
        mem_mib = live / MIB
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch_arrays, key)
        return metrics

    return run, compile_s, mem_mib, built


def mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A ``jprompt.data.normalization`` as torchvision's ``Normalize(mean, std)`` of [0, 1]."""
    scale, offset = normalization.affine(name)
    std = 1 / (255 * scale)
    return tuple((-offset * std).tolist()), tuple(std.tolist())


def build_torch_step(built, method: str, batch: int):
    """``(step, sync)``: the torch reference's step of ``method`` on the twin of ``built``'s
    backbone; ``sync(step())`` waits for the device."""
    import torch
    import torch_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = built.backbone
    options = {"adavipro_region_size": built.region_size} if method == "adavipro" else {}
    step = torch_reference.make_step(
        backbone.module,
        method,
        batch=batch,
        image_size=_IMAGE_SIZE.value,
        num_classes=NUM_CLASSES,
        device=device,
        bfloat16=_DTYPE.value == "bfloat16",
        vp_prompt_size=vp_prompt_size(),
        normalization=mean_std(backbone.normalization),
        skip_discarded_rows=_TORCH_SKIP.value,
        **options,
    )

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    return step, sync


def compile_torch_step(step, sync, backend: str):
    """``((compiled, sync), seconds)``: ``step`` wrapped in ``torch.compile``, called until a
    call compiles no new graph, and the wall seconds of those calls (a cold compile: inductor's
    on-disk caches are off, as jprompt's step has none)."""
    import torch
    from torch._dynamo.utils import counters

    torch._inductor.config.force_disable_caches = True
    # Every row's step is a new closure of the same code: without a reset dynamo would recompile
    # it next to the earlier rows' graphs and, past its recompile limit (8), silently run it eager.
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend)
    start = time.perf_counter()
    graphs = None
    while graphs != counters["stats"]["unique_graphs"]:
        graphs = counters["stats"]["unique_graphs"]
        sync(compiled())
    return (compiled, sync), time.perf_counter() - start


def measure(method: str, name: str, batch: int, matmul) -> Row:
    """One row; the matmul peak is re-measured in every round, between the steps."""
    run, compile_s, mem_mib, built = build_jax_step(name, method, batch)
    torch_steps, torch_compile_s = {}, None  # "eager" / "compiled" -> (step, sync)
    if _TORCH.value:
        torch_steps["eager"] = build_torch_step(built, method, batch)
        if _TORCH_COMPILE.value:
            twin = build_torch_step(built, method, batch)  # its own parameters and optimizer
            backend = _TORCH_COMPILE_BACKEND.value
            torch_steps["compiled"], torch_compile_s = compile_torch_step(*twin, backend)
    for _ in range(_WARMUP.value):
        jax.block_until_ready(run())
        for step, sync in torch_steps.values():
            sync(step())
    jax_times, matmul_times = [], []
    torch_times = {kind: [] for kind in torch_steps}
    round_ratios = {kind: [] for kind in torch_steps}  # jprompt / torch speed, by round
    load = []
    for _ in range(_REPEATS.value):
        matmul_times += [timed(matmul[0], jax.block_until_ready) for _ in range(3)]
        jax_round = [timed(run, jax.block_until_ready) for _ in range(_STEPS.value)]
        jax_times += jax_round
        for kind, torch_step in torch_steps.items():
            torch_round = [timed(*torch_step) for _ in range(_STEPS.value)]
            torch_times[kind] += torch_round
            ratio = statistics.median(torch_round) / statistics.median(jax_round)
            round_ratios[kind].append(ratio)
        load.append(os.getloadavg()[0])
    seconds = statistics.median(jax_times)
    peak = matmul[1] / statistics.median(matmul_times)
    flops = model_flops(built.backbone.module, method, batch, _IMAGE_SIZE.value)

    def torch_img_s(kind):
        return batch / statistics.median(torch_times[kind]) if kind in torch_times else None

    stats = jax.devices()[0].memory_stats() or {}
    device_peak = stats.get("peak_bytes_in_use")
    return Row(
        method=method,
        backbone=name,
        batch=batch,
        img_s=batch / seconds,
        compile_s=compile_s,
        model_tflop=flops / 1e12,
        peak_flops=peak,
        peak_frac=flops / seconds / peak,
        mem_mib=mem_mib,
        device_peak_mib=device_peak / MIB if device_peak else None,
        torch_img_s=torch_img_s("eager"),
        round_ratios=round_ratios.get("eager"),
        compiled_img_s=torch_img_s("compiled"),
        compiled_round_ratios=round_ratios.get("compiled"),
        torch_compile_s=torch_compile_s,
        load=load,
    )


def table(rows: list[Row]) -> str:
    head = (
        f"{'method':<13}{'backbone':<11}{'batch':>6}{'img/s':>9}{'eager':>9}{'compiled':>9}"
        f"{'ratio_eager':>19}{'ratio_compiled':>19}{'compile_s':>10}{'torch_compile_s':>16}"
        f"{'peak%':>7}{'GFLOP/s':>9}{'mem_MiB':>9}"
    )

    def number(value, width, digits=2):
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    def ratio(median, low_high):
        return "{:.2f} ({:.2f}-{:.2f})".format(median, *low_high) if median else "-"

    lines = [head]
    for r in rows:
        lines.append(
            f"{r.method:<13}{r.backbone:<11}{r.batch:>6}{r.img_s:9.2f}"
            f"{number(r.torch_img_s, 9)}{number(r.compiled_img_s, 9)}"
            f"{ratio(r.ratio, r.ratio_range):>19}"
            f"{ratio(r.ratio_compiled, r.ratio_compiled_range):>19}"
            f"{r.compile_s:10.1f}{number(r.torch_compile_s, 16, 1)}"
            f"{100 * r.peak_frac:7.1f}{r.peak_flops / 1e9:9.1f}{r.mem_mib:9.0f}"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if _KEEP_FREED_MEMORY.value:
        host_memory.keep_freed_memory_on_cpu_hosts()  # before the backend starts
    unknown = sorted(set(_METHODS.value) - set(METHODS))
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; valid: {list(METHODS)}")
    matmul = matmul_timer(_DTYPE.value)
    device = jax.devices()[0]
    print(
        f"{device.device_kind} ({jax.default_backend()}), compute {_DTYPE.value}, "
        f"param_dtype={_PARAM_DTYPE.value}, remat={_REMAT.value}, attention={_ATTENTION.value}, "
        f"torch_skip_discarded_rows={_TORCH_SKIP.value}, torch_compile={_TORCH_COMPILE.value} "
        f"({_TORCH_COMPILE_BACKEND.value})"
    )
    rows = []
    for name in _BACKBONES.value:
        for method in _METHODS.value:
            for batch in map(int, _BATCH_SIZES.value):
                rows.append(measure(method, name, batch, matmul))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(
                {
                    "device": device.device_kind,
                    "platform": jax.default_backend(),
                    "dtype": _DTYPE.value,
                    "param_dtype": _PARAM_DTYPE.value,
                    "remat": _REMAT.value,
                    "attention": _ATTENTION.value,
                    "torch_skip_discarded_rows": _TORCH_SKIP.value,
                    "torch_compile": _TORCH.value and _TORCH_COMPILE.value,
                    "torch_compile_backend": _TORCH_COMPILE_BACKEND.value,
                    "rows": [
                        dataclasses.asdict(r)
                        | {
                            "ratio": r.ratio,
                            "ratio_range": r.ratio_range,
                            "ratio_compiled": r.ratio_compiled,
                            "ratio_compiled_range": r.ratio_compiled_range,
                        }
                        for r in rows
                    ],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
