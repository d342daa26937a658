"""PGN: prompt generation networks (Loedeman et al. 2022/2024) and their input-free baseline.

``PromptGenerationNetwork`` ("pgn"): a ResNet-10 generator (``jprompt.models.resnet``) looks at
the same normalized image the backbone sees and outputs logits ``(K, N)``; a softmax over the N
rows of a learned token library ``L (N, D)`` (no temperature) mixes them into K prompt tokens,
``prompts = softmax(logits) @ L`` of shape ``(K, D)``: each token is a convex combination of
library rows. The tokens are appended at the END of the frozen backbone's sequence (after CLS and
the patches), after the position embedding was added, so they carry none
(``prompt_position="end"``). L is initialised N(0, 0.02^2). As in the official code the
generator sees the image at the backbone's resolution (the official code resizes to 224, which is
the backbone's size there); its BatchNorm layers train with batch statistics. Its parameters
are drawn as PyTorch draws them (``resnet.init_variables``).

Head (``jprompt.methods.base``): on CLIP, the paper's main setting, the frozen zero-shot text
head, so only the PGN trains; with a supervised ViT backbone a linear head on the frozen
features trains next to the PGN (the official code trains the torchvision ViT's head).

Trainable state::

    {"params": {"generator": ..., "library": (N, D), "head": ...},
     "batch_stats": {"generator": ...}}

``apply(..., train=True)`` normalizes with batch statistics and returns the updated running
statistics in ``aux["mutable"]["batch_stats"]`` (the trainer writes them back); ``train=False``
uses the running statistics, so an image's prediction does not depend on its batch.
``aux["token_weights"]`` is the ``(B, K, N)`` mixture per image, for visualisation.

``deployable=True`` trains in the geometry of prompt inversion (``jprompt.methods.inversion``), so
that the trained PGN can be deployed as plain RGB rows below the image to the unmodified backbone:
the K tokens are followed by the constant tokens of the mid-gray "filler" patches that complete
the last extra patch row (``inversion.filler_tokens``, computed from the frozen tree). The
latent model is then exactly the function the deployed pipeline computes. It needs a backbone
with ``pool="tok"`` and ``3 P^2 >= D``, and fails clearly otherwise.

Sizes of the official releases (generator + library, head and BN statistics not counted):
K=16, N=256, D=768 (CLIP ViT-B/32): 835,696 + 196,608 = 1,032,304; K=16, N=128, D=768 (ViT-B/32):
669,808; K=16, N=128, D=384 (DINO ViT-S/16): 620,656. ``load_released_pgn`` imports the released
PyTorch weights.

``LearnedTokens`` ("prompt_tokens"): the paper's input-independent baseline (``IIP`` in the
official code): K learned tokens, N(0, 0.02^2), appended the same way, plus the head.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jprompt.methods import inversion
from jprompt.methods.base import Method
from jprompt.models import resnet, torch_checkpoint
from jprompt.models.resnet import ResNet10

TOKEN_INIT_STD = 0.02
PROMPT_POSITION = "end"


def init_tokens(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return TOKEN_INIT_STD * jax.random.normal(rng, shape, jnp.float32)


def mix_library(logits: jax.Array, library: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B, K, N)`` logits and an ``(N, D)`` library -> ``(prompts (B, K, D), weights)``."""
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("bkn,nd->bkd", weights, library), weights


@dataclasses.dataclass(frozen=True)
class PromptGenerationNetwork(Method):
    num_tokens: int = 16  # K
    library_size: int = 256  # N
    deployable: bool = False  # train with the geometry of prompt inversion (module docstring)

    def __post_init__(self):
        if self.deployable:
            inversion.check_invertible(self.backbone.module, self.backbone.name)

    @property
    def geometry(self) -> inversion.Geometry:
        """Where the deployed prompt patches go (``deployable`` only)."""
        module = self.backbone.module
        return inversion.Geometry.of(self.backbone.image_size, module.patch_size, self.num_tokens)

    @property
    def token_dim(self) -> int:
        return self.backbone.module.hidden_size

    @property
    def generator(self) -> ResNet10:
        return ResNet10(num_outputs=self.num_tokens * self.library_size)

    def init(self, rng, backbone_params):
        gen_rng, lib_rng, head_rng = jax.random.split(rng, 3)
        head, head_frozen = self.init_head(head_rng)
        variables = resnet.init_variables(self.generator, gen_rng, self.backbone.image_size)
        params = {
            "generator": variables["params"],
            "library": init_tokens(lib_rng, (self.library_size, self.token_dim)),
            **head,
        }
        trained = {"params": params, "batch_stats": {"generator": variables["batch_stats"]}}
        return trained, {"backbone": backbone_params, **head_frozen}

    def prompts(self, trained, images, *, train: bool):
        """``(prompts (B, K, D), token_weights (B, K, N), new generator batch_stats or None)``."""
        params = trained["params"]
        variables = {
            "params": params["generator"],
            "batch_stats": trained["batch_stats"]["generator"],
        }
        if train:
            logits, updates = self.generator.apply(
                variables, images, train=True, mutable=["batch_stats"]
            )
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = self.generator.apply(variables, images, train=False), None
        logits = logits.reshape(images.shape[0], self.num_tokens, self.library_size)
        prompts, weights = mix_library(logits, params["library"])
        return prompts, weights, new_stats

    def token_weights(self, trained, images):
        """``(B, K, N)``: how each image mixes the library rows into its K tokens, as
        ``aux["token_weights"]`` of ``apply(..., train=False)``, without running the backbone."""
        return self.prompts(trained, images, train=False)[1]

    def visualize(self, trained, frozen, images, *, rng):
        """How each image mixes the token library: its (K, N) softmax weights as a heat map,
        scaled so that each image's largest weight is white."""
        del frozen, rng
        weights = self.token_weights(trained, images)
        scaled = weights / weights.max(axis=(1, 2), keepdims=True)
        return {"library_usage_mask": scaled[..., None]}

    def apply(self, trained, frozen, images, *, rng, train, epoch=0):
        del rng, epoch  # deterministic; the backbone runs in eval mode
        prompts, weights, new_stats = self.prompts(trained, images, train=train)
        if self.deployable:
            fillers = inversion.filler_tokens(
                frozen["backbone"], self.geometry, self.backbone.normalization
            )
            fillers = jnp.broadcast_to(fillers, (prompts.shape[0], *fillers.shape))
            prompts = jnp.concatenate([prompts, fillers.astype(prompts.dtype)], axis=1)
        features, out = self.backbone.features(
            frozen["backbone"], images, prompt_tokens=prompts, prompt_position=PROMPT_POSITION
        )
        logits = self.head_logits(trained["params"], frozen, features)
        aux = {**out, "token_weights": weights}
        if new_stats is not None:
            aux["mutable"] = {"batch_stats": {"generator": new_stats}}
        return logits, aux


@dataclasses.dataclass(frozen=True)
class LearnedTokens(Method):
    """K input-independent tokens appended at the end of the sequence, plus a linear head."""

    num_tokens: int = 16

    def init(self, rng, backbone_params):
        token_rng, head_rng = jax.random.split(rng)
        head, head_frozen = self.init_head(head_rng)
        params = {
            "tokens": init_tokens(token_rng, (self.num_tokens, self.backbone.module.hidden_size)),
            **head,
        }
        return {"params": params}, {"backbone": backbone_params, **head_frozen}

    def apply(self, trained, frozen, images, *, rng, train, epoch=0):
        del rng, train, epoch
        params = trained["params"]
        prompts = jnp.broadcast_to(params["tokens"], (images.shape[0], *params["tokens"].shape))
        features, out = self.backbone.features(
            frozen["backbone"], images, prompt_tokens=prompts, prompt_position=PROMPT_POSITION
        )
        return self.head_logits(params, frozen, features), out


# --- Import of the released PyTorch weights -------------------------------------------------


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


def load_released_pgn(
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

    # Expected shapes from our own modules.
    size = 32  # any size works: the shapes do not depend on it
    generator = ResNet10(num_outputs=num_tokens * library_size)
    abstract = jax.eval_shape(
        lambda rng, x: generator.init(rng, x, train=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, 3), jnp.float32),
    )
    expected = {
        "params": {"generator": abstract["params"], "library": (library_size, token_dim)},
        "batch_stats": {"generator": abstract["batch_stats"]},
    }

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
        want = _get(expected[collection], tree_path)
        want_shape = tuple(want) if isinstance(want, tuple) else tuple(want.shape)
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


def count_pgn_params(params: dict) -> int:
    """Trainable PGN parameters (generator + library), as the paper counts them (no head)."""
    leaves = jax.tree.leaves({k: v for k, v in params.items() if k in ("generator", "library")})
    return sum(math.prod(leaf.shape) for leaf in leaves)
