"""EVP: the official parameter count, the image shrunk and padded with black under a frame added in
[0, 1] pixel units, the unit-norm gradient over the whole canvas, from_arrays, bad sizes."""

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

S, P = 8, 2  # the image shrinks to 4 x 4 inside a 2px frame
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def make_method(prompt_size=P, image_size=S, normalization="minus_one_to_one", **options):
    module = vit.create("vit_tiny4", num_classes=0)
    backbone = Backbone("vit_tiny4", module, image_size, normalization)
    return methods.build(
        "evp",
        backbone=backbone,
        num_classes=3,
        prompt_size=prompt_size,
        head_init="vpt",
        **options,
    )


@functools.cache
def backbone_params():
    """The tiny ViT's parameters at S px (jitted: quicker than running its init op by op)."""
    module = vit.create("vit_tiny4", num_classes=0)
    return jax.jit(module.init)(jax.random.PRNGKey(1), jnp.zeros((1, S, S, 3)))["params"]


def frame(up, down, left, right):
    """Strips of constant values (in [0, 1] pixel units)."""
    inner = S - 2 * P
    return {
        "pad_up": np.full((P, S, 3), up, np.float32),
        "pad_down": np.full((P, S, 3), down, np.float32),
        "pad_left": np.full((inner, P, 3), left, np.float32),
        "pad_right": np.full((inner, P, 3), right, np.float32),
    }


def test_parameter_count_at_the_official_defaults():
    # main.py: Pertubation's mask is 1 on (3, 224, 224) except [pad, 224 - pad)^2 with
    # prompt_size 30 (the image shrunk to image_size 164 = 224 - 2 * 30): only the frame trains,
    # 3 * (224^2 - 164^2) = 69,840 values, all zero at the start.
    method = make_method(prompt_size=30, image_size=224)
    trained, _ = jax.eval_shape(method.init, jax.random.PRNGKey(0), {})
    prompter = trained["params"]["prompter"]
    assert sum(x.size for x in jax.tree.leaves(prompter)) == 69_840 == 3 * (224**2 - 164**2)
    trained, _ = make_method().init(jax.random.PRNGKey(0), {})
    assert not any(np.any(x) for x in jax.tree.leaves(trained["params"]["prompter"]))


def framed(inside):
    """The expected input in [0, 1] units: ``frame(0.25, 0.75, 0.5, 1.0)`` on black, ``inside``
    in the middle."""
    expected = np.zeros((S, S, 3), np.float32)
    expected[:P], expected[-P:] = 0.25, 0.75
    expected[P:-P, :P], expected[P:-P, -P:] = 0.5, 1.0
    expected[P:-P, P:-P] = inside
    return expected


def test_image_is_shrunk_and_padded_with_black_under_the_frame():
    given = {"prompter": frame(0.25, 0.75, 0.5, 1.0)}
    for normalization, mean, std in (
        ("minus_one_to_one", 0.5, 0.5),  # x / 127.5 - 1
        ("clip", CLIP_MEAN, CLIP_STD),
    ):
        method = make_method(normalization=normalization)
        trained, frozen = method.from_arrays({}, given, rng=jax.random.PRNGKey(0))
        for level in (1.0, 0.5):  # a white and a grey image, shrunk to a 4 x 4 one
            images = np.full((1, S, S, 3), (level - mean) / std, np.float32)
            prompted = method.visualize(trained, frozen, images)["prompted"][0]
            expected = (framed(level) - mean) / std
            np.testing.assert_allclose(prompted, expected, rtol=1e-5, atol=1e-5)


def test_the_frame_gets_its_part_of_the_unit_norm_gradient_of_the_whole_canvas():
    # main.py: g = grad over the 224 x 224 canvas; update = lr * mask * g / (||g|| + 1e-10).
    images = jax.random.uniform(jax.random.PRNGKey(4), (2, S, S, 3), minval=-1, maxval=1)
    labels = jnp.array([0, 2])
    params = backbone_params()
    normalized, plain = (make_method(normalize_gradient=n) for n in (True, False))
    trained, frozen = normalized.init(jax.random.PRNGKey(0), params)
    head = trained["params"]["head"]

    def loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def canvas_loss(canvas):  # the whole canvas in [0, 1] units, on the shrunk images
        features, _ = normalized.backbone.features(params, normalized.shrink(images) + 2 * canvas)
        return loss(heads.apply_linear_head(head, features))

    def method_loss(trainable, method):
        return loss(method.apply({"params": trainable}, frozen, images)[0])

    expected_loss, g = jax.jit(jax.value_and_grad(canvas_loss))(jnp.zeros((S, S, 3)))
    g = np.asarray(g)
    assert np.abs(g[P:-P, P:-P]).sum() > 0  # the inner part counts in the norm
    for method, want in ((normalized, g / np.linalg.norm(g)), (plain, g)):
        step = jax.jit(jax.value_and_grad(method_loss), static_argnums=1)
        got_loss, grads = step(trained["params"], method)
        assert float(got_loss) == pytest.approx(float(expected_loss), rel=1e-5)
        assert set(grads) == {"prompter", "head"} and np.any(grads["head"]["kernel"])
        got = grads["prompter"]
        np.testing.assert_allclose(got["pad_up"], want[:P], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got["pad_down"], want[-P:], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got["pad_left"], want[P:-P, :P], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got["pad_right"], want[P:-P, -P:], rtol=1e-4, atol=1e-7)


def test_from_arrays_round_trip():
    method = make_method()
    given = {"prompter": frame(0.1, 0.2, 0.3, 0.4)}
    trained, _ = method.from_arrays({}, given, rng=jax.random.PRNGKey(0))
    restored, _ = method.from_arrays({}, jax.tree.map(np.asarray, trained["params"]))
    jax.tree.map(np.testing.assert_array_equal, restored["params"]["prompter"], given["prompter"])
    with pytest.raises(
        ValueError, match=r"'params/prompter/pad_up' has shape \(8, 8, 3\), expected"
    ):
        method.from_arrays(
            {}, {"prompter": {"pad_up": np.zeros((S, S, 3))}}, rng=jax.random.PRNGKey(0)
        )


@pytest.mark.parametrize("prompt_size", [0, -1, S // 2])
def test_a_frame_that_leaves_no_image_fails_in_one_line(prompt_size):
    with pytest.raises(ValueError, match=rf"^evp: prompt_size {prompt_size} does not fit the 8px"):
        make_method(prompt_size=prompt_size)
