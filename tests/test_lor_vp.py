"""LoR-VP: the official parameter count and init, the prompt B_c @ A_c added to the whole image in
[0, 1] pixel units before the normalisation, gradients, from_arrays, bad ranks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jprompt import methods
from jprompt.methods import heads
from jprompt.models import vit
from jprompt.models.backbone import Backbone

S = 8  # two 4px patches a side: the tiny ViT compiles in a moment
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def make_method(rank=1, image_size=S, normalization="minus_one_to_one", zeroshot=None):
    backbone = Backbone(
        "vit_tiny4", vit.create("vit_tiny4", num_classes=0), image_size, normalization
    )
    return methods.build(
        "lor_vp",
        backbone=backbone,
        num_classes=3,
        rank=rank,
        head_init="vpt",
        zeroshot=zeroshot,
    )


@functools.cache
def backbone_params():
    """The tiny ViT's parameters at S px (jitted: quicker than running its init op by op)."""
    module = vit.create("vit_tiny4", num_classes=0)
    return jax.jit(module.init)(jax.random.PRNGKey(1), jnp.zeros((1, S, S, 3)))["params"]


def test_parameter_count_and_init_at_the_official_defaults():
    # trainer/visual_prompt.py: left_bar (3, bar_height, bar_width) filled with 0, right_bar
    # (3, bar_width, bar_height) from N(0, 0.01^2) ('zero,normal'); image_classification_ddp.py:
    # bar_width 4, bar_height 224. 2 * 3 * 224 * 4 = 5,376.
    method = make_method(rank=4, image_size=224)
    trained, _ = method.init(jax.random.PRNGKey(0), {})
    prompter = trained["params"]["prompter"]
    assert sum(x.size for x in jax.tree.leaves(prompter)) == 5_376
    assert prompter["B"].shape == (3, 224, 4) and prompter["A"].shape == (3, 4, 224)
    assert not np.any(prompter["B"])
    assert abs(float(np.std(prompter["A"])) - 0.01) < 0.001
    assert abs(float(np.mean(prompter["A"]))) < 0.001


def rank_one(b, a):
    """Arrays with B_c = b[c] as a column and A_c = a[c] as a row: prompt_c = outer(b_c, a_c)."""
    return {"B": np.asarray(b, np.float32)[:, :, None], "A": np.asarray(a, np.float32)[:, None, :]}


def test_prompt_is_b_times_a_over_the_whole_image_in_unit_pixels():
    method = make_method()
    b = np.arange(3 * S, dtype=np.float32).reshape(3, S) / 10
    a = np.ones((3, S), np.float32)
    a[:, ::2] = -1  # columns alternate the sign of b
    trained, frozen = method.from_arrays(
        {}, {"prompter": rank_one(b, a)}, rng=jax.random.PRNGKey(0)
    )
    prompted = method.visualize(trained, frozen, np.zeros((1, S, S, 3), np.float32))["prompted"]
    for c in range(3):
        for h, w in ((0, 0), (0, 1), (5, 2), (7, 7)):
            # [-1, 1] pixels are x / 127.5 - 1: a change of d in [0, 1] units is 2 d.
            assert prompted[0, h, w, c] == pytest.approx(2 * b[c, h] * (-1 if w % 2 == 0 else 1))


def test_backbone_sees_the_normalised_sum_of_image_and_prompt():
    # forward(): x + program, then normalize; here CLIP's mean and std.
    method = make_method(rank=2, normalization="clip")
    rng_b, rng_a, rng_x = jax.random.split(jax.random.PRNGKey(3), 3)
    b = np.asarray(jax.random.uniform(rng_b, (3, S, 2), minval=-0.2, maxval=0.2))
    a = np.asarray(jax.random.uniform(rng_a, (3, 2, S), minval=-1, maxval=1))
    params = backbone_params()
    trained, frozen = method.from_arrays(
        params, {"prompter": {"B": b, "A": a}}, rng=jax.random.PRNGKey(0)
    )
    unit = np.asarray(jax.random.uniform(rng_x, (2, S, S, 3)))  # pixels in [0, 1]
    program = np.stack([b[c] @ a[c] for c in range(3)], axis=-1)
    logits, _ = jax.jit(method.apply)(trained, frozen, (unit - CLIP_MEAN) / CLIP_STD)
    features = jax.jit(lambda x: method.backbone.features(params, x)[0])(
        (unit + program - CLIP_MEAN) / CLIP_STD
    )
    expected = heads.apply_linear_head(trained["params"]["head"], features)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_prompt_and_head_only():
    method = make_method(rank=2)
    params = backbone_params()
    trained, frozen = method.init(jax.random.PRNGKey(0), params)
    images = jax.random.uniform(jax.random.PRNGKey(4), (2, S, S, 3), minval=-1, maxval=1)
    labels = jnp.array([0, 2])

    def loss(trainable):
        logits, _ = method.apply({"params": trainable}, frozen, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(loss))(trained["params"])
    assert set(grads) == {"prompter", "head"} and set(grads["prompter"]) == {"A", "B"}
    # With B = 0 at the start only B moves: dL/dA = B^T (...) = 0, dL/dB = (...) A^T != 0.
    assert not np.any(grads["prompter"]["A"])
    assert np.all(np.abs(grads["prompter"]["B"]).sum(axis=(1, 2)) > 0)
    assert np.any(grads["head"]["kernel"])

    # With a frozen zero-shot head the prompt is all that trains.
    embeddings = np.eye(3, method.backbone.feature_dim, dtype=np.float32)
    zeroshot = make_method(rank=2, zeroshot=heads.ZeroShotHead(embeddings, 4.6))
    trained, frozen = zeroshot.init(jax.random.PRNGKey(0), params)
    assert set(trained["params"]) == {"prompter"} and "zeroshot_head" in frozen


def test_from_arrays_round_trip():
    method = make_method(rank=2)
    trained, _ = method.init(jax.random.PRNGKey(0), {})
    given = jax.tree.map(lambda x: np.asarray(x) + 1.5, trained["params"])
    restored, _ = method.from_arrays({}, given)
    jax.tree.map(np.testing.assert_array_equal, restored["params"], given)
    with pytest.raises(ValueError, match=r"'params/prompter/A' has shape \(3, 4, 8\), expected"):
        method.from_arrays({}, {"prompter": {"A": np.zeros((3, 4, S))}}, rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("rank", [0, -1, S + 1])
def test_a_rank_that_does_not_fit_fails_in_one_line(rank):
    with pytest.raises(ValueError, match=rf"^lor_vp: rank {rank} does not fit the 8px image; "):
        make_method(rank=rank)
