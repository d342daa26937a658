"""AdaViPro: parameter counts, the fixed edge detector, region masks, x + P * M, training."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt import methods
from jprompt.methods import adavipro, gumbel, heads, vp
from jprompt.models import vit, vit_checkpoint
from jprompt.models.backbone import Backbone
from jprompt.train import config_lib, optim, sharding, trainer

# The counts documented in jprompt/methods/adavipro.py (224 px, prompt_size 30, region 32).
VP_TEMPLATE = 69_840
PROMPTER_EMBED_64 = 135_570  # the paper: "about 0.13M"
PROMPTER_EMBED_8 = 78_058


def make_backbone(name="vit_tiny4", image_size=32):
    return Backbone(name, vit.create(name), image_size, "minus_one_to_one")


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(method):
    size = method.backbone.image_size
    backbone_params = jax.eval_shape(
        method.backbone.module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))
    )["params"]
    return jax.eval_shape(method.init, jax.random.PRNGKey(0), backbone_params)


@pytest.fixture(scope="module")
def small():
    """The 32px demo ViT with 4x4 regions of 8px and a 4px frame."""
    method = methods.build(
        "adavipro",
        backbone=make_backbone(),
        num_classes=5,
        prompt_size=4,
        region_size=8,
        kernel_size=8,
        head_init="vpt",
    )
    # The shipped demo backbone: real pretrained weights, loaded without any compilation.
    backbone_params = vit_checkpoint.load_pretrained(
        config_lib.DEMO_CHECKPOINTS[config_lib.DEMO_BACKBONE], method.backbone.module, image_size=32
    )
    trained, frozen = jax.jit(method.init)(jax.random.PRNGKey(2), backbone_params)
    images = jax.random.uniform(jax.random.PRNGKey(3), (6, 32, 32, 3), minval=-1, maxval=1)
    return method, trained, frozen, images


def test_parameter_counts_at_224_match_the_documented_numbers():
    backbone = make_backbone("vit_b16", 224)
    method = methods.build("adavipro", backbone=backbone, num_classes=100)
    trained, frozen = abstract_init(method)
    params = trained["params"]
    assert count(params["prompter"]["template"]) == VP_TEMPLATE
    generator = params["prompter"]["mask_generator"]
    assert generator["convergence"]["kernel"].shape == (32, 32, 1, 64)
    assert generator["policy"]["kernel"].shape == (1, 1, 64, 2)
    assert count(generator) == 65_730
    assert count(params["prompter"]) == PROMPTER_EMBED_64
    assert abs(count(params["prompter"]) - 130_000) < 0.05 * 130_000
    assert count(params["head"]) == 768 * 100 + 100
    assert "backbone" in frozen and "backbone" not in params

    narrow = methods.build("adavipro", backbone=backbone, num_classes=100, embed_dim=8)
    assert count(abstract_init(narrow)[0]["params"]["prompter"]) == PROMPTER_EMBED_8
    rgb = methods.build("adavipro", backbone=backbone, num_classes=100, edge_input="rgb")
    assert count(abstract_init(rgb)[0]["params"]["prompter"]) == VP_TEMPLATE + 196_672 + 130
    # prompt_size 112: the template covers the whole 224 px image, as VP's PadPrompter allows.
    whole = methods.build("adavipro", backbone=backbone, num_classes=100, prompt_size=112)
    assert count(abstract_init(whole)[0]["params"]["prompter"]["template"]) == 150_528


def test_shapes_at_224_with_seven_by_seven_regions():
    method = methods.build("adavipro", backbone=make_backbone("vit_b16", 224), num_classes=10)
    trained, frozen = abstract_init(method)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    for is_training in (True, False):
        logits, aux = jax.eval_shape(
            lambda t, f, x, train=is_training: method.apply(
                t, f, x, rng=jax.random.PRNGKey(0), train=train, epoch=3
            ),
            trained,
            frozen,
            images,
        )
        assert logits.shape == (2, 10)
        assert aux["region_masks"].shape == (2, 7, 7)
        assert aux["mask_logits"].shape == (2, 7, 7, 2)
    # Other regions and kernels keep one decision per region.
    for region, kernel in ((16, 16), (32, 48), (32, 8)):
        other = methods.build(
            "adavipro",
            backbone=make_backbone("vit_b16", 224),
            num_classes=10,
            region_size=region,
            kernel_size=kernel,
            policy_kernel_size=3,
        )
        trained, _ = abstract_init(other)
        logits = jax.eval_shape(
            other.mask_logits, trained["params"]["prompter"]["mask_generator"], images
        )
        assert logits.shape == (2, 224 // region, 224 // region, 2)


def test_laplacian_is_the_fixed_kernel_and_not_trained(small):
    method, trained, _, images = small
    np.testing.assert_array_equal(adavipro.LAPLACIAN, [[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    generator = trained["params"]["prompter"]["mask_generator"]
    assert set(generator) == {"convergence", "policy"}
    assert all(set(layer) == {"kernel", "bias"} for layer in generator.values())
    assert set(trained["params"]["prompter"]) == {"template", "mask_generator"}
    assert not any(leaf.shape[:2] == (3, 3) for leaf in jax.tree.leaves(trained))

    # By hand: 4-neighbour sum minus 4x the centre, zero padding 1.
    def laplacian(x):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return (
            padded[:, :-2, 1:-1]
            + padded[:, 2:, 1:-1]
            + padded[:, 1:-1, :-2]
            + padded[:, 1:-1, 2:]
            - 4 * padded[:, 1:-1, 1:-1]
        )

    x = np.asarray(images)
    gray = adavipro.laplacian_edges(images, "gray")
    np.testing.assert_allclose(gray, laplacian(x.mean(-1, keepdims=True)), atol=1e-5)
    rgb = adavipro.laplacian_edges(images, "rgb")
    np.testing.assert_allclose(rgb, laplacian(x), atol=1e-5)
    # A constant image has no edges inside (only the zero padding makes a border).
    flat = np.asarray(adavipro.laplacian_edges(jnp.full((1, 8, 8, 3), 0.5), "gray"))
    np.testing.assert_array_equal(flat[0, 1:-1, 1:-1], 0.0)
    np.testing.assert_allclose(flat[0, 0, 0], -1.0)  # corner: 2 neighbours of 0.5 - 4 * 0.5
    with pytest.raises(ValueError, match=r"valid choices: \('gray', 'rgb'\)"):
        methods.build("adavipro", backbone=None, num_classes=2, edge_input="hsv")


def test_mask_logits_by_hand(small):
    # Kernel = stride = region: each region's logits come from its own 8x8 edge patch.
    method, trained, _, images = small
    generator = jax.tree.map(np.asarray, trained["params"]["prompter"]["mask_generator"])
    edges = np.asarray(adavipro.laplacian_edges(images, "gray"))  # (B, 32, 32, 1)
    patches = edges.reshape(6, 4, 8, 4, 8, 1).transpose(0, 1, 3, 2, 4, 5).reshape(6, 4, 4, 64)
    conv = generator["convergence"]
    hidden = np.maximum(patches @ conv["kernel"].reshape(64, 64) + conv["bias"], 0)
    policy = generator["policy"]
    expected = hidden @ policy["kernel"].reshape(64, 2) + policy["bias"]
    got = method.mask_logits(trained["params"]["prompter"]["mask_generator"], images)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_evaluation_masks_are_binary_per_region_and_prompt_is_x_plus_p_times_m(small):
    method, trained, _, images = small
    prompter = trained["params"]["prompter"]
    prompted, info = method.prompt(prompter, images, rng=None, train=False)
    masks = np.asarray(info["region_masks"])
    assert masks.shape == (6, 4, 4)
    assert set(np.unique(masks)) == {0.0, 1.0}  # exactly binary, and both occur here
    logits = np.asarray(info["mask_logits"])
    np.testing.assert_array_equal(masks, (logits[..., 1] > logits[..., 0]).astype(np.float32))

    pixel = np.asarray(adavipro.upsample_regions(info["region_masks"], 8))
    assert pixel.shape == (6, 32, 32)
    blocks = pixel.reshape(6, 4, 8, 4, 8)
    np.testing.assert_array_equal(blocks, np.broadcast_to(masks[:, :, None, :, None], blocks.shape))

    template = np.asarray(vp.padding_prompt(prompter["template"]))
    by_hand_mask = np.kron(masks, np.ones((8, 8), np.float32))  # nearest upsampling
    expected = np.asarray(images) + template[None] * by_hand_mask[..., None]
    np.testing.assert_allclose(prompted, expected, rtol=1e-6, atol=1e-6)
    off = by_hand_mask == 0
    np.testing.assert_array_equal(np.asarray(prompted)[off], np.asarray(images)[off])
    # Somewhere the prompt really is applied (on the frame of an "apply" region).
    assert np.abs(np.asarray(prompted) - np.asarray(images)).max() > 0.1

    # Evaluation ignores rng and epoch.
    again, _ = method.prompt(prompter, images, rng=jax.random.PRNGKey(5), train=False, epoch=7)
    np.testing.assert_array_equal(again, prompted)


def test_logits_are_the_head_on_the_backbone_of_the_prompted_image(small):
    method, trained, frozen, images = small
    params = trained["params"]
    evaluate = jax.jit(lambda t, x: method.apply(t, frozen, x, rng=None, train=False))
    head_on_backbone = jax.jit(
        lambda x: heads.apply_linear_head(
            params["head"], method.backbone.features(frozen["backbone"], x)[0]
        )
    )
    logits, aux = evaluate(trained, images)
    prompted, _ = method.prompt(params["prompter"], images, rng=None, train=False)
    # Two compiled programs: their float32 logits agree to a relative 1e-4.
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, head_on_backbone(prompted), **tol)
    assert aux["region_masks"].shape == (6, 4, 4)

    # A policy that always applies the prompt is VP; one that never does is a linear probe.
    def with_constant_policy(bias):
        generator = params["prompter"]["mask_generator"]
        policy = {"kernel": jnp.zeros_like(generator["policy"]["kernel"]), "bias": jnp.array(bias)}
        prompter = {**params["prompter"], "mask_generator": {**generator, "policy": policy}}
        return {"params": {**params, "prompter": prompter}}

    always, aux = evaluate(with_constant_policy([0.0, 1.0]), images)
    assert (np.asarray(aux["region_masks"]) == 1).all()
    template = vp.padding_prompt(params["prompter"]["template"])
    np.testing.assert_allclose(always, head_on_backbone(images + template), **tol)

    never, aux = evaluate(with_constant_policy([1.0, 0.0]), images)
    assert (np.asarray(aux["region_masks"]) == 0).all()
    np.testing.assert_allclose(never, head_on_backbone(images), **tol)
    assert np.abs(np.asarray(always) - np.asarray(never)).max() > 1e-3


def test_training_masks_follow_the_gumbel_sample_and_the_epoch_temperature(small):
    method, trained, _, images = small
    prompter = trained["params"]["prompter"]
    rng = jax.random.PRNGKey(11)
    step = jax.jit(
        lambda epoch, r: method.prompt(prompter, images, rng=r, train=True, epoch=epoch)[1]
    )
    logits = method.mask_logits(prompter["mask_generator"], images)
    for epoch in (0, 1, 10, 50):
        info = step(jnp.int32(epoch), rng)
        assert float(info["temperature"]) == pytest.approx(5 * 0.98**epoch, rel=1e-5)
        masks = np.asarray(info["region_masks"])
        assert set(np.unique(masks)) <= {0.0, 1.0}  # hard straight-through: exact 0/1 forward
        expected = gumbel.gumbel_softmax(rng, logits, 5 * 0.98**epoch, hard=True)[..., 1]
        np.testing.assert_array_equal(masks, expected)
    # Different noise draws give different masks; the same rng the same ones.
    a = np.asarray(step(jnp.int32(0), jax.random.PRNGKey(1))["region_masks"])
    b = np.asarray(step(jnp.int32(0), jax.random.PRNGKey(2))["region_masks"])
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, step(jnp.int32(0), jax.random.PRNGKey(1))["region_masks"])
    with pytest.raises(ValueError, match="needs an rng while training"):
        method.prompt(prompter, images, rng=None, train=True)

    # Soft masks: fractional, and closer to 0/1 as the temperature anneals.
    soft = methods.build(
        "adavipro",
        backbone=method.backbone,
        num_classes=5,
        prompt_size=4,
        region_size=8,
        kernel_size=8,
        hard=False,
    )

    @jax.jit
    def fuzziness(epoch):
        _, info = soft.prompt(prompter, images, rng=rng, train=True, epoch=epoch)
        masks = info["region_masks"]
        return jnp.minimum(masks, 1 - masks).mean()

    values = [float(fuzziness(jnp.int32(epoch))) for epoch in (0, 50, 200)]
    assert values[0] > 0.05 and values[0] > values[1] > values[2], values


def test_gradient_reaches_the_mask_generator_only_while_training(small):
    method, trained, frozen, images = small
    labels = jnp.arange(6) % 5

    def loss(params, is_training):
        logits, _ = method.apply(
            {"params": params},
            frozen,
            images,
            rng=jax.random.PRNGKey(4),
            train=is_training,
            epoch=2,
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), labels])

    grads = jax.jit(jax.grad(loss), static_argnums=1)(trained["params"], True)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(leaf).max()) > 0, optim.path_str(path)

    # At evaluation the argmax passes no gradient to the generator; the template still gets one.
    weights = jax.random.normal(jax.random.PRNGKey(6), images.shape)

    def pixel_loss(prompter, is_training):
        prompted, _ = method.prompt(
            prompter, images, rng=jax.random.PRNGKey(4), train=is_training, epoch=2
        )
        return jnp.sum(weights * prompted)

    prompter = trained["params"]["prompter"]
    for is_training in (True, False):
        grads = jax.jit(jax.grad(pixel_loss), static_argnums=1)(prompter, is_training)
        generator = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["mask_generator"])]
        assert all(g > 0 for g in generator) if is_training else all(g == 0 for g in generator)
        assert float(jnp.abs(grads["template"]["pad_up"]).max()) > 0


def load_config(arg):
    return helpers.load_config("adavipro.py", arg)


def test_config_learning_rate_groups():
    config = load_config("")
    assert config.method.region_size == config.method.kernel_size == 32
    backbone = make_backbone("vit_b16", 224)
    options = {k: v for k, v in config.method.items() if k != "name"}
    method = methods.build("adavipro", backbone=backbone, num_classes=10, **options)
    trained, _ = abstract_init(method)
    labels, lrs = optim.group_labels(trained["params"], config.optim.lr_by_path, config.optim.lr)
    lr_of = {
        optim.path_str(path): lrs[label]
        for path, label in jax.tree_util.tree_leaves_with_path(labels)
    }
    assert lr_of["prompter/template/pad_up"] == 40.0
    assert lr_of["prompter/mask_generator/convergence/kernel"] == 1.0
    assert lr_of["prompter/mask_generator/policy/bias"] == 1.0
    assert lr_of["head/kernel"] == 0.1
    demo = load_config("demo")
    assert (demo.method.region_size, demo.method.kernel_size, demo.input.image_size) == (8, 8, 32)


def test_training_steps_leave_the_backbone_untouched(shapes_data_dir):
    config = helpers.shrink(
        load_config("demo"),
        shapes_data_dir,
        num_epochs=2,
        val_split="validation[:128]",
        test_split="test[:100]",
        warmup_steps=2,
    )
    experiment = trainer.create_experiment(config)
    frozen_before = jax.tree.map(np.asarray, experiment.frozen)
    trained_before = jax.tree.map(np.asarray, experiment.state["trained"])

    state, batches, losses = experiment.state, experiment.train_batches(), []
    for _ in range(4):
        batch = sharding.to_global_batch(next(batches), experiment.mesh)
        state, metrics = experiment.train_step(
            state, experiment.frozen, batch, experiment.train_rng
        )
        losses.append(float(metrics.compute()["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] != losses[0], losses
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, experiment.frozen), frozen_before
    )
    after = jax.tree.map(np.asarray, state["trained"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after, trained_before)
    assert all(jax.tree.leaves(changed)), changed  # template, mask generator and head all moved
