"""PGN: prompt generation networks (Loedeman et al. 2022/2024) and their input-free baseline.

``PromptGenerator``, the generator on its own (it needs no backbone, only K, N and the token
width D): a ResNet-10 (``jprompt.models.resnet``) looks at the normalized image and outputs
logits ``(K, N)``; a softmax over the N rows of a learned token library ``L (N, D)`` (no
temperature) mixes them into K prompt tokens, ``prompts = softmax(logits) @ L`` of shape
``(K, D)``: each token is a convex combination of library rows.

``PromptGenerationNetwork`` ("pgn"): that generator on the same normalized image the backbone
sees. The tokens are appended at the END of the frozen backbone's sequence (after CLS and
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
669,808; K=16, N=128, D=384 (DINO ViT-S/16): 620,656. ``jprompt.methods.pgn_release`` imports
the released PyTorch weights.

``LearnedTokens`` ("prompt_tokens"): the paper's input-independent baseline (``IIP`` in the
official code): K learned tokens, N(0, 0.02^2), appended the same way, plus the head.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from jprompt.methods import inversion
from jprompt.methods.base import Method
from jprompt.models import resnet

TOKEN_INIT_STD = 0.02
PROMPT_POSITION = "end"


def init_tokens(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return TOKEN_INIT_STD * jax.random.normal(rng, shape, jnp.float32)


def mix_library(logits: jax.Array, library: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B, K, N)`` logits and an ``(N, D)`` library -> ``(prompts (B, K, D), weights)``."""
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("bkn,nd->bkd", weights, library), weights


@dataclasses.dataclass(frozen=True)
class PromptGenerator:
    """PGN's prompt generator: image -> K tokens mixed from an ``(N, D)`` library.

    Its arrays: ``params = {"generator": ..., "library": (N, D)}`` and
    ``batch_stats = {"generator": ...}``, the layout of ``PromptGenerationNetwork``'s trained
    state (whose ``params`` also hold the head, ignored here).
    """

    num_tokens: int = 16  # K
    library_size: int = 256  # N
    token_dim: int = 768  # D: the backbone's hidden size

    @property
    def network(self) -> resnet.ResNet10:
        return resnet.ResNet10(num_outputs=self.num_tokens * self.library_size)

    def init(self, rng: jax.Array) -> tuple[dict, dict]:
        """``(params, batch_stats)``: the ResNet as PyTorch draws it, the library N(0, 0.02^2).

        ``rng`` is split in three as ``PromptGenerationNetwork.init`` splits it (the third key
        draws its head), so a generator and a PGN made from one rng hold the same arrays.
        """
        net_rng, lib_rng, _ = jax.random.split(rng, 3)
        variables = resnet.init_variables(self.network, net_rng)
        params = {
            "generator": variables["params"],
            "library": init_tokens(lib_rng, (self.library_size, self.token_dim)),
        }
        return params, {"generator": variables["batch_stats"]}

    def __call__(self, params: dict, batch_stats: dict, images: jax.Array, *, train=False):
        """``(prompts (B, K, D), token_weights (B, K, N), new batch_stats or None)`` for
        normalized ``images``. ``train`` normalizes with the batch's statistics and returns the
        updated running ones; otherwise the running ones are used."""
        variables = {"params": params["generator"], "batch_stats": batch_stats["generator"]}
        if train:
            logits, updates = self.network.apply(
                variables, images, train=True, mutable=["batch_stats"]
            )
            new_stats = {"generator": updates["batch_stats"]}
        else:
            logits, new_stats = self.network.apply(variables, images, train=False), None
        logits = logits.reshape(images.shape[0], self.num_tokens, self.library_size)
        prompts, weights = mix_library(logits, params["library"])
        return prompts, weights, new_stats


@dataclasses.dataclass(frozen=True)
class PromptGenerationNetwork(Method):
    has_pictures = True
    has_token_weights = True

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
    def generator(self) -> PromptGenerator:
        return PromptGenerator(self.num_tokens, self.library_size, self.token_dim)

    def init(self, rng, backbone_params):
        head, head_frozen = self.init_head(jax.random.split(rng, 3)[2])
        params, batch_stats = self.generator.init(rng)
        trained = {"params": {**params, **head}, "batch_stats": batch_stats}
        return trained, {"backbone": backbone_params, **head_frozen}

    def prompts(self, trained, images, *, train: bool):
        """``(prompts (B, K, D), token_weights (B, K, N), new batch_stats or None)``."""
        return self.generator(trained["params"], trained["batch_stats"], images, train=train)

    def token_weights(self, trained, images):
        """``(B, K, N)``: how each image mixes the library rows into its K tokens, as
        ``aux["token_weights"]`` of ``apply(..., train=False)``, without running the backbone."""
        return self.prompts(trained, images, train=False)[1]

    def visualize(self, trained, frozen, images, *, rng=None):
        """How each image mixes the token library: its (K, N) softmax weights as a heat map,
        scaled so that each image's largest weight is white."""
        del frozen, rng
        weights = self.token_weights(trained, images)
        scaled = weights / weights.max(axis=(1, 2), keepdims=True)
        return {"library_usage_mask": scaled[..., None]}

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
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
            aux["mutable"] = {"batch_stats": new_stats}
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

    def apply(self, trained, frozen, images, *, rng=None, train=False, epoch=0):
        del rng, train, epoch
        params = trained["params"]
        prompts = jnp.broadcast_to(params["tokens"], (images.shape[0], *params["tokens"].shape))
        features, out = self.backbone.features(
            frozen["backbone"], images, prompt_tokens=prompts, prompt_position=PROMPT_POSITION
        )
        return self.head_logits(params, frozen, features), out


def count_pgn_params(params: dict) -> int:
    """Trainable PGN parameters (generator + library), as the paper counts them (no head)."""
    leaves = jax.tree.leaves({k: v for k, v in params.items() if k in ("generator", "library")})
    return sum(math.prod(leaf.shape) for leaf in leaves)
