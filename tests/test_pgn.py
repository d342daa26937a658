"""PGN and its input-independent baseline: sizes, released weights, prompts, BatchNorm, training.

The PyTorch reference numbers below were computed once with torch 2.13.0 (CPU) in a throwaway
virtualenv (torch is no dependency of this project): the released state dicts were loaded with
``torch.load`` into a PyTorch re-typing of the official generator (``pgn/pgn_models/resnet.py``
with ``init_max_pool=True``, ``TLPGN``'s softmax + einsum), run on ``reference_images(2, 224)``
in ``eval()`` mode, then once in ``train()`` mode (batch statistics, running statistics updated
with momentum 0.1 and the unbiased batch variance).
"""

import functools
import math
import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt import methods
from jprompt.methods import heads, pgn, pgn_release
from jprompt.models import backbone, resnet, vit
from jprompt.train import sharding, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"  # CI clones the repository with shared/ beside it
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"released PGN weights not found: {FIXTURES} is absent"
)


def reference_images(batch, size):
    """A fixed, smooth NHWC input in roughly [-1, 1] (the same formula fed to PyTorch)."""
    b, h, w, c = np.meshgrid(
        np.arange(batch), np.arange(size), np.arange(size), np.arange(3), indexing="ij"
    )
    x = np.sin(0.05 * h + 0.07 * w + 1.3 * c + 0.9 * b) + 0.3 * np.cos(0.011 * h * w + c)
    return (0.8 * x).astype(np.float32)


def make_backbone(name="vit_b32", image_size=224):
    return backbone.Backbone(name, vit.create(name), image_size, "minus_one_to_one")


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --- Sizes and initialisation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone,num_tokens,library_size,expected",
    [
        ("vit_b32", 16, 256, 1_032_304),  # CLIP ViT-B/32 release (D=768)
        ("vit_b32", 16, 128, 669_808),  # supervised ViT-B/32 release
        ("vit_s16", 16, 128, 620_656),  # DINO ViT-S/16 release (D=384)
    ],
)
def test_parameter_counts_equal_the_official_implementation(
    backbone, num_tokens, library_size, expected
):
    method = methods.build(
        "pgn",
        backbone=make_backbone(backbone),
        num_classes=100,
        num_tokens=num_tokens,
        library_size=library_size,
    )
    trained, frozen = jax.eval_shape(method.init, jax.random.PRNGKey(0), {})
    params = trained["params"]
    dim = method.backbone.module.hidden_size
    assert params["library"].shape == (library_size, dim)
    assert pgn.count_pgn_params(params) == expected
    assert count(params["generator"]) + count(params["library"]) == expected
    if library_size == 256:
        assert count(params["generator"]) == 835_696
    assert params["head"]["kernel"].shape == (dim, 100)
    # BN running statistics are state, not parameters: 2 x (16 + 2 * (16 + 32 + 64 + 128)).
    assert count(trained["batch_stats"]) == 2 * (16 + 2 * (16 + 32 + 64 + 128))
    assert frozen == {"backbone": {}}

    tokens = methods.build(
        "prompt_tokens", backbone=make_backbone(backbone), num_classes=100, num_tokens=num_tokens
    )
    trained, _ = jax.eval_shape(tokens.init, jax.random.PRNGKey(0), {})
    assert trained["params"]["tokens"].shape == (num_tokens, dim)
    assert "batch_stats" not in trained


# --- Released weights ---------------------------------------------------------------------------

# PyTorch outputs on reference_images(2, 224) (see the module docstring). Generator logits index
# [b, k * N + n]; weights and prompts [b, k, ...].
TORCH_REFERENCE = {
    "pgn_clip_cifar10.pt": dict(
        library_size=256,
        logits_0_first3=[-0.6577340960502625, -0.7623623609542847, -0.19811220467090607],
        logits_1_last2=[-0.0022138282656669617, -0.15684902667999268],
        weights_0_0_max=0.23129314184188843,
        weights_0_0_argmax=202,
        weights_1_15_first2=[0.001099908142350614, 0.0012487787753343582],
        prompts_0_0_first3=[0.08321549743413925, 0.005046316422522068, 0.006327494978904724],
        prompts_1_last_last2=[-0.039080601185560226, 0.14915244281291962],
        train_logits_0_first3=[-0.9010297656059265, -1.096442461013794, 0.003852764144539833],
        train_stem_mean_first3=[-0.22812864184379578, 0.7047015428543091, -0.5955088138580322],
        train_block3_bn2_var_first3=[12.461750984191895, 12.902978897094727, 11.652679443359375],
    ),
    "pgn_vit_cifar100.pt": dict(
        library_size=128,
        logits_0_first3=[-0.05535588413476944, 0.06406429409980774, -0.4524115324020386],
        logits_1_last2=[-0.22250695526599884, -0.2074996381998062],
        weights_0_0_max=0.6643950939178467,
        weights_0_0_argmax=33,
        weights_1_15_first2=[0.0008589774370193481, 0.0012243784731253982],
        prompts_0_0_first3=[-0.7056858539581299, 2.8912765979766846, 0.1907370388507843],
        prompts_1_last_last2=[-0.031049730256199837, 0.26333144307136536],
        train_logits_0_first3=[-0.1616179496049881, -0.07261976599693298, -0.09869556128978729],
        train_stem_mean_first3=[1.079842209815979, 0.7969949245452881, -0.75222247838974],
        train_block3_bn2_var_first3=[148.96336364746094, 104.34046936035156, 185.11984252929688],
    ),
}
TOL = dict(rtol=1e-4, atol=2e-5)


@needs_fixtures
@pytest.mark.parametrize("name", sorted(TORCH_REFERENCE))
def test_released_weights_reproduce_pytorch(name):
    ref = TORCH_REFERENCE[name]
    params, batch_stats = pgn_release.load(FIXTURES / name)
    library_size = ref["library_size"]
    assert params["library"].shape == (library_size, 768)
    assert params["generator"]["output"]["kernel"].shape == (128, 16 * library_size)

    # The generator on its own: no backbone, only K, N and D.
    generator = pgn.PromptGenerator(num_tokens=16, library_size=library_size, token_dim=768)
    loaded = (params, batch_stats)
    # The loaded tree has exactly the structure (and shapes) of a fresh init.
    fresh = jax.eval_shape(generator.init, jax.random.PRNGKey(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(loaded)
    assert jax.tree.map(lambda a: a.shape, fresh) == jax.tree.map(lambda a: a.shape, loaded)

    images = jnp.asarray(reference_images(2, 224))
    prompts_fn = jax.jit(generator, static_argnames="train")
    prompts, weights, no_stats = prompts_fn(params, batch_stats, images, train=False)
    again, _, _ = prompts_fn(params, batch_stats, images)
    assert no_stats is None
    np.testing.assert_array_equal(prompts, again)  # deterministic
    assert prompts.shape == (2, 16, 768) and weights.shape == (2, 16, library_size)
    assert np.isfinite(prompts).all() and np.isfinite(weights).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert (weights > 0).all()

    variables = {"params": params["generator"], "batch_stats": batch_stats["generator"]}
    network = jax.jit(generator.network.apply, static_argnames=("train", "mutable"))
    logits = network(variables, images, train=False)
    np.testing.assert_allclose(logits[0, :3], ref["logits_0_first3"], **TOL)
    np.testing.assert_allclose(logits[1, -2:], ref["logits_1_last2"], **TOL)
    np.testing.assert_allclose(weights[0, 0].max(), ref["weights_0_0_max"], **TOL)
    assert int(weights[0, 0].argmax()) == ref["weights_0_0_argmax"]
    np.testing.assert_allclose(weights[1, 15, :2], ref["weights_1_15_first2"], rtol=1e-4)
    np.testing.assert_allclose(prompts[0, 0, :3], ref["prompts_0_0_first3"], **TOL)
    np.testing.assert_allclose(prompts[1, -1, -2:], ref["prompts_1_last_last2"], **TOL)

    # Training mode: batch statistics, and PyTorch's running-statistics update.
    logits, updates = network(variables, images, train=True, mutable=("batch_stats",))
    stats = updates["batch_stats"]
    np.testing.assert_allclose(logits[0, :3], ref["train_logits_0_first3"], **TOL)
    np.testing.assert_allclose(stats["stem_bn"]["mean"][:3], ref["train_stem_mean_first3"], **TOL)
    np.testing.assert_allclose(
        stats["block_3"]["bn2"]["var"][:3], ref["train_block3_bn2_var_first3"], **TOL
    )


@needs_fixtures
def test_released_weights_import_fails_naming_the_problem(monkeypatch):
    path = FIXTURES / "pgn_vit_cifar100.pt"
    with pytest.raises(ValueError, match=r"tl_vectors: shape \(128, 768\).*expected \(128, 384\)"):
        pgn_release.load(path, token_dim=384)
    with pytest.raises(ValueError, match=r"model.output_net.2.weight: shape \(2048, 128\)"):
        pgn_release.load(path, num_tokens=8)

    state = pgn_release.torch_checkpoint.load_state_dict(path)
    state["model.blocks.0.downsample.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    del state["model.blocks.2.net.4.running_var"]
    monkeypatch.setattr(pgn_release.torch_checkpoint, "load_state_dict", lambda _: state)
    with pytest.raises(ValueError) as error:
        pgn_release.load(path)
    message = str(error.value)
    assert "unexpected keys ['model.blocks.0.downsample.weight']" in message
    assert "missing keys ['model.blocks.2.net.4.running_var']" in message


@pytest.mark.parametrize("size", [14, 15])  # even and odd sides: the last window is partial
def test_max_pool_and_its_gradient_are_pytorchs(size):
    # The stem's pool follows a ReLU, so windows tie (zeros, and here repeated values): PyTorch
    # routes a window's gradient to its first maximum in row-major order, and so must we.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.maximum(np.round(rng.normal(size=(2, size, size, 5)) * 2) / 2, 0).astype(np.float32)
    out_size = (size - 1) // 2 + 1
    cotangent = rng.normal(size=(2, out_size, out_size, 5)).astype(np.float32)
    pooled, vjp = jax.vjp(resnet.max_pool, jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(cotangent))

    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    pooled_torch = torch.nn.functional.max_pool2d(x_torch, 3, 2, 1)
    pooled_torch.backward(torch.from_numpy(cotangent.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(pooled, pooled_torch.detach().numpy().transpose(0, 2, 3, 1))
    expected = x_torch.grad.numpy().transpose(0, 2, 3, 1)
    assert (expected == 0).mean() > 0.5  # many positions lose every tie
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


# --- One small experiment per method, shared by the tests below -----------------------------------


def load_config(arg):
    return helpers.load_config("pgn.py", arg)


def small_config(data_dir, arg):
    """The demo config (the shipped tiny ViT at 32px: 64 patches + CLS, D=64) on sliced splits,
    64 examples per batch, K=4, N=16."""
    config = helpers.shrink(load_config(arg), data_dir, num_epochs=2, val_split="validation[:128]")
    config.method.num_tokens = 4
    if "library_size" in config.method:
        config.method.library_size = 16
    return config


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


class Setup:
    """An experiment plus numpy copies of its initial state (training donates the state)."""

    def __init__(self, config):
        self.config = config
        self.experiment = trainer.create_experiment(config)
        self.method = self.experiment.method
        self.trained = to_numpy(self.experiment.state["trained"])
        self.frozen = to_numpy(self.experiment.frozen)
        # A random head, so that logits depend on the features.
        kernel = self.trained["params"]["head"]["kernel"]
        self.trained["params"]["head"]["kernel"] = (
            np.random.default_rng(0).normal(size=kernel.shape).astype(np.float32)
        )
        self.images = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
        self.apply = {
            train: jax.jit(
                functools.partial(self.method.apply, rng=jax.random.PRNGKey(0), train=train)
            )
            for train in (False, True)
        }

    def backbone(self, prompts, position):
        apply = functools.partial(self.method.backbone.module.apply, prompt_position=position)
        return jax.jit(apply)(
            {"params": self.frozen["backbone"]}, self.images, prompt_tokens=prompts
        )[1]


@pytest.fixture(scope="module")
def pgn_setup(shapes_data_dir):
    return Setup(small_config(shapes_data_dir, "demo,backbone=vit_b32"))


@pytest.fixture(scope="module")
def tokens_setup(shapes_data_dir):
    return Setup(small_config(shapes_data_dir, "demo,baseline,backbone=vit_b32"))


def test_initialisation_follows_the_official_code(pgn_setup):
    trained = pgn_setup.trained
    params, gen = trained["params"], trained["params"]["generator"]
    # The one-draw init (resnet.init_variables) builds exactly the tree of the module's init.
    network = pgn_setup.method.generator.network
    abstract = jax.eval_shape(
        lambda: network.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(
        lambda a: a.shape, {"params": gen, "batch_stats": trained["batch_stats"]["generator"]}
    )
    # Convs: kaiming_normal_(mode="fan_out"): std sqrt(2 / (out * 3 * 3)), untruncated.
    kernel = gen["block_3"]["conv2"]["kernel"]  # HWIO (3, 3, 128, 128)
    std = math.sqrt(2 / (128 * 9))
    np.testing.assert_allclose(kernel.std(), std, rtol=0.02)
    assert np.abs(kernel).max() > 3 * std  # not truncated at 2 sigma
    np.testing.assert_allclose(gen["stem_conv"]["kernel"].std(), math.sqrt(2 / (16 * 9)), rtol=0.15)
    assert "bias" not in gen["block_3"]["conv2"] and "bias" not in gen["stem_conv"]
    # BN scale 1, bias 0; running mean 0, var 1.
    np.testing.assert_array_equal(gen["block_2"]["bn1"]["scale"], np.ones(64))
    np.testing.assert_array_equal(gen["block_2"]["bn1"]["bias"], np.zeros(64))
    np.testing.assert_array_equal(trained["batch_stats"]["generator"]["stem_bn"]["mean"], 0.0)
    np.testing.assert_array_equal(trained["batch_stats"]["generator"]["stem_bn"]["var"], 1.0)
    # Linear and shortcut bias keep PyTorch's defaults: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    out = gen["output"]["kernel"]
    assert out.shape == (128, 4 * 16)
    assert 0.99 / math.sqrt(128) < np.abs(out).max() <= 1 / math.sqrt(128)
    assert out.min() < 0 < out.max()
    assert 0 < np.abs(gen["block_1"]["downsample"]["bias"]).max() <= 1 / math.sqrt(16)
    # The token library: N(0, 0.02^2).
    assert params["library"].shape == (16, 64)
    np.testing.assert_allclose(params["library"].std(), 0.02, rtol=0.1)
    assert abs(float(params["library"].mean())) < 3e-3


# --- Prompts in the backbone --------------------------------------------------------------------


def test_pgn_tokens_are_appended_at_the_end_without_position_embedding(pgn_setup):
    setup = pgn_setup
    logits, aux = setup.apply[False](setup.trained, setup.frozen, setup.images)
    prompts, weights, _ = jax.jit(setup.method.prompts, static_argnames="train")(
        setup.trained, setup.images, train=False
    )
    assert prompts.shape == (8, 4, 64)
    assert np.abs(prompts[0] - prompts[1]).max() > 1e-6  # one set of tokens per image

    manual = setup.backbone(prompts, "end")
    assert aux["encoded"].shape == (8, 1 + 64 + 4, 64)
    np.testing.assert_allclose(aux["encoded"], manual["encoded"], rtol=1e-5, atol=1e-5)
    expected_logits = heads.apply_linear_head(setup.trained["params"]["head"], manual["features"])
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(aux["token_weights"], weights)
    assert aux["token_weights"].shape == (8, 4, 16)
    np.testing.assert_allclose(aux["token_weights"].sum(-1), 1.0, rtol=1e-6)

    # No position embedding: attention is permutation-equivariant, so tokens that carry none
    # give the same CLS feature wherever they sit, and their outputs just move along. With a
    # position embedding, moving them would change everything.
    after_cls = setup.backbone(prompts, "after_cls")
    np.testing.assert_allclose(after_cls["features"], manual["features"], atol=1e-5)
    np.testing.assert_allclose(after_cls["encoded"][:, 1:5], aux["encoded"][:, 65:], atol=1e-5)
    np.testing.assert_allclose(after_cls["encoded"][:, 5:], aux["encoded"][:, 1:65], atol=1e-5)
    pos = setup.frozen["backbone"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pos.shape == (1, 1 + 64, 64)  # covers CLS + patches only
    shifted = setup.backbone(prompts + pos[:, 1:5], "end")
    assert np.abs(shifted["features"] - manual["features"]).max() > 1e-3


def test_learned_tokens_are_the_same_for_every_image_and_sit_at_the_end(tokens_setup):
    setup = tokens_setup
    tokens = setup.trained["params"]["tokens"]
    assert tokens.shape == (4, 64)
    np.testing.assert_allclose(tokens.std(), 0.02, rtol=0.3)  # N(0, 0.02^2), 256 samples
    logits, aux = setup.apply[True](setup.trained, setup.frozen, setup.images)
    manual = setup.backbone(np.broadcast_to(tokens, (8, 4, 64)), "end")
    assert aux["encoded"].shape == (8, 1 + 64 + 4, 64)
    np.testing.assert_allclose(aux["encoded"], manual["encoded"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        logits,
        heads.apply_linear_head(setup.trained["params"]["head"], manual["features"]),
        rtol=1e-5,
        atol=1e-4,
    )
    assert "mutable" not in aux


# --- BatchNorm ----------------------------------------------------------------------------------


def test_batchnorm_train_updates_running_stats_and_eval_ignores_the_batch(pgn_setup):
    setup = pgn_setup
    trained, frozen, images = setup.trained, setup.frozen, setup.images
    train_a, aux = setup.apply[True](trained, frozen, images)
    before = trained["batch_stats"]
    after = aux["mutable"]["batch_stats"]
    assert jax.tree.structure(after) == jax.tree.structure(before)
    moved = jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) != b)), after, before)
    assert all(jax.tree.leaves(moved))  # every running mean and var changed, every channel
    # (The update rule itself is checked against PyTorch in test_released_weights_...)

    # Evaluation: an image's output does not depend on the rest of its batch ...
    other = np.concatenate([images[:2], -images[2:]], axis=0)
    eval_a, aux_a = setup.apply[False](trained, frozen, images)
    eval_b, _ = setup.apply[False](trained, frozen, other)
    np.testing.assert_allclose(eval_a[:2], eval_b[:2], rtol=1e-5, atol=1e-5)
    assert "mutable" not in aux_a
    # ... while in training it does (batch statistics), so the check above has teeth.
    train_b, _ = setup.apply[True](trained, frozen, other)
    assert np.abs(train_a[:2] - train_b[:2]).max() > 1e-3
    # Writing the new statistics back changes what evaluation computes.
    eval_c, _ = setup.apply[False]({**trained, **aux["mutable"]}, frozen, images)
    assert np.abs(eval_c - eval_a).max() > 1e-4


def test_batch_statistics_over_eight_devices_equal_one_device(pgn_setup):
    """The global batch sharded over 8 devices (one image each) normalizes as one batch."""
    setup = pgn_setup
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(jax.devices())
    sharded = jax.device_put(setup.images, sharding.batch_sharded(mesh))
    logits_8, aux_8 = setup.apply[True](setup.trained, setup.frozen, sharded)
    one = jax.devices()[0]
    logits_1, aux_1 = setup.apply[True](
        *jax.device_put((setup.trained, setup.frozen, setup.images), one)
    )
    assert len(logits_8.sharding.device_set) == 8 and len(logits_1.sharding.device_set) == 1
    # Sharded and single-device programs reduce the batch statistics in another order: float32
    # agreement to a relative 1e-4.
    np.testing.assert_allclose(logits_8, logits_1, rtol=1e-4, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        aux_8["mutable"],
        aux_1["mutable"],
    )


# --- Training end to end ------------------------------------------------------------------------


run_steps = helpers.run_steps


@pytest.mark.parametrize("name", ["pgn", "prompt_tokens"])
def test_training_moves_prompts_and_stats_and_keeps_the_backbone(pgn_setup, tokens_setup, name):
    setup = pgn_setup if name == "pgn" else tokens_setup
    experiment = setup.experiment
    expected_class = pgn.PromptGenerationNetwork if name == "pgn" else pgn.LearnedTokens
    assert type(experiment.method) is expected_class
    assert setup.config.method.name == name
    trained_before = to_numpy(experiment.state["trained"])
    assert "backbone" not in trained_before["params"]

    losses, state = run_steps(experiment, 4)
    trained_after = to_numpy(state["trained"])
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] != losses[0]
    jax.tree.map(np.testing.assert_array_equal, to_numpy(experiment.frozen), setup.frozen)
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), trained_after["params"], trained_before["params"]
    )
    assert all(jax.tree.leaves(moved))  # every trainable leaf (generator, library, head) moved
    if name == "prompt_tokens":
        assert "batch_stats" not in trained_after
    else:
        stats_moved = jax.tree.map(
            lambda a, b: bool(np.all(a != b)),
            trained_after["batch_stats"],
            trained_before["batch_stats"],
        )
        assert all(jax.tree.leaves(stats_moved))
        # Evaluation runs on the running statistics of the trained state.
        val = experiment.evaluate(state["trained"], setup.config.dataset.val_split)
        assert val["num_examples"] == 128 and math.isfinite(val["loss"])


def test_library_usage_picture(pgn_setup):
    """The picture shows each image's token weights, scaled to a maximum of 1."""
    method, trained = pgn_setup.method, pgn_setup.trained
    pictures = method.visualize(trained, pgn_setup.frozen, pgn_setup.images, rng=None)
    usage = np.asarray(pictures["library_usage_mask"])
    _, weights, _ = method.prompts(trained, pgn_setup.images, train=False)
    assert usage.shape == (*weights.shape, 1)
    np.testing.assert_allclose(usage.max(axis=(1, 2, 3)), 1.0, rtol=1e-6)
    ratio = usage[..., 0] * weights.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ratio, weights, rtol=1e-5, atol=1e-7)
