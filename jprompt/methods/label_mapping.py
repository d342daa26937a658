"""Output label mappings: a frozen source head's logits (e.g. ImageNet's) read as the target task's.

A pixel prompt on a vision-only backbone can keep the checkpoint's own classifier and train no
head at all: each target class ``t`` is given ``m`` source classes ``index[t]`` (``m`` =
``per_class``, 1 in VP and ILM-VP) and its logit is the mean of their logits, as AutoVP's
``Output_Mapping`` computes it (``source_logits[:, index[t]]`` for ``m = 1``, ILM-VP's
``label_mapping_base``). The mappings, as the official codes choose ``index`` (``(T, m)`` ints):

- ``first_c``: target ``t`` -> source ``t`` (VP's ``main_vision.py``: ``output[:, range(C)]``);
  for ``m > 1`` the consecutive block ``t*m .. t*m + m - 1``, AutoVP's layout of its sequences.
- ``random``: the first ``T*m`` of a random permutation of the sources, ``m`` per target in order
  (ILM-VP's ``rlm_vp.py`` and AutoVP's ``self_definded_mapping``: ``torch.randperm(S)[:T*m]``).
  Drawn here with ``jax.random.permutation``, so the same seed gives another draw than torch.
- ``frequency``: run the prompted model over the training set, count (predicted source class,
  target label) pairs and assign greedily (``greedy_assignment``), once before training
  (ILM-VP's FLM; AutoVP's ``frequency_based_mapping``).
- ``iterative``: the same, recomputed before every epoch ``e`` with ``e % k == 0``
  (ILM-VP's ``ilm_vp.py --mapping-interval k``, default 1; AutoVP's ``freqmap_interval``):
  ``remaps_at``.
- ``semantic``: CLIP text similarity of source and target class names (AutoVP's
  ``Semantic_mapping``; ``semantic``), computed from the two embedding matrices.
- ``fully_connected``: a trainable ``Linear(S, T)`` on the source logits (AutoVP's
  ``fully_connected_layer_mapping``), PyTorch's default init (``init_fully_connected``).

The index mappings keep ``index`` in the frozen tree (``frozen["label_mapping"]["index"]``) beside
the source head (``frozen["source_head"]``), so ``remap`` swaps in a new mapping of the same shape
without recompiling the jitted steps; the fully connected one trains in
``trained["params"]["label_mapping"]``.

Differences from the official code, none of which changes an assignment on the same counts:
ILM-VP sizes its count matrix by the labels seen in the training set (``len(y.unique())``), here
by the dataset's number of classes; the frequency pass's batches and order do not matter.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jprompt.errors import InputError

MAPPINGS = ("first_c", "random", "frequency", "iterative", "semantic", "fully_connected")
# The mappings computed from the prompted model's predictions on the training set.
COUNTED = ("frequency", "iterative")


def first_c(num_source: int, num_target: int, per_class: int = 1) -> np.ndarray:
    """``(T, m)``: target ``t`` -> sources ``t*m .. t*m + m - 1`` (VP: ``t`` -> ``t``)."""
    _check_enough(num_source, num_target, per_class)
    return np.arange(num_target * per_class, dtype=np.int32).reshape(num_target, per_class)


def random(rng: jax.Array, num_source: int, num_target: int, per_class: int = 1) -> np.ndarray:
    """``(T, m)``: the first ``T*m`` sources of a random permutation, ``m`` per target in order."""
    _check_enough(num_source, num_target, per_class)
    order = np.asarray(jax.random.permutation(rng, num_source), np.int32)
    return order[: num_target * per_class].reshape(num_target, per_class)


def count_matrix(source_logits, labels, num_target: int, weights=None) -> jax.Array:
    """``(S, T)`` int32: how often examples of target label ``t`` are predicted as source ``s``.

    The prediction is the argmax of ``source_logits`` ``(N, S)``, the first maximum on ties (as
    ``torch.argmax``): ILM-VP's ``get_dist_matrix``. ``weights`` ``(N,)`` (1 or 0) leave out
    padding. Jittable, so a trainer can add up the counts of its batches on the device.
    """
    num_source = source_logits.shape[-1]
    predicted = jax.nn.one_hot(jnp.argmax(source_logits, axis=-1), num_source, dtype=jnp.int32)
    target = jax.nn.one_hot(labels, num_target, dtype=jnp.int32)
    if weights is not None:
        target = target * jnp.asarray(weights, jnp.int32)[:, None]
    return predicted.T @ target


def greedy_assignment(counts, per_class: int = 1) -> np.ndarray:
    """``(T, m)``: each target's ``m`` source classes, chosen greedily on the ``(S, T)`` counts.

    ILM-VP's ``predictive_distribution_based_multi_label_mapping``: ``T*m`` times, take the
    largest count left, the first in row-major (source, target) order on ties (``argmax`` of the
    flattened matrix); pair that source with that target; then no other target may take that
    source, and a target with ``m`` sources takes no more. AutoVP's ``Frequency_mapping_define``
    visits the counts in the same order and assigns the same pairs. A target's sources are listed
    in the order they were assigned.
    """
    counts = np.array(counts, np.int64)  # a copy: the rows and columns used are struck out
    num_source, num_target = counts.shape
    _check_enough(num_source, num_target, per_class)
    assigned: list[list[int]] = [[] for _ in range(num_target)]
    for _ in range(num_target * per_class):
        source, target = divmod(int(counts.argmax()), num_target)
        assigned[target].append(source)
        counts[source] = -1
        if len(assigned[target]) == per_class:
            counts[:, target] = -1
    return np.asarray(assigned, np.int32)


def semantic(source_embeddings, target_embeddings, per_class: int = 1) -> np.ndarray:
    """``(T, m)``: for each target, the most similar sources by cosine similarity.

    AutoVP's ``Semantic_mapping``: the embeddings are CLIP ViT-B/32 text features of the bare
    class names (no template; ImageNet's names as ``IMGNET_CLASSNAME`` spells them, the target's
    lower-cased with ``_`` and ``-`` as spaces); then ``m`` rounds, in each of which every target
    in turn takes its most similar source not yet taken. Equal similarities go to the lower
    source index (a stable sort; AutoVP's ``np.argsort`` leaves that order unspecified).
    """
    source = np.asarray(source_embeddings, np.float64)
    target = np.asarray(target_embeddings, np.float64)
    num_source, num_target = len(source), len(target)
    _check_enough(num_source, num_target, per_class)
    source = source / np.linalg.norm(source, axis=-1, keepdims=True)
    target = target / np.linalg.norm(target, axis=-1, keepdims=True)
    ranking = np.argsort(-(target @ source.T), axis=1, kind="stable")
    taken = np.zeros(num_source, bool)
    assigned: list[list[int]] = [[] for _ in range(num_target)]
    for _ in range(per_class):
        for t in range(num_target):
            source_index = int(ranking[t][np.argmax(~taken[ranking[t]])])
            taken[source_index] = True
            assigned[t].append(source_index)
    return np.asarray(assigned, np.int32)


def init_fully_connected(rng: jax.Array, num_source: int, num_target: int) -> dict:
    """``{"kernel": (S, T), "bias": (T,)}``, both uniform in ``±1/sqrt(S)``: PyTorch's default
    ``nn.Linear(S, T)`` init, which AutoVP keeps for vision-only models (its identity init is for
    CLIP's template logits only)."""
    bound = 1.0 / np.sqrt(num_source)
    kernel_rng, bias_rng = jax.random.split(rng)
    uniform = jax.random.uniform
    return {
        "kernel": uniform(kernel_rng, (num_source, num_target), jnp.float32, -bound, bound),
        "bias": uniform(bias_rng, (num_target,), jnp.float32, -bound, bound),
    }


def apply_index(source_logits: jax.Array, index: jax.Array) -> jax.Array:
    """``(B, T)``: each target's logit, the mean of its sources' logits ``(B, S)``."""
    return jnp.take(source_logits, index, axis=-1).mean(axis=-1)


def apply_fully_connected(params: dict, source_logits: jax.Array) -> jax.Array:
    return source_logits @ params["kernel"].astype(source_logits.dtype) + params["bias"]


def source_logits(frozen: dict, features: jax.Array) -> jax.Array:
    """``(B, S)``: the frozen source head on the pooled ``features`` (``aux["features"]``)."""
    head = frozen["source_head"]
    return features @ head["kernel"].astype(features.dtype) + head["bias"]


def mapped_logits(params: dict, frozen: dict, features: jax.Array) -> jax.Array:
    """``(B, T)``: the target logits a label-mapping head gives for ``features``."""
    source = source_logits(frozen, features)
    if "label_mapping" in params:
        return apply_fully_connected(params["label_mapping"], source)
    return apply_index(source, frozen["label_mapping"]["index"])


def remap(frozen: dict, index) -> dict:
    """``frozen`` with its mapping replaced by ``index``, of the same shape: jitted steps that
    take ``frozen`` as an argument run on without recompiling."""
    old = frozen["label_mapping"]["index"]
    if np.shape(index) != old.shape:
        raise ValueError(f"a new label mapping of shape {np.shape(index)}; expected {old.shape}")
    return {**frozen, "label_mapping": {"index": jnp.asarray(index, old.dtype)}}


@dataclasses.dataclass(frozen=True, eq=False)
class LabelMapping:
    """A method's label-mapping head, chosen when the method is built (``Method.label_mapping``).

    ``index``: the ``(T, m)`` mapping to start from; ``None`` for ``fully_connected``. The
    counted mappings start from ``first_c`` until the trainer's first count, before step 0,
    replaces it (``remaps_at(0)`` is true for both). ``interval``: ``iterative``'s ``k``.
    """

    name: str
    index: np.ndarray | None
    interval: int = 0

    def remaps_at(self, epoch: int) -> bool:
        """Whether the trainer recounts and ``remap``s before training epoch ``epoch``."""
        if self.name == "frequency":
            return epoch == 0
        return self.name == "iterative" and epoch % self.interval == 0

    def variables(self, rng: jax.Array, source_head: dict, num_classes: int) -> tuple[dict, dict]:
        """``(trainable, frozen)`` entries of the head, to merge into a method's trees."""
        num_source = source_head["kernel"].shape[-1]
        frozen = {"source_head": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), source_head)}
        if self.index is None:
            return {"label_mapping": init_fully_connected(rng, num_source, num_classes)}, frozen
        index = np.asarray(self.index)
        if index.ndim != 2 or len(index) != num_classes or index.min() < 0:
            raise ValueError(
                f"label mapping {self.name!r} has shape {index.shape}; expected ({num_classes}, m)"
            )
        if index.max() >= num_source:
            raise ValueError(
                f"label mapping {self.name!r} names source class {index.max()} but the source "
                f"head has {num_source}"
            )
        return {}, {**frozen, "label_mapping": {"index": jnp.asarray(index, jnp.int32)}}


def build(
    name: str,
    *,
    num_source: int,
    num_classes: int,
    per_class: int = 1,
    interval: int = 1,
    rng: jax.Array | None = None,
    source_embeddings=None,
    target_embeddings=None,
) -> LabelMapping:
    """The head ``name`` (one of ``MAPPINGS``) for a dataset of ``num_classes`` on a source head
    of ``num_source``. ``random`` needs ``rng``; ``semantic`` the two text-embedding matrices
    ``(S, E)`` and ``(T, E)``; ``iterative`` its ``interval`` in epochs."""
    if name not in MAPPINGS:
        raise InputError(f"unknown label mapping {name!r}; valid choices: {MAPPINGS}")
    if per_class < 1:
        raise InputError(f"head.sources_per_class={per_class}: it must be at least 1")
    if name == "iterative" and interval < 1:
        raise InputError(f"head.remap_every_epochs={interval}: it must be at least 1")
    if name == "fully_connected":
        return LabelMapping(name, None)
    if name == "random":
        if rng is None:
            raise ValueError("the random label mapping needs an rng")
        return LabelMapping(name, random(rng, num_source, num_classes, per_class))
    if name == "semantic":
        if source_embeddings is None or target_embeddings is None:
            raise ValueError("the semantic label mapping needs source and target embeddings")
        return LabelMapping(name, semantic(source_embeddings, target_embeddings, per_class))
    return LabelMapping(name, first_c(num_source, num_classes, per_class), interval)


def _check_enough(num_source: int, num_target: int, per_class: int) -> None:
    if num_target * per_class > num_source:
        raise InputError(
            f"a label mapping of {per_class} source class(es) to each of {num_target} target "
            f"classes needs {num_target * per_class} source classes; the source head has "
            f"{num_source}. Use fewer head.sources_per_class or head.name='linear'"
        )
