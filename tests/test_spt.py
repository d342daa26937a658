"""Self-Prompt Tuning init: VPT's prompts start as prototypes of the training images' tokens,
each layer's from the tokens it sits among, against by-hand computations on the shipped tiny ViT."""

import itertools

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_vpt import images, pretrained

from jprompt import methods
from jprompt.methods import vpt
from jprompt.models import vit
from jprompt.train import trainer

NUM_PATCHES = (32 // 4) ** 2  # vit_tiny4 at 32 px


def build(backbone, **options):
    return methods.build("vpt", backbone=backbone, num_classes=5, prompt_init="spt", **options)


def spt(method, params, x, seed=0):
    trained, frozen = method.init(jax.random.PRNGKey(2), params)
    return trained, vpt.spt_prompts(method, trained, frozen, x, jax.random.PRNGKey(seed))


def patch_embeddings(params, x):
    """By hand: each 4x4x3 patch (row-major) times the kernel, plus the bias; (B, N, D)."""
    kernel = np.asarray(params["embedding"]["kernel"]).reshape(-1, 64)
    x = np.asarray(x)
    patches = x.reshape(len(x), 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(x), 64, -1)
    return patches @ kernel + np.asarray(params["embedding"]["bias"])


def block_inputs(backbone, params, x):
    """Every encoder block's input sequence, recorded from the backbone without prompts (jitted:
    a compiled forward pass is much faster than an eager one)."""

    def run(params, x):
        seen = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, vit.Encoder1DBlock) and context.method_name == "__call__":
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            backbone.features(params, x)
        return seen

    return [np.asarray(a) for a in jax.jit(run)(params, x)]


def assert_a_permutation_of(prompts, candidates):
    """Each prompt is one candidate row, each candidate taken once."""
    distance = np.abs(prompts[:, None] - candidates[None]).max(axis=-1)
    match = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 1e-4
    assert sorted(match) == list(range(len(candidates)))


def test_shallow_prompts_are_patch_embeddings_before_the_position_embedding():
    backbone, params = pretrained()
    x = images(batch=1)
    # All 64 patch tokens of one image: the prompts must be exactly those, in some order.
    method = build(backbone, num_tokens=NUM_PATCHES)
    trained, result = spt(method, params, x)
    prompts = np.asarray(result["params"]["prompter"]["tokens"])
    assert prompts.shape == (NUM_PATCHES, 64) and prompts.dtype == np.float32
    assert_a_permutation_of(prompts, patch_embeddings(params, x)[0])
    # The rest of the tree is untouched, and trained itself is not changed.
    jax.tree.map(np.testing.assert_array_equal, result["params"]["head"], trained["params"]["head"])
    assert not np.array_equal(trained["params"]["prompter"]["tokens"], prompts)


def test_deep_prompts_take_each_layers_input_tokens_without_cls():
    backbone, params = pretrained()
    x = images(batch=1)
    method = build(backbone, num_tokens=NUM_PATCHES, deep=True)
    _, result = spt(method, params, x)
    prompts = np.asarray(result["params"]["prompter"]["tokens"])
    assert prompts.shape == (2, NUM_PATCHES, 64)
    seen = block_inputs(backbone, params, x)
    assert seen[1].shape == (1, 1 + NUM_PATCHES, 64)
    assert_a_permutation_of(prompts[0], patch_embeddings(params, x)[0])
    assert_a_permutation_of(prompts[1], seen[1][0, 1:])  # block 0's output, CLS dropped


def test_random_prototypes_are_distinct_tokens_of_all_images_drawn_by_rng():
    backbone, params = pretrained()
    x = images(batch=3)
    method = build(backbone, num_tokens=16)
    candidates = patch_embeddings(params, x).reshape(-1, 64)  # 192 tokens of 3 images
    drawn = []
    for seed in (0, 1):
        prompts = np.asarray(spt(method, params, x, seed)[1]["params"]["prompter"]["tokens"])
        distance = np.abs(prompts[:, None] - candidates[None]).max(axis=-1)
        assert distance.min(axis=1).max() < 1e-4
        drawn.append(set(distance.argmin(axis=1)))
        assert len(drawn[-1]) == 16
    assert drawn[0] != drawn[1]
    assert {i // NUM_PATCHES for i in drawn[0] | drawn[1]} == {0, 1, 2}
    # The backbone runs on chunks of images: one image at a time gives the same prototypes.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vpt, "SPT_CHUNK", 1)
        chunked = np.asarray(spt(method, params, x, 1)[1]["params"]["prompter"]["tokens"])
    np.testing.assert_allclose(chunked, prompts, rtol=1e-6, atol=1e-6)  # seed 1's


def test_window_pools_as_the_official_slices():
    x = np.arange(2 * 7 * 2, dtype=np.float32).reshape(2, 7, 2) ** 1.5  # (B, L=7, D)
    # num_tokens 3: windows of 7 // 2 = 3 tokens, [0:3] and [3:6], then the last 7 % 3 = 1.
    got = np.asarray(vpt.window_pools(jnp.asarray(x), 3, "mean_pooling"))
    expected = np.stack([x[:, 0:3].mean(1), x[:, 3:6].mean(1), x[:, 6:7].mean(1)], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    got = np.asarray(vpt.window_pools(jnp.asarray(x), 3, "max_pooling"))
    np.testing.assert_array_equal(got, np.stack([x[:, 2], x[:, 5], x[:, 6]], axis=1))
    # L = 6: 6 % 3 = 0, and the official x[:, -0:] pools the whole sequence.
    got = np.asarray(vpt.window_pools(jnp.asarray(x[:, :6]), 3, "mean_pooling"))
    np.testing.assert_allclose(got[:, 2], x[:, :6].mean(1), rtol=1e-6)


def test_deep_mean_pooling_prototypes_pool_each_layers_tokens():
    backbone, params = pretrained()
    x = images(batch=1)
    method = build(backbone, num_tokens=5, deep=True, spt_sample="mean_pooling")
    prompts = np.asarray(spt(method, params, x)[1]["params"]["prompter"]["tokens"])
    # 64 tokens in 4 windows of 16, then the last 64 % 16 = 0: the whole sequence.
    layer_tokens = [patch_embeddings(params, x)[0], block_inputs(backbone, params, x)[1][0, 1:]]
    for layer, tokens in enumerate(layer_tokens):
        pools = [tokens[i * 16 : (i + 1) * 16].mean(0) for i in range(4)] + [tokens.mean(0)]
        assert_a_permutation_of(prompts[layer], np.stack(pools))


def test_bad_options_fail_clearly():
    backbone, params = pretrained()
    with pytest.raises(ValueError, match="unknown prompt_init 'kmeans'"):
        methods.build("vpt", backbone=backbone, num_classes=5, prompt_init="kmeans")
    with pytest.raises(ValueError, match="set project_dim=-1, not 16"):
        build(backbone, project_dim=16)
    with pytest.raises(ValueError, match="shallow SPT samples patch embeddings at random"):
        build(backbone, spt_sample="max_pooling")
    with pytest.raises(ValueError, match="unknown spt_sample 'kmeans'"):
        build(backbone, spt_sample="kmeans")
    method = build(backbone, num_tokens=65)
    with pytest.raises(ValueError, match="num_tokens=65 distinct prototypes but 1 image"):
        spt(method, params, images(batch=1))


def test_config_args():
    config = helpers.load_config("vpt.py", "demo,deep,spt,spt_sample=mean_pooling,spt_images=8")
    assert (config.method.prompt_init, config.method.spt_sample, config.method.spt_images) == (
        "spt",
        "mean_pooling",
        8,
    )
    assert helpers.load_config("vpt.py", "demo").method.prompt_init == "uniform"


def test_the_trainer_starts_from_prototypes_of_the_first_training_images(shapes_data_dir):
    config = helpers.load_config("vpt.py", "demo,spt,spt_images=70")
    experiment = trainer.create_experiment(helpers.shrink(config, shapes_data_dir))
    # 70 images: the whole first batch of 64 and 6 of the second.
    first = np.concatenate([b["image"] for b in itertools.islice(experiment.train_batches(), 2)])
    backbone_params = jax.tree.map(np.asarray, experiment.frozen["backbone"])
    candidates = patch_embeddings(backbone_params, first[:70]).reshape(70 * NUM_PATCHES, -1)
    tokens = np.asarray(experiment.state["trained"]["params"]["prompter"]["tokens"])
    distance = np.abs(tokens[:, None] - candidates[None]).max(axis=-1)
    assert tokens.shape == (10, candidates.shape[1])
    assert distance.min(axis=1).max() < 1e-4
    assert len(set(distance.argmin(axis=1))) == 10
    trace = experiment.state["opt_state"]
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(trace) if np.ndim(x))
