"""Import of the released PGN weights (PyTorch ``TLPGN`` state dicts of the official code,
github.com/jochemloedeman/PGN) into ``jprompt.methods.pgn``'s layout.

Apart from ``pgn`` so that the method itself loads no checkpoint reader.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jprompt.methods import pgn
from jprompt.models import torch_checkpoint


def _released_key_map() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """PyTorch state-dict key -> (collection, path in our tree, conversion)."""
    mapping = {"tl_vectors": ("params", ("library",), "copy")}

    def conv(torch_name, path, bias=False):
        mapping[f"{torch_name}.weight"] = ("params", (*path, "kernel"), "conv")
        if bias:
            mapping[f"{torch_name}.bias"] = ("params", (*path, "bias"), "copy")

    def bn(torch_name, path):
        for torch_leaf, collection, leaf in (
            ("weight", "params", "scale"),
            ("bias", "params", "bias"),
            ("running_mean", "batch_stats", "mean"),
            ("running_var", "batch_stats", "var"),
        ):
            mapping[f"{torch_name}.{torch_leaf}"] = (collection, (*path, leaf), "copy")

    conv("model.input_net.0", ("generator", "stem_conv"))
    bn("model.input_net.1", ("generator", "stem_bn"))
    for i in range(4):
        torch_block, block = f"model.blocks.{i}", ("generator", f"block_{i}")
        conv(f"{torch_block}.net.0", (*block, "conv1"))
        bn(f"{torch_block}.net.1", (*block, "bn1"))
        conv(f"{torch_block}.net.3", (*block, "conv2"))
        bn(f"{torch_block}.net.4", (*block, "bn2"))
        if i > 0:
            conv(f"{torch_block}.downsample", (*block, "downsample"), bias=True)
    mapping["model.output_net.2.weight"] = ("params", ("generator", "output", "kernel"), "linear")
    mapping["model.output_net.2.bias"] = ("params", ("generator", "output", "bias"), "copy")
    return mapping


_CONVERT = {
    "copy": lambda x: x,
    "conv": lambda x: x.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "linear": lambda x: x.T,  # (out, in) -> (in, out)
}


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load(
    path,
    *,
    num_tokens: int | None = None,
    library_size: int | None = None,
    token_dim: int | None = None,
) -> tuple[dict, dict]:
    """Released PGN weights (a PyTorch ``TLPGN`` state dict) -> ``(params, batch_stats)``.

    ``params = {"generator": ..., "library": (N, D)}`` and ``batch_stats = {"generator": ...}``,
    in the layout of ``PromptGenerationNetwork``'s trained state (which adds its ``head``).
    K, N and D are read from the file unless given; given ones must match. Missing or unexpected
    keys and shape mismatches fail with one error naming all of them. ``num_batches_tracked``
    (PyTorch's BN step counter) is not needed and dropped.
    """
    state = torch_checkpoint.load_state_dict(path)
    mapping = _released_key_map()
    library = state.get("tl_vectors")
    output = state.get("model.output_net.2.weight")
    if library is None or output is None or library.ndim != 2 or output.ndim != 2:
        raise ValueError(
            f"{path} is not a released PGN state dict: it needs 'tl_vectors' (N, D) and "
            f"'model.output_net.2.weight' (K*N, 128); its keys are {sorted(state)}"
        )
    library_size = library_size or library.shape[0]
    token_dim = token_dim or library.shape[1]
    num_tokens = num_tokens or output.shape[0] // library_size

    # Expected shapes from our own generator.
    generator = pgn.PromptGenerator(num_tokens, library_size, token_dim)
    params, batch_stats = jax.eval_shape(generator.init, jax.random.PRNGKey(0))
    expected = {"params": params, "batch_stats": batch_stats}

    tree: dict = {"params": {}, "batch_stats": {}}
    problems = []
    unexpected = [
        key for key in state if key not in mapping and not key.endswith(".num_batches_tracked")
    ]
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    missing = [key for key in mapping if key not in state]
    if missing:
        problems.append(f"missing keys {missing}")
    for key, (collection, tree_path, conversion) in mapping.items():
        if key not in state:
            continue
        value = np.asarray(_CONVERT[conversion](state[key]), np.float32)
        want_shape = tuple(_get(expected[collection], tree_path).shape)
        if value.shape != want_shape:
            problems.append(
                f"{key}: shape {state[key].shape} gives {value.shape}, expected {want_shape} "
                f"(K={num_tokens}, N={library_size}, D={token_dim})"
            )
            continue
        _set(tree[collection], tree_path, jnp.asarray(value))
    if problems:
        raise ValueError(f"cannot import released PGN weights from {path}: " + "; ".join(problems))
    return tree["params"], tree["batch_stats"]
