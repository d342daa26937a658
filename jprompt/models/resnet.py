"""The PGN generator: a ResNet-10 in Flax Linen that reproduces the official PyTorch network.

Architecture of the official code (``pgn/pgn_models/resnet.py`` with ``init_max_pool=True``, the
default of its training scripts; the released weights confirm every shape):

    stem    conv 3x3 (3 -> 16, stride 2, padding 1, no bias) -> BN -> ReLU
            -> max-pool 3x3 (stride 2, padding 1)
    stage i (i = 0..3, width 16 * 2**i, one basic block each):
            conv 3x3 (stride 2 for i > 0, padding 1, no bias) -> BN -> ReLU
            -> conv 3x3 (padding 1, no bias) -> BN;  shortcut: identity for i = 0, else a
            1x1 stride-2 conv WITH bias;  out = ReLU(residual + shortcut)
    output  global average pool -> Linear(128 -> num_outputs)

Padding is explicit and symmetric, as in PyTorch (``"SAME"`` would pad a stride-2 conv only at
the bottom/right), and the max-pool pads with -inf, so imported PyTorch weights give PyTorch's
outputs. The max-pool's gradient goes, as in PyTorch, to the first maximum of each window in
row-major order (``max_pool``).

Initialisation as in PyTorch: convs He-normal with fan_out (``kaiming_normal_``, not
truncated); BN scale 1, bias 0; the shortcut bias and the Linear layer keep PyTorch's defaults,
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias. ``init_variables`` draws the same
distributions with two random calls instead of one per parameter (much faster to compile).

BatchNorm follows ``torch.nn.BatchNorm2d`` exactly (momentum 0.1, i.e. flax's 0.9, eps 1e-5):
training normalizes with the batch statistics and updates the running ones, with the *unbiased*
batch variance going into the running variance (flax's ``nn.BatchNorm`` would use the biased
one); evaluation uses the running statistics. Collections: ``params`` (``scale``, ``bias``,
``kernel``) and ``batch_stats`` (``mean``, ``var``).
"""

import functools
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

WIDTHS = (16, 32, 64, 128)
BN_MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * running + m * batch
BN_EPS = 1e-5

he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated


def torch_default_uniform(fan_in: int):
    """PyTorch's default init of Linear/Conv weights and biases: U(-1/sqrt(fan_in), +...)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis of an NHWC input."""

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, x, *, train: bool):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                unbiased = var * count / max(count - 1, 1)
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """``torch.nn.functional.max_pool2d(x, window, stride, padding=window // 2)`` on NHWC.

    The gradient goes to the first maximum of each window in row-major order, as PyTorch's CPU
    and CUDA kernels route it, and is computed from ``window**2`` strided slices: XLA:CPU's
    ``select_and_scatter``, autodiff's gradient of ``nn.max_pool``, took twice as long.
    """
    pad = window // 2
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad),) * 2)


def _max_pool_forward(x, window, stride):
    pooled = max_pool(x, window, stride)
    return pooled, (x, pooled)


def _max_pool_backward(window, stride, residuals, grad):
    x, pooled = residuals
    pad = window // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    out_size = pooled.shape[1]
    span = stride * (out_size - 1) + 1
    taken = jnp.zeros(pooled.shape, bool)
    grad_in = jnp.zeros(padded.shape, grad.dtype)
    zero = jnp.zeros((), grad.dtype)
    for row, col in itertools.product(range(window), repeat=2):
        window_slice = padded[:, row : row + span : stride, col : col + span : stride]
        first = (window_slice == pooled) & ~taken
        taken = taken | first
        # A strided slice's transpose: place each element back at its input position.
        grad_in = grad_in + jax.lax.pad(
            jnp.where(first, grad, zero),
            zero,
            (
                (0, 0, 0),
                (row, padded.shape[1] - row - span, stride - 1),
                (col, padded.shape[2] - col - span, stride - 1),
                (0, 0, 0),
            ),
        )
    return (grad_in[:, pad:-pad, pad:-pad],)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _conv(features: int, kernel: int, stride: int, name: str, *, bias: bool = False) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        kernel_init=he_normal_fan_out,
        name=name,
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (a biased 1x1 stride-2 conv when subsampling)."""

    features: int
    subsample: bool

    @nn.compact
    def __call__(self, x, *, train: bool):
        stride = 2 if self.subsample else 1
        y = _conv(self.features, 3, stride, "conv1")(x)
        y = nn.relu(BatchNorm(name="bn1")(y, train=train))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = BatchNorm(name="bn2")(y, train=train)
        if self.subsample:
            shortcut = nn.Conv(
                self.features,
                (1, 1),
                strides=(2, 2),
                padding="VALID",
                kernel_init=he_normal_fan_out,
                bias_init=torch_default_uniform(x.shape[-1]),
                name="downsample",
            )(x)
        else:
            shortcut = x
        return nn.relu(y + shortcut)


class ResNet10(nn.Module):
    """PGN's generator: ``(B, H, W, 3)`` images -> ``(B, num_outputs)`` logits.

    The images are the backbone's normalized input. Tree: ``stem_conv``, ``stem_bn``,
    ``block_{0..3}/{conv1, bn1, conv2, bn2[, downsample]}``, ``output``.
    """

    num_outputs: int
    widths: tuple[int, ...] = WIDTHS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = images.astype(self.dtype)
        x = _conv(self.widths[0], 3, 2, "stem_conv")(x)
        x = nn.relu(BatchNorm(name="stem_bn")(x, train=train))
        x = max_pool(x)
        for i, width in enumerate(self.widths):
            x = BasicBlock(width, subsample=i > 0, name=f"block_{i}")(x, train=train)
        x = x.mean(axis=(1, 2))
        init = torch_default_uniform(self.widths[-1])
        return nn.Dense(self.num_outputs, kernel_init=init, bias_init=init, name="output")(x)


def init_rule(path: tuple[str, ...], shapes: dict) -> tuple[str, float]:
    """How PyTorch initialises the ResNet10 parameter at ``path``: ``("normal", std)``,
    ``("uniform", bound)`` on (-bound, bound), or ``("constant", value)``.

    ``shapes`` maps every parameter path to its shape (a bias's fan-in is its kernel's). These are
    the distributions of the module's own initializers.
    """
    layer, leaf = path[-2], path[-1]
    if leaf == "scale":  # BatchNorm weight
        return "constant", 1.0
    if "bn" in layer:  # BatchNorm bias
        return "constant", 0.0
    kernel = shapes[(*path[:-1], "kernel")]
    if layer == "output" or leaf == "bias":  # PyTorch's default Linear / conv-bias init
        return "uniform", 1.0 / math.sqrt(math.prod(kernel[:-1]))
    if leaf == "kernel":  # HWIO conv kernel: kaiming_normal_, fan_out = out * kh * kw
        return "normal", math.sqrt(2.0 / (kernel[0] * kernel[1] * kernel[3]))
    raise ValueError(f"no init rule for ResNet10 parameter {'/'.join(path)}")


def init_variables(module: ResNet10, rng: jax.Array, image_size: int = 32) -> dict:
    """``{"params", "batch_stats"}`` for ``module``, drawn from the distributions of
    ``module.init`` (see ``init_rule``) with one normal and one uniform call for all parameters.

    flax's ``module.init`` calls the random generator once per parameter, and the compiler
    handles each of those calls on its own; two draws compile once. Values differ from
    ``module.init``'s, distributions do not. The shapes, and so the values, do not depend on
    ``image_size``.
    """
    abstract = jax.eval_shape(
        lambda: module.init(
            jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), train=False
        )
    )
    flat = traverse_util.flatten_dict(abstract["params"])
    shapes = {path: leaf.shape for path, leaf in flat.items()}
    total = sum(math.prod(shape) for shape in shapes.values())

    # Compiled as one program: run eagerly, the slicing and scaling of each parameter and each
    # batch statistic would be dozens of small programs, each compiled on its own.
    @jax.jit
    def draw(rng):
        normal_rng, uniform_rng = jax.random.split(rng)
        normal = jax.random.normal(normal_rng, (total,), jnp.float32)
        uniform = jax.random.uniform(uniform_rng, (total,), jnp.float32, -1.0, 1.0)
        params, offset = {}, 0
        for path, shape in shapes.items():
            size = math.prod(shape)
            kind, value = init_rule(path, shapes)
            if kind == "constant":
                params[path] = jnp.full(shape, value, jnp.float32)
            else:
                draws = normal if kind == "normal" else uniform
                params[path] = value * draws[offset : offset + size].reshape(shape)
            offset += size
        batch_stats = {
            path: (jnp.ones if path[-1] == "var" else jnp.zeros)(leaf.shape, jnp.float32)
            for path, leaf in traverse_util.flatten_dict(abstract["batch_stats"]).items()
        }
        return {
            "params": traverse_util.unflatten_dict(params),
            "batch_stats": traverse_util.unflatten_dict(batch_stats),
        }

    return draw(rng)
