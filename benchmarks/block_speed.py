r"""Where a prompt's training step spends its time: an encoder block's parts and PGN's generator,
JAX against PyTorch.

For the widths of a ViT (``--backbone``; default ViT-Ti/16) at ``--tokens`` tokens (default 207:
196 patches, the class token and VPT's 10 prompts) and ``--batch`` images, each part runs forward
and backward with frozen random weights and the gradient taken with respect to its input only,
as a prompt's step needs it (the loss is the sum of the output times a fixed random cotangent):

- ``attention``: jprompt's ``MultiHeadDotProductAttention`` (fused q/k/v projection, heads-major
  core, output projection) against ``torch_reference.Block.attention`` (fused ``qkv`` Linear,
  ``F.scaled_dot_product_attention``, ``proj``);
- ``mlp``: ``MlpBlock`` against ``Block.mlp`` (Linear, GELU, Linear);
- ``block``: one ``Encoder1DBlock`` (LayerNorms and residuals included) against ``Block``;
- ``stack``: ``--depth`` blocks in sequence (default: the backbone's depth), as a step runs them;
- ``generator`` (``--generator``): PGN's ResNet-10 (``jprompt.models.resnet.ResNet10`` with
  PGN's default 16 x 256 outputs, as ``step_speed.py`` runs it) on ``--batch`` random
  ``--image_size`` images in training mode (batch statistics), with the gradient taken with
  respect to its parameters, as PGN's step needs it, against ``torch_reference.ResNet10``.

JAX parts are jitted with ``jprompt.train.compilation``'s options, as the trainer's step; JAX and
torch rounds alternate in one process (``--repeats`` rounds of ``--steps`` calls, medians), after
``jprompt.train.host_memory``'s settings on CPU hosts, as ``step_speed.py``. ``ratio`` is torch
time / JAX time: above 1, jprompt is faster.

    python benchmarks/block_speed.py --backbone=vit_ti16 --batch=16
"""

import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jprompt.methods import pgn
from jprompt.models import resnet, vit
from jprompt.train import compilation, host_memory

_BACKBONE = flags.DEFINE_string("backbone", "vit_ti16", "A ViT name (jprompt.models.vit).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_TOKENS = flags.DEFINE_integer("tokens", 207, "Sequence length.")
_DEPTH = flags.DEFINE_integer("depth", 0, "Blocks in the stack; 0: the backbone's depth.")
_GENERATOR = flags.DEFINE_bool("generator", True, "Time PGN's generator too.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "The generator's input size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating JAX/torch rounds.")
_TORCH = flags.DEFINE_bool(
    "torch", importlib.util.find_spec("torch") is not None, "Time the PyTorch parts too."
)


def jax_parts(module, depth: int) -> dict:
    """name -> (init, apply) of jprompt's parts, ``apply(params, x)`` with dropout off."""
    block = vit.Encoder1DBlock(
        mlp_dim=module.mlp_dim,
        num_heads=module.num_heads,
        layernorm_epsilon=module.layernorm_epsilon,
        activation=module.activation,
    )
    attention = vit.MultiHeadDotProductAttention(num_heads=module.num_heads)
    mlp = vit.MlpBlock(mlp_dim=module.mlp_dim, activation=module.activation)

    def init_stack(rng, x):
        return [block.init(key, x, True) for key in jax.random.split(rng, depth)]

    def apply_stack(params, x):
        for layer in params:
            x = block.apply(layer, x, True)
        return x

    def without_dropout(part):
        return (
            lambda rng, x: part.init(rng, x, deterministic=True),
            lambda params, x: part.apply(params, x, deterministic=True),
        )

    return {
        "attention": without_dropout(attention),
        "mlp": without_dropout(mlp),
        "block": without_dropout(block),
        "stack": (init_stack, apply_stack),
    }


def jax_timer(init, apply, x, cotangent):
    """A no-argument call running the part's forward and input-gradient backward once."""
    params = init(jax.random.key(0), x)
    grad = jax.jit(
        jax.grad(lambda x, params, cotangent: jnp.sum(apply(params, x) * cotangent)),
        compiler_options=compilation.step_options(jax.default_backend()),
    )
    jax.block_until_ready(grad(x, params, cotangent))  # compile
    return lambda: jax.block_until_ready(grad(x, params, cotangent))


def torch_parts(module, depth: int) -> dict:
    """name -> the torch twin of each part (frozen parameters)."""
    import torch
    import torch_reference

    def new_block():
        return torch_reference.block_like(module).requires_grad_(False)

    block = new_block()
    return {
        "attention": block.attention,
        "mlp": block.mlp,
        "block": block,
        "stack": torch.nn.Sequential(*(new_block() for _ in range(depth))),
    }


def torch_timer(part, x, cotangent):
    import torch

    x = torch.from_numpy(x).requires_grad_()
    cotangent = torch.from_numpy(cotangent)

    def run():
        x.grad = None
        torch.sum(part(x) * cotangent).backward()

    run()  # warm-up
    return run


def generator_timers(batch: int, image_size: int) -> dict:
    """side -> a no-argument call of PGN's generator forward (training mode) and parameter
    gradient, for "jax" and, with ``--torch``, "torch"."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    defaults = pgn.PromptGenerator()  # K = 16 tokens from N = 256
    outputs = defaults.num_tokens * defaults.library_size
    cotangent = rng.standard_normal((batch, outputs)).astype(np.float32)
    network = resnet.ResNet10(num_outputs=outputs)
    variables = resnet.init_variables(network, jax.random.key(0), image_size)

    def loss(params, batch_stats, images, cotangent):
        logits, _ = network.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=True
        )
        return jnp.sum(logits * cotangent)

    grad = jax.jit(jax.grad(loss), compiler_options=compilation.step_options(jax.default_backend()))
    arguments = (variables["params"], variables["batch_stats"], images, cotangent)
    jax.block_until_ready(grad(*arguments))  # compile
    timers = {"jax": lambda: jax.block_until_ready(grad(*arguments))}
    if _TORCH.value:
        import torch
        import torch_reference

        twin = torch_reference.ResNet10(outputs).train()
        images_nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        cotangent_torch = torch.from_numpy(cotangent)

        def run():
            twin.zero_grad(set_to_none=True)
            torch.sum(twin(images_nchw) * cotangent_torch).backward()

        run()  # warm-up
        timers["torch"] = run
    return timers


def time_calls(run, samples: list[float]) -> None:
    """Append the milliseconds of ``--steps`` calls of ``run`` to ``samples``."""
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        run()
        samples.append(1e3 * (time.perf_counter() - start))


def compare(name: str, runs: dict) -> None:
    """Time ``runs`` ({"jax": run[, "torch": run]}) in alternating rounds; print their row."""
    samples = {side: [] for side in runs}
    for _ in range(_REPEATS.value):
        for side, run in runs.items():
            time_calls(run, samples[side])
    jax_ms = statistics.median(samples["jax"])
    if "torch" in samples:
        torch_ms = statistics.median(samples["torch"])
        print(f"{name:<11}{jax_ms:9.2f}{torch_ms:10.2f}{torch_ms / jax_ms:7.2f}", flush=True)
    else:
        print(f"{name:<11}{jax_ms:9.2f}{'-':>10}{'-':>7}", flush=True)


def main(argv):
    del argv
    host_memory.keep_freed_memory_on_cpu_hosts()  # before the backend starts
    module = vit.create(_BACKBONE.value)
    depth = _DEPTH.value or module.depth
    rng = np.random.default_rng(0)
    shape = (_BATCH.value, _TOKENS.value, module.hidden_size)
    x, cotangent = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    print(
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), float32: {_BACKBONE.value} "
        f"widths, batch {_BATCH.value}, {_TOKENS.value} tokens, stack of {depth} blocks"
    )
    print(f"{'part':<11}{'jax_ms':>9}{'torch_ms':>10}{'ratio':>7}")
    torch_twins = torch_parts(module, depth) if _TORCH.value else {}
    on_device = jnp.asarray(x), jnp.asarray(cotangent)
    for name, (init, apply) in jax_parts(module, depth).items():
        runs = {"jax": jax_timer(init, apply, *on_device)}
        if name in torch_twins:
            runs["torch"] = torch_timer(torch_twins[name], x, cotangent)
        compare(name, runs)
    if _GENERATOR.value:
        compare("generator", generator_timers(_BATCH.value, _IMAGE_SIZE.value))


if __name__ == "__main__":
    app.run(main)
