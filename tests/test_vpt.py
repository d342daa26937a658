"""VPT: init bound and counts from the official code, where the tokens enter, deep overwriting,
prompt dropout, a frozen backbone in eval mode, gradients, projection, and a short training run."""

import functools
import math
import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jprompt import methods
from jprompt.methods import heads, vpt
from jprompt.models import vit, vit_checkpoint
from jprompt.models.backbone import Backbone
from jprompt.train import config_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
P = 4  # prompt tokens in the small tests (one P everywhere: shared shapes compile once)
# The method's logits against the head on the backbone called by hand: two compiled programs,
# whose float32 sums agree to a relative 1e-4.
LOGITS_TOL = dict(rtol=1e-4, atol=1e-5)


def make_backbone(name="vit_tiny4", image_size=32, **module_overrides):
    module = vit.create(name, num_classes=0, **module_overrides)
    return Backbone(name, module, image_size, "minus_one_to_one")


@functools.cache
def tiny(depth=2, dropout=0.0):
    """A small random ViT (built once per variant) and its parameters."""
    backbone = make_backbone(depth=depth, dropout_rate=dropout)
    init = jax.jit(backbone.module.init)  # compiled: faster than the eager random ops
    params = init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))["params"]
    return backbone, params


@functools.cache
def pretrained():
    """The shipped tiny ViT pretrained on jprompt_shapes (depth 2, width 64, patch 4): a trained
    (non-zero) CLS token and position embedding."""
    backbone = make_backbone()
    path = config_lib.DEMO_CHECKPOINTS[config_lib.DEMO_BACKBONE]
    return backbone, vit_checkpoint.load_pretrained(path, backbone.module, image_size=32)


def abstract_params(backbone):
    size = backbone.image_size
    return jax.eval_shape(
        backbone.module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))
    )["params"]


def images(batch=4, seed=3):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 32, 32, 3), minval=-1, maxval=1)


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def build(backbone, **options):
    return methods.build("vpt", backbone=backbone, num_classes=5, **options)


def init(method, backbone_params, seed=2):
    """``method.init``; the backbone tree only passes through it, so pass nothing in."""
    trained, frozen = method.init(jax.random.PRNGKey(seed), {})
    assert frozen == {"backbone": {}}
    return trained, {"backbone": backbone_params}


def recorded(fn):
    """``fn`` that also returns the input sequence of every encoder block (run eagerly: the
    tests share shapes, so JAX's per-operation cache makes that cheaper than compiling)."""

    def call(*args):
        with helpers.module_inputs(vit.Encoder1DBlock) as seen:
            result = fn(*args)
        return np.asarray(result), seen

    return call


# --- Numbers from the official code ------------------------------------------------------------


def test_init_bound_is_0_0625_for_vit_b16():
    assert vpt.init_bound(16, 768) == pytest.approx(0.0625, abs=1e-12)
    assert vpt.init_bound(16, 768) == pytest.approx(math.sqrt(6 / (3 * 16 * 16 + 768)))
    assert vpt.init_bound(32, 384) == pytest.approx(math.sqrt(6 / (3 * 32 * 32 + 384)))


@pytest.mark.parametrize("project_dim", [-1, 64])
def test_deep_tokens_are_uniform_in_the_symmetric_bound(project_dim):
    method = build(make_backbone("vit_b16", 224), num_tokens=10, deep=True, project_dim=project_dim)
    trained, _ = init(method, None, seed=0)
    tokens = np.asarray(trained["params"]["prompter"]["tokens"])
    width = 768 if project_dim == -1 else project_dim
    assert tokens.shape == (12, 10, width)
    bound = vpt.init_bound(16, width)  # the stored width, as the official code
    assert bound == (0.0625 if project_dim == -1 else pytest.approx(math.sqrt(6 / (768 + 64))))
    # Inside (-v, v), spread over all of it, symmetric around 0 (not [0, v)).
    assert np.abs(tokens).max() < bound
    assert tokens.max() > 0.99 * bound and tokens.min() < -0.99 * bound
    assert abs(tokens.mean()) < 0.02 * bound
    assert abs((tokens < 0).mean() - 0.5) < 0.02
    assert tokens.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    # Every layer's set drawn independently.
    assert not np.array_equal(tokens[0], tokens[1])


def test_parameter_counts_on_vit_b16():
    backbone = make_backbone("vit_b16", 224)
    backbone_params = abstract_params(backbone)
    d, big_d, layers, p, classes = 64, 768, 12, 10, 5
    expected = {
        (False, -1): p * big_d,  # 7,680
        (True, -1): layers * p * big_d,  # 92,160
        (False, d): p * d + d * big_d + big_d,  # 50,560
        (True, d): layers * p * d + d * big_d + big_d,  # 57,600
    }
    for (deep, project_dim), num in expected.items():
        method = build(backbone, num_tokens=p, deep=deep, project_dim=project_dim)
        trained, frozen = jax.eval_shape(method.init, jax.random.PRNGKey(0), backbone_params)
        assert count(trained["params"]["prompter"]) == num, (deep, project_dim)
        assert count(trained["params"]["head"]) == big_d * classes + classes
        assert set(trained) == {"params"} and set(trained["params"]) == {"prompter", "head"}
        assert set(frozen) == {"backbone"}
        assert jax.tree.structure(frozen["backbone"]) == jax.tree.structure(backbone_params)
    assert expected[(False, -1)] == 7_680 and expected[(True, -1)] == 92_160


def test_projection_and_head_init_as_the_official_code():
    method = build(make_backbone("vit_b16", 224), num_tokens=10, project_dim=64)
    trained, _ = init(method, None, seed=0)
    proj = trained["params"]["prompter"]["proj"]
    assert proj["kernel"].shape == (64, 768)
    # He-normal, fan_out = 768 (torch's kaiming_normal_(mode="fan_out") on the (768, 64) weight).
    assert float(proj["kernel"].std()) == pytest.approx(math.sqrt(2 / 768), rel=0.02)
    assert abs(float(proj["kernel"].mean())) < 1e-3
    # PyTorch's default Linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 64.
    assert float(jnp.abs(proj["bias"]).max()) < 1 / 8 and float(proj["bias"].min()) < -0.1
    head = trained["params"]["head"]
    np.testing.assert_allclose(head["bias"], -math.log(99), rtol=1e-6)


def test_bad_options_fail_clearly():
    backbone = make_backbone()
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        build(backbone, num_tokens=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        build(backbone, dropout=1.0)
    with pytest.raises(ValueError, match="project_dim must be -1"):
        build(backbone, project_dim=0)
    method = build(backbone, head_init="xavier")
    with pytest.raises(ValueError, match="unknown head init 'xavier'"):
        method.init(jax.random.PRNGKey(0), {})


# --- Where the tokens go -----------------------------------------------------------------------


def test_shallow_tokens_enter_after_cls_without_position_embedding():
    backbone, params = pretrained()
    assert np.abs(params["Transformer"]["posembed_input"]["pos_embedding"]).max() > 0.01
    method = build(backbone, num_tokens=P)
    trained, frozen = init(method, params)
    x = images()
    tokens = np.asarray(trained["params"]["prompter"]["tokens"])

    logits, seen = recorded(lambda t, f, x: method.apply(t, f, x, rng=None, train=False)[0])(
        trained, frozen, x
    )
    plain_features, plain = recorded(lambda p, x: backbone.features(p, x)[0])(params, x)
    first, plain_first = seen[0], plain[0]
    num_patches = (32 // 4) ** 2
    assert first.shape == (4, 1 + P + num_patches, 64)
    # Exactly the tokens, for every example: no position embedding added to them.
    np.testing.assert_array_equal(first[:, 1 : 1 + P], np.broadcast_to(tokens, (4, P, 64)))
    # CLS first, then the patches with their own position embeddings, unchanged.
    np.testing.assert_allclose(first[:, :1], plain_first[:, :1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first[:, 1 + P :], plain_first[:, 1:], rtol=1e-6, atol=1e-7)

    # The same as calling the backbone module by hand with prompt_tokens, then the head.
    pooled, _ = backbone.module.apply(
        {"params": params}, x, prompt_tokens=jnp.tile(tokens[None], (4, 1, 1))
    )
    expected = heads.apply_linear_head(trained["params"]["head"], pooled)
    np.testing.assert_allclose(logits, expected, **LOGITS_TOL)
    # And the prompt matters.
    unprompted = heads.apply_linear_head(trained["params"]["head"], plain_features)
    assert np.abs(logits - np.asarray(unprompted)).max() > 1e-3


def test_deep_tokens_overwrite_the_prompt_positions_before_each_layer():
    backbone, params = tiny(depth=4)
    method = build(backbone, num_tokens=P, deep=True)
    trained, frozen = init(method, params)
    tokens = trained["params"]["prompter"]["tokens"]
    assert tokens.shape == (4, P, 64)
    x = images()

    def apply(deep_tokens, frozen, x):
        changed = {"params": {**trained["params"], "prompter": {"tokens": deep_tokens}}}
        return method.apply(changed, frozen, x, rng=None, train=False)[0]

    run = recorded(apply)
    logits, seen = run(tokens, frozen, x)
    for layer in range(4):  # each layer sees its own set, whatever the layer before computed
        np.testing.assert_array_equal(
            seen[layer][:, 1 : 1 + P], np.broadcast_to(tokens[layer], (4, P, 64))
        )

    i = 2
    change = jax.random.normal(jax.random.PRNGKey(9), (P, 64))  # not a constant: LayerNorm
    new_logits, new_seen = run(tokens.at[i].add(change), frozen, x)
    for layer in range(i):  # layers before i: inputs bit-identical
        np.testing.assert_array_equal(new_seen[layer], seen[layer])
    # Layer i: only the prompt positions differ, and they hold the new tokens.
    np.testing.assert_array_equal(new_seen[i][:, :1], seen[i][:, :1])
    np.testing.assert_array_equal(new_seen[i][:, 1 + P :], seen[i][:, 1 + P :])
    np.testing.assert_allclose(
        new_seen[i][:, 1 : 1 + P], np.broadcast_to(tokens[i] + change, (4, P, 64)), rtol=1e-6
    )
    # After layer i everything downstream changes, the output included.
    assert np.abs(new_seen[i + 1][:, 1 + P :] - seen[i + 1][:, 1 + P :]).max() > 1e-4
    assert np.abs(new_logits - logits).max() > 1e-4

    # Deep: the same as the backbone module called by hand with deep_prompts.
    pooled, _ = backbone.module.apply(
        {"params": params}, x, deep_prompts=jnp.tile(tokens[:, None], (1, 4, 1, 1))
    )
    expected = heads.apply_linear_head(trained["params"]["head"], pooled)
    np.testing.assert_allclose(logits, expected, **LOGITS_TOL)


# --- Dropout: on the prompts only, only while training -----------------------------------------


def test_prompt_dropout_only_in_training_and_deterministic_per_rng():
    backbone, params = tiny()
    method = build(backbone, num_tokens=P, dropout=0.5)
    no_dropout = build(backbone, num_tokens=P)
    trained, frozen = init(method, params)
    x = images()
    k1, k2 = jax.random.PRNGKey(10), jax.random.PRNGKey(11)

    def logits(m, rng, train):
        return np.asarray(m.apply(trained, frozen, x, rng=rng, train=train)[0])

    reference = np.asarray(logits(no_dropout, None, False))
    np.testing.assert_array_equal(logits(method, None, False), reference)
    np.testing.assert_array_equal(logits(method, k1, False), reference)  # rng ignored at eval
    train_1 = np.asarray(logits(method, k1, True))
    np.testing.assert_array_equal(logits(method, k1, True), train_1)
    assert np.abs(np.asarray(logits(method, k2, True)) - train_1).max() > 1e-4
    assert np.abs(train_1 - reference).max() > 1e-4

    # What enters the backbone: each element dropped or scaled by 1 / (1 - rate), with an
    # independent mask per example.
    _, seen = recorded(lambda t, f, x, r: method.apply(t, f, x, rng=r, train=True)[0])(
        trained, frozen, x, k1
    )
    dropped = seen[0][:, 1 : 1 + P]
    tokens = np.broadcast_to(trained["params"]["prompter"]["tokens"], dropped.shape)
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], 2 * tokens[kept], rtol=1e-6)
    assert 0.4 < kept.mean() < 0.6
    assert not np.array_equal(kept[0], kept[1])
    with pytest.raises(ValueError, match="prompt dropout needs an rng"):
        method.apply(trained, frozen, x, rng=None, train=True)


def test_deep_prompt_dropout_differs_per_layer():
    method = build(make_backbone(), num_tokens=P, deep=True, dropout=0.5)
    prompter = {"tokens": jnp.ones((2, P, 64))}
    prompts = np.asarray(method.prompts(prompter, 4, rng=jax.random.PRNGKey(0), train=True))
    assert prompts.shape == (2, 4, P, 64)
    assert set(np.unique(prompts)) == {0.0, 2.0}
    assert not np.array_equal(prompts[0], prompts[1])
    assert not np.array_equal(prompts[0, 0], prompts[0, 1])
    evaluated = method.prompts(prompter, 4, rng=jax.random.PRNGKey(0), train=False)
    np.testing.assert_array_equal(evaluated, 1.0)


def test_backbone_dropout_stays_off_while_training():
    backbone, params = tiny(dropout=0.5)
    x = images()
    rng = jax.random.PRNGKey(7)

    def logits(method, trained, train):
        return np.asarray(method.apply(trained, {"backbone": params}, x, rng=rng, train=train)[0])

    # The backbone itself would drop out if asked to train: the check below can fail.
    trained_features, _ = backbone.features(params, x, rng=rng, train=True)
    eval_features, _ = backbone.features(params, x)
    assert np.abs(np.asarray(trained_features) - np.asarray(eval_features)).max() > 1e-3
    for deep in (False, True):
        method = build(backbone, num_tokens=P, deep=deep)
        trained, _ = init(method, params)
        np.testing.assert_array_equal(logits(method, trained, True), logits(method, trained, False))


# --- Gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("deep,project_dim", [(False, -1), (True, 16)])
def test_gradient_reaches_tokens_and_head_and_backbone_is_untouched(deep, project_dim):
    backbone, params = tiny()
    before = jax.tree.map(np.array, params)
    method = build(backbone, num_tokens=P, deep=deep, project_dim=project_dim, dropout=0.1)
    trained, frozen = method.init(jax.random.PRNGKey(2), params)
    assert frozen["backbone"] is params
    x, labels = images(), jnp.array([0, 1, 2, 3])
    rng = jax.random.PRNGKey(5)

    @jax.jit
    def loss(p):
        logits, _ = method.apply({"params": p}, frozen, x, rng=rng, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(trained["params"])
    assert np.isfinite(value)
    assert jax.tree.structure(grads) == jax.tree.structure(trained["params"])
    tokens_grad = np.asarray(grads["prompter"]["tokens"])
    if deep:  # every layer's set gets a gradient
        assert all(np.abs(tokens_grad[i]).max() > 0 for i in range(tokens_grad.shape[0]))
    assert np.abs(tokens_grad).max() > 0
    assert np.abs(np.asarray(grads["head"]["kernel"])).max() > 0
    if project_dim > 0:
        assert np.abs(np.asarray(grads["prompter"]["proj"]["kernel"])).max() > 0
        assert np.abs(np.asarray(grads["prompter"]["proj"]["bias"])).max() > 0
    # It is the right gradient: along the prompter's part of it, the loss changes at |g| per
    # unit step (the head held fixed).
    direction = {**grads, "head": jax.tree.map(jnp.zeros_like, grads["head"])}
    norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(direction)))
    eps = 1e-3

    def shifted(sign):
        return jax.tree.map(lambda p, g: p + sign * eps * g / norm, trained["params"], direction)

    slope = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * eps)
    assert slope == pytest.approx(norm, rel=0.05)
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen["backbone"]), before
    )


def test_projection_maps_stored_tokens_through_one_shared_linear():
    backbone, params = tiny()
    method = build(backbone, num_tokens=P, deep=True, project_dim=16)
    trained, frozen = init(method, params)
    prompter = trained["params"]["prompter"]
    assert prompter["tokens"].shape == (2, P, 16)
    x = images()
    logits, _ = method.apply(trained, frozen, x, rng=None, train=False)
    mapped = prompter["tokens"] @ prompter["proj"]["kernel"] + prompter["proj"]["bias"]
    pooled, _ = backbone.module.apply(
        {"params": params}, x, deep_prompts=jnp.tile(mapped[:, None], (1, 4, 1, 1))
    )
    expected = heads.apply_linear_head(trained["params"]["head"], pooled)
    np.testing.assert_allclose(logits, expected, **LOGITS_TOL)


# --- A few real training steps through the trainer ---------------------------------------------


def load_config(arg):
    return helpers.load_config("vpt.py", arg)


@pytest.fixture
def small_vpt_config(shapes_data_dir):
    """The demo config on a 256-example slice: 4 steps of 64 per epoch."""
    return lambda arg: helpers.shrink(load_config(arg), shapes_data_dir)


def test_recipe_of_the_full_config():
    config = load_config("")
    assert config.method.name == "vpt" and config.method.head_init == "vpt"
    assert config.backbone.name == "vit_b16"
    assert config.backbone.checkpoint == config_lib.ORIGINAL_IN21K + "ViT-B_16.npz"
    assert (config.batch_size, config.num_epochs) == (128, 100)
    assert config.optim.lr == pytest.approx(0.25 * 128 / 256)
    assert (config.optim.name, config.optim.momentum) == ("sgd", 0.9)
    assert config.optim.weight_decay == 1e-4
    assert config.optim.warmup_epochs == 10 and config.optim.schedule_unit == "epoch"
    assert config.method.dropout == 0.0 and not config.method.deep
    deep = load_config("deep,num_tokens=100")
    assert deep.method.deep and deep.method.dropout == 0.1 and deep.method.num_tokens == 100
    assert deep.batch_size == 64 and deep.optim.lr == pytest.approx(0.25 * 64 / 256)
    demo = load_config("demo,deep")
    assert (
        demo.backbone.checkpoint == config_lib.DEMO_CHECKPOINTS[config_lib.DEMO_BACKBONE]
        and demo.num_epochs == 5
    )
    assert demo.method.head_init == "zeros" and demo.method.dropout == 0.1


@pytest.mark.parametrize("arg", ["demo", "demo,deep"])
def test_training_steps_keep_the_backbone_bit_identical(small_vpt_config, arg):
    experiment = trainer.create_experiment(small_vpt_config(arg))
    trained_before, state = helpers.train_with_frozen_backbone(experiment, 3)
    after = jax.tree.map(np.asarray, state["trained"])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after, trained_before)
    assert all(jax.tree.leaves(moved))  # tokens, head kernel and bias all trained
    expected_tokens = (2, 10, 64) if "deep" in arg else (10, 64)
    assert after["params"]["prompter"]["tokens"].shape == expected_tokens
