"""Methods' parameters and forward passes: counts from the papers' code, prompt placement, and
the surface for your own code (arrays given instead of drawn, no rng where nothing is random,
what each method declares to the trainer)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt import methods
from jprompt.methods import heads, vp
from jprompt.models import backbone, vit


def make_backbone(name="vit_tiny4", image_size=32, **options):
    return backbone.Backbone(name, vit.create(name, **options), image_size, "minus_one_to_one")


def init_backbone_params(backbone, rng):
    size = backbone.image_size
    return backbone.module.init(rng, jnp.zeros((1, size, size, 3)))["params"]


def abstract_backbone_params(backbone):
    return jax.eval_shape(functools.partial(init_backbone_params, backbone), jax.random.PRNGKey(0))


def random_backbone_params(backbone):
    """Random parameters of the backbone, initialised compiled (eager init is slow)."""
    return jax.jit(functools.partial(init_backbone_params, backbone))(jax.random.PRNGKey(1))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vp_padding_prompt_has_69840_parameters_at_224_and_30():
    # The count of the official VP code's PadPrompter(image_size=224, prompt_size=30).
    method = methods.build("vp", backbone=make_backbone("vit_b16", 224), num_classes=100)
    backbone_params = abstract_backbone_params(method.backbone)
    trained, frozen = jax.eval_shape(method.init, jax.random.PRNGKey(0), backbone_params)
    assert count(trained["params"]["prompter"]) == 69_840
    assert count(trained["params"]["head"]) == 768 * 100 + 100
    assert jax.tree.structure(frozen["backbone"]) == jax.tree.structure(backbone_params)


def test_padding_prompt_fills_only_the_border():
    params = vp.init_padding(jax.random.PRNGKey(0), image_size=32, prompt_size=4)
    frame = np.asarray(vp.padding_prompt(params))
    assert frame.shape == (32, 32, 3)
    np.testing.assert_array_equal(frame[4:28, 4:28], 0.0)
    np.testing.assert_array_equal(frame[:4], params["pad_up"])
    np.testing.assert_array_equal(frame[28:], params["pad_down"])
    np.testing.assert_array_equal(frame[4:28, :4], params["pad_left"])
    np.testing.assert_array_equal(frame[4:28, 28:], params["pad_right"])
    # N(0, 1) init.
    values = np.concatenate([np.ravel(v) for v in params.values()])
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1


def test_padding_prompt_that_does_not_fit_fails():
    with pytest.raises(ValueError, match="prompt_size 17 does not fit a 32px image"):
        vp.init_padding(jax.random.PRNGKey(0), image_size=32, prompt_size=17)


def test_padding_prompt_of_half_the_image_covers_it_all():
    # The official PadPrompter at prompt_size = image_size / 2: empty side strips, and
    # 2 * 3 * 112 * 224 = 150,528 parameters at 224 px (one of AdaViPro's headline sizes).
    method = methods.build(
        "vp", backbone=make_backbone("vit_b16", 224), num_classes=100, prompt_size=112
    )
    trained, _ = jax.eval_shape(
        method.init, jax.random.PRNGKey(0), abstract_backbone_params(method.backbone)
    )
    assert count(trained["params"]["prompter"]) == 150_528
    params = vp.init_padding(jax.random.PRNGKey(0), image_size=32, prompt_size=16)
    assert set(params) == {"pad_up", "pad_down"}  # the empty side strips are left out
    frame = np.asarray(vp.padding_prompt(params))
    np.testing.assert_array_equal(frame, np.concatenate([params["pad_up"], params["pad_down"]]))


def test_vp_adds_the_prompt_in_normalized_space_before_the_backbone():
    method = methods.build(
        "vp", backbone=make_backbone(), num_classes=5, prompt_size=4, head_init="vpt"
    )
    backbone_params = random_backbone_params(method.backbone)
    trained, frozen = method.init(jax.random.PRNGKey(2), backbone_params)
    images = jax.random.uniform(jax.random.PRNGKey(3), (2, 32, 32, 3), minval=-1, maxval=1)
    logits, _ = jax.jit(method.apply, static_argnames="train")(
        trained, frozen, images, rng=None, train=True
    )
    prompted = images + vp.padding_prompt(trained["params"]["prompter"])
    features, _ = jax.jit(method.backbone.features)(backbone_params, prompted)
    expected = heads.apply_linear_head(trained["params"]["head"], features)
    # The backbone embeds the prompt on its own: the same sum, rounded in another order, by
    # another compiled program: float32 agreement to a relative 1e-4.
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_linear_probe_gradient_reaches_only_the_head():
    method = methods.build("linear_probe", backbone=make_backbone(), num_classes=5)
    backbone_params = random_backbone_params(method.backbone)
    trained, frozen = method.init(jax.random.PRNGKey(2), backbone_params)
    assert set(trained["params"]) == {"head"}
    images = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))

    def loss(params):
        logits, _ = method.apply({"params": params}, frozen, images, rng=None, train=True)
        return jnp.sum(logits[:, 0])

    grads = jax.jit(jax.grad(loss))(trained["params"])
    features, _ = jax.jit(method.backbone.features)(backbone_params, images)
    # d(sum of logit 0)/d(kernel[:, 0]) = sum of features; other columns get nothing. The
    # gradient's program and the forward's round each feature differently, and the sum may
    # cancel: bound the difference by the summed magnitudes, at float32's relative 1e-4.
    difference = np.abs(grads["head"]["kernel"][:, 0] - features.sum(0))
    np.testing.assert_array_less(difference, 1e-4 * np.abs(features).sum(0))
    np.testing.assert_array_equal(grads["head"]["kernel"][:, 1:], 0.0)


def test_vpt_head_init_matches_the_official_code():
    params = heads.init_linear_head(jax.random.PRNGKey(0), 768, 100, "vpt")
    np.testing.assert_allclose(params["bias"], -np.log(99.0), rtol=1e-6)
    # He-normal with fan_out = num_classes.
    assert float(params["kernel"].std()) == pytest.approx(np.sqrt(2 / 100), rel=0.02)
    with pytest.raises(ValueError, match=r"valid choices: \('zeros', 'vpt'\)"):
        heads.init_linear_head(jax.random.PRNGKey(0), 8, 2, "xavier")


def test_method_from_given_arrays_draws_only_the_rest():
    method = methods.build("vpt", backbone=make_backbone(), num_classes=5, num_tokens=3)
    tokens = jnp.arange(3 * 64, dtype=jnp.float32).reshape(3, 64)
    trained, frozen = method.from_arrays(
        {}, {"prompter": {"tokens": tokens}}, rng=jax.random.key(0)
    )
    np.testing.assert_array_equal(trained["params"]["prompter"]["tokens"], tokens)
    drawn, _ = method.init(jax.random.key(0), {})
    np.testing.assert_array_equal(
        trained["params"]["head"]["bias"], drawn["params"]["head"]["bias"]
    )
    assert frozen == {"backbone": {}}

    # Without an rng every trainable array must be given; the rest fails naming it.
    with pytest.raises(ValueError, match=r"no rng= to draw the arrays not given: \['params/head"):
        method.from_arrays({}, {"prompter": {"tokens": tokens}})
    with pytest.raises(ValueError, match=r"'params/prompter/tokens' has shape \(2, 64\), expected"):
        method.from_arrays({}, {"prompter": {"tokens": tokens[:2]}}, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="'params/prompter/token' is not an array.*did you mean"):
        method.from_arrays({}, {"prompter": {"token": tokens}}, rng=jax.random.key(0))

    pixels = methods.build("vp", backbone=make_backbone(), num_classes=2, prompt_size=4)
    given = vp.init_padding(jax.random.key(1), 32, 4)
    head = {"kernel": jnp.ones((64, 2)), "bias": jnp.zeros(2)}
    trained, _ = pixels.from_arrays({}, {"prompter": given, "head": head})
    np.testing.assert_array_equal(trained["params"]["prompter"]["pad_left"], given["pad_left"])


def test_rng_is_needed_only_where_something_is_random():
    images = jnp.zeros((2, 32, 32, 3))
    vpt = methods.build("vpt", backbone=make_backbone(), num_classes=2, dropout=0.1)
    trained, frozen = vpt.init(jax.random.key(0), {})
    with pytest.raises(ValueError, match="prompt dropout needs an rng while training"):
        vpt.apply(trained, frozen, images, train=True)
    patch = methods.build(
        "vp", backbone=make_backbone(), num_classes=2, prompter="random_patch", prompt_size=4
    )
    trained, frozen = patch.init(jax.random.key(0), {})
    with pytest.raises(ValueError, match="random_patch prompter needs an rng, at evaluation"):
        patch.apply(trained, frozen, images)
    finetune = methods.build("finetune", backbone=make_backbone(dropout_rate=0.1), num_classes=2)
    trained, frozen = finetune.init(jax.random.key(0), {})
    with pytest.raises(ValueError, match=r"vit_tiny4's dropout \(rate 0.1\) needs an rng"):
        finetune.apply(trained, frozen, images, train=True)


def test_methods_declare_what_the_trainer_needs():
    declared = {}
    for name in methods.METHODS:
        options = {"cache_features": True} if name == "linear_probe" else {}
        if name == "evp":  # the official 30px frame does not fit the 32px test image
            options["prompt_size"] = 4
        if name == "zeroshot":
            options["zeroshot"] = heads.ZeroShotHead(np.eye(2, 64, dtype=np.float32), 4.6)
        method = methods.build(name, backbone=make_backbone(), num_classes=2, **options)
        declared[name] = (
            method.caches_features,
            method.has_pictures,
            method.has_token_weights,
            method.init_images,
        )
        if method.has_pictures:
            assert callable(method.visualize)
        if method.has_token_weights:
            assert callable(method.token_weights)
    assert declared == {
        "linear_probe": (True, False, False, None),
        "finetune": (False, False, False, None),
        "vp": (False, True, False, None),
        "pgn": (False, True, True, None),
        "prompt_tokens": (False, False, False, None),
        "adavipro": (False, True, False, None),
        "vpt": (False, False, False, None),
        "zeroshot": (False, False, False, None),
        "lor_vp": (False, True, False, None),
        "evp": (False, True, False, None),
        "vfpt": (False, False, False, None),
        "e2vpt": (False, False, False, None),
    }
    spt = methods.build("vpt", backbone=make_backbone(), num_classes=2, prompt_init="spt")
    assert spt.init_images == 0  # 0: as many images as the training split has
