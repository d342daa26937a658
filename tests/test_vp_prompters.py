"""VP patch prompters: the fixed patch at the top-left corner, the random patch's location (one per
forward pass, for the whole batch, from the rng, at evaluation too), and training through them."""

import pathlib

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt import methods
from jprompt.methods import heads, vp
from jprompt.models import vit
from jprompt.models.backbone import Backbone
from jprompt.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
S, P = 32, 4


def make_method(prompter, prompt_size=P, image_size=S, name="vit_tiny4"):
    module = vit.create(name, num_classes=0)
    backbone = Backbone(name, module, image_size, "minus_one_to_one")
    return methods.build(
        "vp",
        backbone=backbone,
        num_classes=5,
        prompter=prompter,
        prompt_size=prompt_size,
        head_init="vpt",
    )


def setup(prompter):
    method = make_method(prompter)
    backbone_params = method.backbone.module.init(jax.random.PRNGKey(1), jnp.zeros((1, S, S, 3)))[
        "params"
    ]
    trained, frozen = method.init(jax.random.PRNGKey(2), backbone_params)
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, S, S, 3), minval=-1, maxval=1)
    return method, trained, frozen, x


def backbone_input(method, trained, frozen, x, rng, train=False):
    """The prompted images the backbone computes on (the images it receives plus the pixel
    prompt it is given), and the method's logits."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, vit.VisionTransformer) and context.method_name == "__call__":
            seen.append(np.asarray(args[0]) + np.asarray(kwargs["pixel_prompt"]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        logits, _ = method.apply(trained, frozen, x, rng=rng, train=train)
    (prompted,) = seen
    return prompted, np.asarray(logits)


def patch_location(delta):
    """The (row, col) of the only non-zero p x p block of one ``(S, S, 3)`` delta."""
    rows, cols = np.nonzero(np.abs(delta).sum(-1) > 0)
    assert rows.max() - rows.min() == P - 1 and cols.max() - cols.min() == P - 1
    return int(rows.min()), int(cols.min())


def test_parameter_counts_at_224_and_30():
    for prompter, expected in (
        ("padding", 69_840),
        ("fixed_patch", 2_700),
        ("random_patch", 2_700),
    ):
        method = make_method(prompter, prompt_size=30, image_size=224, name="vit_b16")
        abstract = jax.eval_shape(
            method.backbone.module.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))
        )["params"]
        trained, _ = jax.eval_shape(method.init, jax.random.PRNGKey(0), abstract)
        prompter_params = trained["params"]["prompter"]
        assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(prompter_params)) == expected
        if prompter != "padding":
            assert prompter_params["patch"].shape == (30, 30, 3)


def test_unknown_prompter_and_misfit_fail_listing_choices():
    with pytest.raises(
        ValueError,
        match=r"unknown prompter 'corner'; valid choices: \('padding', 'fixed_patch', "
        r"'random_patch'\)",
    ):
        make_method("corner")
    with pytest.raises(ValueError, match="prompt_size 32 does not fit a 32px image"):
        vp.init_patch(jax.random.PRNGKey(0), image_size=32, prompt_size=32)


def test_fixed_patch_is_added_at_the_top_left_only():
    method, trained, frozen, x = setup("fixed_patch")
    patch = np.asarray(trained["params"]["prompter"]["patch"])
    assert patch.shape == (P, P, 3)
    assert abs(patch.mean()) < 0.5 and 0.6 < patch.std() < 1.4  # N(0, 1)
    prompted, logits = backbone_input(method, trained, frozen, x, rng=None)
    delta = prompted - np.asarray(x)
    for i in range(4):
        np.testing.assert_allclose(delta[i, :P, :P], patch, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(delta[i, P:], 0.0)
        np.testing.assert_array_equal(delta[i, :, P:], 0.0)
    # The rng and the mode do not move it.
    _, again = backbone_input(method, trained, frozen, x, rng=jax.random.PRNGKey(4), train=True)
    np.testing.assert_array_equal(again, logits)
    # Logits: the head on the backbone's features of the prompted images.
    features, _ = method.backbone.features(frozen["backbone"], jnp.asarray(prompted))
    expected = heads.apply_linear_head(trained["params"]["head"], features)
    # (the backbone embeds the prompt on its own: the same sum, rounded in another order, by
    # another compiled program: float32 agreement to a relative 1e-4)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_random_patch_location_is_uniform_over_the_valid_range():
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    locations = np.asarray(jax.vmap(lambda k: vp.random_location(k, S, P))(keys))
    # Every row and column in [0, S - p) occurs, nothing outside.
    assert set(locations[:, 0]) == set(range(S - P))
    assert set(locations[:, 1]) == set(range(S - P))
    counts = np.bincount(locations[:, 0], minlength=S - P)
    assert counts.min() > 0.4 * 2000 / (S - P)
    assert not np.array_equal(locations[:, 0], locations[:, 1])  # row and column independent


def test_random_patch_one_location_per_pass_for_the_whole_batch():
    method, trained, frozen, x = setup("random_patch")
    patch = np.asarray(trained["params"]["prompter"]["patch"])
    found = set()
    for seed in range(6):
        rng = jax.random.PRNGKey(100 + seed)
        prompted, logits = backbone_input(method, trained, frozen, x, rng=rng, train=True)
        delta = prompted - np.asarray(x)
        row, col = patch_location(delta[0])
        assert (row, col) == tuple(int(v) for v in vp.random_location(rng, S, P))
        assert 0 <= row < S - P and 0 <= col < S - P
        for i in range(4):  # the same place for every image of the batch
            np.testing.assert_allclose(
                delta[i, row : row + P, col : col + P], patch, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(delta[i].sum(), patch.sum(), rtol=1e-3, atol=1e-3)
        # Deterministic for one rng.
        _, again = backbone_input(method, trained, frozen, x, rng=rng, train=True)
        np.testing.assert_array_equal(again, logits)
        found.add((row, col))
    assert len(found) >= 5  # different rngs, different places


def test_random_patch_is_random_at_evaluation_too():
    method, trained, frozen, x = setup("random_patch")
    k1, k2 = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    assert not np.array_equal(vp.random_location(k1, S, P), vp.random_location(k2, S, P))
    eval_1, logits_1 = backbone_input(method, trained, frozen, x, rng=k1, train=False)
    eval_2, logits_2 = backbone_input(method, trained, frozen, x, rng=k2, train=False)
    assert patch_location(eval_1[0] - x[0]) != patch_location(eval_2[0] - x[0])
    assert np.abs(logits_1 - logits_2).max() > 1e-5
    # The mode does not change the draw: the same rng gives the same place in training.
    train_1, _ = backbone_input(method, trained, frozen, x, rng=k1, train=True)
    np.testing.assert_array_equal(train_1, eval_1)
    with pytest.raises(ValueError, match="random_patch prompter needs an rng"):
        method.apply(trained, frozen, x, rng=None, train=False)


def test_random_patch_under_jit_and_gradient():
    method, trained, frozen, x = setup("random_patch")

    def loss(params, rng):
        logits, _ = method.apply({"params": params}, frozen, x, rng=rng, train=True)
        return jnp.sum(logits[:, 0])

    grads = jax.jit(jax.grad(loss))(trained["params"], jax.random.PRNGKey(3))
    assert np.abs(np.asarray(grads["prompter"]["patch"])).max() > 0
    assert np.abs(np.asarray(grads["head"]["kernel"])).max() > 0


def load_vp_config(arg):
    return helpers.load_config("vp.py", arg)


def test_config_prompter_arg():
    assert load_vp_config("").method.prompter == "padding"
    assert load_vp_config("demo,prompter=random_patch").method.prompter == "random_patch"
    with pytest.raises(ValueError, match="unknown prompter"):
        load_vp_config("prompter=corner")


@pytest.mark.parametrize("prompter", ["fixed_patch", "random_patch"])
def test_training_steps_keep_the_backbone_bit_identical(shapes_data_dir, prompter):
    config = helpers.shrink(
        load_vp_config(f"demo,backbone=vit_b16,prompter={prompter}"), shapes_data_dir
    )
    experiment = trainer.create_experiment(config)
    trained_before, state = helpers.train_with_frozen_backbone(experiment, 3)
    after = jax.tree.map(np.asarray, state["trained"])
    assert after["params"]["prompter"]["patch"].shape == (4, 4, 3)
    assert not np.array_equal(
        after["params"]["prompter"]["patch"], trained_before["params"]["prompter"]["patch"]
    )
    # Evaluation runs (and draws a location per batch from the eval rng).
    result = experiment.evaluate(state["trained"], config.dataset.test_split)
    assert result["num_examples"] == 64 and 0.0 <= result["accuracy"] <= 1.0
