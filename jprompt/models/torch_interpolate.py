"""PyTorch's bicubic ``torch.nn.functional.interpolate`` in numpy, for resampling the position
embeddings of PyTorch-trained ViTs exactly as their own code does, without torch.

``interpolate(grid, size, scale_factor=..., antialias=...)`` computes what
``F.interpolate(x, size or scale_factor, mode="bicubic", align_corners=False, antialias=...)``
computes on the (H, W) axes of an (H, W, C) array (in float64, returned as float32). Both of
PyTorch's kernels are separable, one (out, in) weight matrix per axis:

- ``antialias=False``: Keys' cubic convolution with A = -0.75 on the 4 nearest inputs (indices
  clamped at the border); output pixel i samples input coordinate ``(i + 0.5) * scale - 0.5``,
  where ``scale`` is ``1 / scale_factor`` when a scale factor is given (DINOv2's 0.1 offset
  lives there) and ``in / out`` otherwise.
- ``antialias=True`` (PIL's filter, used by DINOv2 with registers): when shrinking, the cubic
  kernel with A = -0.5 is stretched by ``scale = in / out``, covers every input within
  ``2 * scale`` of the centre ``(i + 0.5) * scale``, and its weights are normalised to sum to 1.
"""

import math

import numpy as np


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a``, zero outside (-2, 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _cubic_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out, in) weights of PyTorch's plain bicubic kernel (``upsample_bicubic2d``)."""
    weights = np.zeros((out_size, in_size))
    source = (np.arange(out_size) + 0.5) * scale - 0.5
    floor = np.floor(source)
    for tap in range(-1, 3):  # the 4 inputs around each source coordinate
        index = np.clip(floor + tap, 0, in_size - 1).astype(int)
        np.add.at(weights, (np.arange(out_size), index), _keys_cubic(source - floor - tap, -0.75))
    return weights


def _antialias_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out, in) weights of PyTorch's antialiased bicubic kernel (``_upsample_bicubic2d_aa``)."""
    support = 2.0 * max(scale, 1.0)
    stretch = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero, as the C++ cast does.
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = _keys_cubic((np.arange(first, stop) - center + 0.5) * stretch, -0.5)
        weights[i, first:stop] = taps / taps.sum()
    return weights


def interpolate(
    grid: np.ndarray,
    size: tuple[int, int] | None = None,
    *,
    scale_factor: tuple[float, float] | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """``F.interpolate(mode="bicubic", align_corners=False)`` on an (H, W, C) array: to ``size``,
    or by ``scale_factor`` (output ``floor(in * factor)``, coordinates mapped by the factor)."""
    if (size is None) == (scale_factor is None):
        raise ValueError("give either size or scale_factor")
    grid = np.asarray(grid, np.float64)
    kernel = _antialias_weights if antialias else _cubic_weights
    matrices = []
    for axis in range(2):
        in_size = grid.shape[axis]
        if scale_factor is None:
            out_size, scale = size[axis], in_size / size[axis]
        else:
            out_size, scale = math.floor(in_size * scale_factor[axis]), 1 / scale_factor[axis]
        matrices.append(kernel(in_size, out_size, scale))
    rows, cols = matrices
    return np.einsum("oh,hwc,pw->opc", rows, grid, cols).astype(np.float32)
