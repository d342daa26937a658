"""Speed and memory options: no backbone weight gradients in the compiled step, rematerialisation
and bfloat16 giving the same training signal, and a smoke run of ``benchmarks/step_speed.py``."""

import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jprompt import methods
from jprompt.methods import vp
from jprompt.models import backbones
from jprompt.train import compilation
from jprompt.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE = 32
BATCH = 2
NUM_CLASSES = 10  # the head kernel (64, 10) is the one trained 2-D weight
SIDES = ("up", "down", "left", "right")  # VP's padding strips


def _backbone(name="vit_tiny16", image=IMAGE, **options):
    config = backbones.default_config(name, **options)
    return backbones.build(config, image_size=image, rng=jax.random.key(0))


def _step(
    method_name, backbone, params, image=IMAGE, batch=BATCH, compiler_options=None, **options
):
    """The trainer's jitted step for ``method_name`` and its arguments."""
    method = methods.build(method_name, backbone=backbone, num_classes=NUM_CLASSES, **options)
    trained, frozen = method.init(jax.random.key(1), params)
    tx = optax.sgd(0.1)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trained": trained,
        "opt_state": tx.init(trained["params"]),
    }
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, image, image, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
    }
    step = jax.jit(
        make_train_step(method, tx, steps_per_epoch=10),
        compiler_options=compiler_options,
    )
    return step, (state, frozen, batch, jax.random.key(2))


def _dot_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Output shapes of every dot and convolution in an HLO module's text, fusions included."""
    found = re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\{[^}]*\} (?:dot|convolution)\(", hlo)
    return [tuple(int(d) for d in dims.split(",") if d) for dims in found]


def _weight_shapes(tree) -> set[tuple[int, ...]]:
    """Each >= 2-D leaf's shape and its 2-D views (how a weight gradient's dot may be laid out)."""
    shapes = set()
    for leaf in jax.tree.leaves(tree):
        if leaf.ndim >= 2:
            s = leaf.shape
            shapes |= {s, (math.prod(s[:-1]), s[-1]), (s[0], math.prod(s[1:]))}
    return shapes


@pytest.mark.parametrize(
    "method_name, options",
    [
        ("vp", {"prompt_size": 4}),
        ("vpt", {"deep": True}),
        ("evp", {"prompt_size": 2}),
        ("lor_vp", {}),
        ("vfpt", {"deep": True}),
    ],
)
def test_compiled_step_computes_no_backbone_weight_gradient(method_name, options):
    backbone, params = _backbone()
    step, args = _step(method_name, backbone, params, **options)
    dots = _dot_shapes(step.lower(*args).compile().as_text())
    frozen_shapes = _weight_shapes(params)
    # Sequences are 2 x 15 tokens here, so no activation has a frozen kernel's shape.
    assert dots, "no dot found: the HLO parsing is broken"
    assert not [shape for shape in dots if shape in frozen_shapes]
    # The only trained 2-D weight, the head, does get its gradient dot.
    assert (backbone.feature_dim, NUM_CLASSES) in dots

    # The check can fail: fine-tuning the same backbone computes those weight gradients.
    finetune, args = _step("finetune", backbone, params)
    finetune_dots = _dot_shapes(finetune.lower(*args).compile().as_text())
    # (attention out and the two MLP kernels of each layer at least; q/k/v are one fused dot)
    assert len([shape for shape in finetune_dots if shape in frozen_shapes]) >= 3 * 2


def _loss_and_prompt_grads(backbone, params, **options):
    method = methods.build("vpt", backbone=backbone, num_classes=NUM_CLASSES, deep=True, **options)
    trained, frozen = method.init(jax.random.key(1), params)
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)))
    labels = jnp.arange(BATCH)

    def loss(p):
        logits, _ = method.apply({"params": p}, frozen, images, rng=None, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(p).mean()))(trained["params"])
    return value, grads, loss, trained["params"]


def test_remat_gives_the_same_loss_and_gradients():
    backbone, params = _backbone()
    remat_backbone, remat_params = _backbone(remat=True)
    assert remat_backbone.module.remat and not backbone.module.remat
    loss, grads, _, _ = _loss_and_prompt_grads(backbone, params)
    remat_loss, remat_grads, remat_fn, p = _loss_and_prompt_grads(remat_backbone, remat_params)
    # remat really is in the program: each block is a checkpointed region, the last one twice
    # (for the whole sequence, which XLA drops unread, and for the pooled row).
    jaxpr = str(jax.make_jaxpr(remat_fn)(p))
    assert len(re.findall(r"\b(?:checkpoint|remat\d*)\[", jaxpr)) == backbone.module.depth + 1
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # recomputed in another order
    assert float(jnp.abs(grads["prompter"]["tokens"]).max()) > 0


def _abstract_backbone(name, image, **options):
    """``_backbone`` with the parameters' shapes only: no initialisation is compiled or run."""
    built = {}

    def params():
        built["backbone"], params = _backbone(name, image, **options)
        return params

    shapes = jax.eval_shape(params)
    return built["backbone"], shapes


def _step_memory_mib(remat: bool) -> float:
    """Arguments + temporaries + outputs of ViT-Ti/16 VPT-deep's step at 224 px, batch 64,
    compiled (not run) with the trainer's CPU options."""
    backbone, params = _abstract_backbone("vit_ti16", image=224, remat=remat)
    step, args = _step(
        "vpt",
        backbone,
        params,
        image=224,
        batch=64,
        deep=True,
        compiler_options=compilation.step_options("cpu"),
    )
    memory = step.lower(*args).compile().memory_analysis()
    total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
    return total / 2**20


def test_remat_halves_the_step_memory():
    plain, remat = _step_memory_mib(remat=False), _step_memory_mib(remat=True)
    assert remat <= 0.5 * plain, (remat, plain)


def test_bfloat16_compute_and_storage_stay_close_to_float32():
    backbone, params = _backbone()
    bf16, bf16_params = _backbone(compute_dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}
    assert bf16.module.dtype == jnp.bfloat16
    loss, grads, _, _ = _loss_and_prompt_grads(backbone, params)
    bf16_loss, bf16_grads, _, _ = _loss_and_prompt_grads(bf16, bf16_params)
    assert bf16_loss != loss  # it really ran in bfloat16
    np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
    tokens, bf16_tokens = grads["prompter"]["tokens"], bf16_grads["prompter"]["tokens"]
    relative = jnp.linalg.norm(bf16_tokens - tokens) / jnp.linalg.norm(tokens)
    assert float(relative) < 0.1


def test_backbone_options_reach_the_module():
    options = dict(compute_dtype="bfloat16", remat=True, attention="xla")
    module = _abstract_backbone("vit_tiny16", IMAGE, **options)[0].module
    assert (module.dtype, module.remat, module.attention) == (jnp.bfloat16, True, "xla")


def test_unknown_dtype_or_attention_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone.compute_dtype 'float16'"):
        _backbone(compute_dtype="float16")
    with pytest.raises(
        ValueError, match=r"unknown backbone.attention 'flash'; valid choices: \('heads_major'"
    ):
        _backbone(attention="flash")


def test_step_speed_harness_smoke(tmp_path):
    out = tmp_path / "speed.json"
    # Accelerator images often have JAX and PyTorch but no TensorFlow (the H100/H200 machines
    # this harness is meant for): it must run where TensorFlow cannot be imported.
    without_tensorflow = (
        "import os, runpy, sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None); "
        "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    args = [
        sys.executable,
        "-c",
        without_tensorflow,
        str(ROOT / "benchmarks" / "step_speed.py"),
        "--backbones=vit_tiny16",
        "--methods=vpt_deep",
        f"--image_size={IMAGE}",
        f"--batch_sizes={BATCH}",
        "--steps=1",
        "--repeats=1",
        "--warmup=0",
        "--attention=xla",  # the harness's option (the default runs in every other test)
        "--torch_compile_backend=eager",  # dynamo's graphs run eagerly: inductor takes 12 s+
        f"--json={out}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["attention"] == "xla"
    (row,) = report["rows"]
    assert (row["method"], row["backbone"], row["batch"]) == ("vpt_deep", "vit_tiny16", BATCH)
    assert row["img_s"] > 0 and row["compile_s"] > 0 and row["mem_mib"] > 0
    assert row["peak_frac"] > 0 and row["peak_flops"] > 0
    if row["torch_img_s"] is not None:  # torch is installed: eager and compiled columns
        assert report["torch_compile"] and report["torch_compile_backend"] == "eager"
        assert row["torch_compile_s"] > 0
        for torch_speed, rounds, ratio in (
            ("torch_img_s", "round_ratios", "ratio"),
            ("compiled_img_s", "compiled_round_ratios", "ratio_compiled"),
        ):
            # One round of one step each: the paired ratio is the ratio of the two speeds.
            assert row[rounds] == [pytest.approx(row["img_s"] / row[torch_speed])]
            assert row[ratio] == row[rounds][0]
            assert row[f"{ratio}_range"] == [row[ratio], row[ratio]]
    assert "vpt_deep" in result.stdout
    assert len(row["load"]) == 1 and row["load"][0] >= 0  # the load average after the round

    # speed_runs.py on three copies of this run, with the ratios of three runs written in.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed_runs

    paths = []
    for index, (eager, compiled, load) in enumerate(
        [(1.0, 0.95, 1.5), (1.2, None, 0.5), (0.9, 0.85, 2.3)]
    ):
        run = json.loads(out.read_text())
        run["rows"][0].update(ratio=eager, ratio_compiled=compiled, load=[load], img_s=10.0 + index)
        if index == 1:  # a row that only one run has is left out
            run["rows"].append({**run["rows"][0], "method": "vp"})
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps(run))
    lines = speed_runs.table([str(p) for p in paths]).splitlines()
    assert lines[0] == "3 runs: median (lowest-highest run)"
    assert lines[3:] == [
        f"| vpt_deep | vit_tiny16 | {BATCH} | 1.00 (0.90-1.20) | 0.90 (0.85-0.95) | 11.00 | 2.3 |"
    ]


def test_torch_reference_skipping_discarded_rows_changes_no_output():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch_reference

    module = _backbone()[0].module
    torch.manual_seed(0)
    every_row = torch_reference.ViT(module, IMAGE).eval()
    skipping = torch_reference.ViT(module, IMAGE, skip_discarded_rows=True).eval()
    skipping.load_state_dict(every_row.state_dict())
    images = torch.randn(BATCH, 3, IMAGE, IMAGE)
    tokens = torch.randn(module.depth, BATCH, 3, module.hidden_size)
    kv = torch.randn(module.depth, BATCH, module.num_heads, 2, module.hidden_size // 2)
    for kwargs in (
        {},
        {"deep_prompts": tokens},
        {"prompts": tokens[0], "at_end": True},
        {"deep_prompts": tokens, "kv_prompts": (kv, -kv)},
    ):
        expected = every_row(images, **kwargs)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(skipping(images, **kwargs), expected, atol=1e-5, rtol=1e-5)


def _reference_prompts(name: str, prompter: dict) -> dict:
    """jprompt's prompt arrays as the torch reference's tensors, in the official layouts."""
    if name == "evp":  # the official (3, S, S) canvas, zero inside
        return {"perturbation": np.asarray(vp.padding_prompt(prompter)).transpose(2, 0, 1)}
    if name == "lor_vp":
        return {"left_bar": prompter["B"], "right_bar": prompter["A"]}
    if name == "adavipro":
        template = prompter["template"]  # (h, w, 3) strips -> the reference's (3, h, w)
        values = {key: np.asarray(template[f"pad_{key}"]).transpose(2, 0, 1) for key in SIDES}
        for conv, params in prompter["mask_generator"].items():  # HWIO -> torch's OIHW
            values[f"generator.{conv}.weight"] = np.asarray(params["kernel"]).transpose(3, 2, 0, 1)
            values[f"generator.{conv}.bias"] = params["bias"]
        return values
    if name == "e2vpt":
        masks = {"token_mask": prompter["token_mask"][:, 0], "piece_mask": prompter["piece_mask"]}
        return {"tokens": prompter["tokens"], "kv": prompter["kv"], **masks}
    return {"tokens": prompter["tokens"]}


@pytest.mark.parametrize(
    "name, options, reference",
    [
        ("evp", {"prompt_size": 3}, "evp"),
        ("lor_vp", {}, "lor_vp"),
        ("e2vpt", {}, "e2vpt"),
        ("vfpt", {"deep": True}, "vfpt_deep"),
        ("adavipro", {"prompt_size": 4, "region_size": 8, "kernel_size": 8}, "adavipro"),
    ],
)
def test_torch_reference_gives_jprompts_logits(name, options, reference, monkeypatch):
    """The step-speed harness times the same forward on both sides: with the same weights and
    prompts (random, masks included), the torch reference's logits are jprompt's."""
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch_reference

    rng = np.random.default_rng(0)

    def draw(shapes):
        return jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), shapes)

    backbone, shapes = _abstract_backbone("vit_tiny16", IMAGE)
    assert backbone.normalization == "minus_one_to_one"  # prompted's default (mean, std)
    params = draw(shapes)
    method = methods.build(name, backbone=backbone, num_classes=NUM_CLASSES, **options)
    trained = draw(jax.eval_shape(method.init, jax.random.key(1), params)[0])
    pixels = rng.uniform(0, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    normalized = 2 * pixels - 1
    # Evaluation mode on both sides: AdaViPro's region masks are the argmax, no Gumbel noise.
    expected, aux = jax.jit(lambda t: method.apply(t, {"backbone": params}, normalized))(trained)
    if "region_masks" in aux:  # some regions prompted, some not
        assert 0 < float(aux["region_masks"].mean()) < 1

    module = backbone.module
    vit = torch_reference.ViT(module, IMAGE).eval()
    vit.load_state_dict(torch_reference.state_dict(module, params))
    tensors, features = torch_reference.prompted(
        reference,
        vit,
        module,
        image_size=IMAGE,
        vp_prompt_size=options.get("prompt_size", 30),
        adavipro_region_size=options.get("region_size", 32),
        train=False,
    )
    values = _reference_prompts(name, trained["params"]["prompter"])
    assert set(values) == set(tensors)
    head = trained["params"]["head"]
    images = pixels if reference in torch_reference.NORMALIZES else normalized
    with torch.no_grad():
        for key, value in values.items():
            tensors[key].copy_(torch.from_numpy(np.array(value)))
        got = features(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        got = (got @ torch.from_numpy(head["kernel"]) + torch.from_numpy(head["bias"])).numpy()
    assert np.abs(expected).max() > 1
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_block_speed_benchmark_smoke():
    args = [
        sys.executable,
        str(ROOT / "benchmarks" / "block_speed.py"),
        "--backbone=vit_tiny16",
        f"--batch={BATCH}",
        "--tokens=9",
        "--image_size=32",  # the PGN generator's input
        "--steps=1",
        "--repeats=1",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert list(rows) == ["attention", "mlp", "block", "stack", "generator"]
    for name, (jax_ms, torch_ms, ratio) in rows.items():
        assert float(jax_ms) > 0, name
        if torch_ms != "-":
            # Recomputed from the printed times, which are rounded to two decimals.
            expected = float(torch_ms) / float(jax_ms)
            assert float(ratio) == pytest.approx(expected, rel=0.05, abs=0.01)
    assert "stack of 2 blocks" in result.stdout  # the tiny ViT's depth


def test_cpu_step_options_keep_only_what_this_jaxlib_accepts(monkeypatch):
    assert compilation.step_options("gpu") == {}
    # This jaxlib knows both options; one it does not know is left out instead of failing
    # every compilation.
    assert compilation.step_options("cpu") == compilation.CPU_OPTIONS
    unknown = {"xla_cpu_no_such_option": "1"}
    monkeypatch.setattr(compilation, "CPU_OPTIONS", {**compilation.CPU_OPTIONS, **unknown})
    assert compilation.step_options("cpu") == {
        name: value for name, value in compilation.CPU_OPTIONS.items() if name not in unknown
    }


def test_cpu_step_options_give_the_same_step():
    backbone, params = _backbone()
    default_step, args = _step("vpt", backbone, params, deep=True)
    tuned_step, _ = _step(
        "vpt", backbone, params, deep=True, compiler_options=compilation.step_options("cpu")
    )
    default_state, default_metrics = default_step(*args)
    tuned_state, tuned_metrics = tuned_step(*args)
    loss = [m.compute()["loss"] for m in (tuned_metrics, default_metrics)]
    np.testing.assert_allclose(*loss, rtol=1e-5)
    trained = [tuned_state["trained"], default_state["trained"]]
    for a, b in zip(*map(jax.tree.leaves, trained), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # matmuls sum in another order
