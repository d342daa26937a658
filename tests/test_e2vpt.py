"""E2VPT: the parameter count of the official code, key-value prompts in attention against the
attention by hand and routed per layer, the pruning masks and their settings worked out by hand
from the official algorithm, the method's wiring, importance scores, and the config."""

import collections
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_vpt import LOGITS_TOL, abstract_params, count, images, make_backbone, pretrained

from jprompt import methods
from jprompt.methods import e2vpt, heads
from jprompt.models import vit
from jprompt.train import config_lib


def build(backbone, **options):
    return methods.build("e2vpt", backbone=backbone, num_classes=5, **options)


# --- Numbers from the official code ------------------------------------------------------------


def test_parameter_count_on_vit_b16_at_the_official_defaults():
    """The official trainable tensors at the defaults of src/configs/config.py (NUM_TOKENS_P=5,
    DEEP_P, NUM_TOKENS=5, DEEP, SHARE_PARAM_KV, MASK_CLS_TOKEN with CLS_TOKEN_P_PIECES_NUM=16),
    read off vit_prompt_VK.py and vit_changeVK.py for ViT-B/16 (12 layers, 12 heads of 64):
      prompt_embeddings (1, 5, 768)                       3,840
      deep_prompt_embeddings (11, 5, 768)                42,240
      deep_QKV_embeddings (12, 5, 64) in each of 12 layers 46,080
      prompt_soft_tokens_mask_cls_token (5,)                  5
      prompt_soft_tokens_pieces_mask_cls_token (5, 16)       80
    = 92,245, plus the head Linear(768, 5): 3,845. Rewinding freezes the two masks."""
    backbone = make_backbone("vit_b16", 224)
    backbone_params = abstract_params(backbone)
    method = build(backbone)
    trained, frozen = jax.eval_shape(method.init, jax.random.PRNGKey(0), backbone_params)
    assert count(trained["params"]["prompter"]) == 92_245
    assert count(trained["params"]["head"]) == 3_845
    assert trained["params"]["prompter"]["kv"].shape == (12, 12, 5, 64)
    assert count(frozen["backbone"]) == count(backbone_params)

    rewound, frozen = jax.eval_shape(
        build(backbone, rewind=True).init, jax.random.PRNGKey(0), backbone_params
    )
    assert count(rewound["params"]["prompter"]) == 92_245 - 85
    assert count(frozen["prompt_masks"]) == 85
    # Separate key and value prompts double them; first-layer-only keeps one layer's.
    assert count(
        jax.eval_shape(build(backbone, share_kv=False).init, jax.random.PRNGKey(0), {})
    ) == (92_245 + 46_080 + 3_845)
    first_only = jax.eval_shape(build(backbone, kv_deep=False).init, jax.random.PRNGKey(0), {})
    assert first_only[0]["params"]["prompter"]["kv"].shape == (1, 12, 5, 64)


def test_kv_init_bounds_as_the_official_origin_init():
    shape = (12, 12, 5, 64)
    # ORIGIN_INIT=2: torch's kaiming_uniform_ (a=0) on (12, 5, 64): fan_in = 5 * 64 = 320,
    # bound = sqrt(2) * sqrt(3 / 320) = sqrt(6 / 320) = 0.136931...
    # ORIGIN_INIT=0: sqrt(6 / (3 * 16 * 16 + 16)) = sqrt(6 / 784) = 0.087482...
    for kind, bound in (("kaiming", 0.1369306), ("uniform", 0.0874818)):
        kv = np.asarray(e2vpt.init_kv(jax.random.PRNGKey(0), shape, kind, 16))
        assert np.abs(kv).max() < bound and np.abs(kv).max() > 0.99 * bound
        assert abs((kv < 0).mean() - 0.5) < 0.01
    normal = np.asarray(e2vpt.init_kv(jax.random.PRNGKey(0), shape, "trunc_normal", 16))
    assert normal.std() == pytest.approx(0.02, rel=0.02)


# --- Key-value prompts in attention ------------------------------------------------------------


@pytest.mark.parametrize("attention", ["heads_major", "xla"])
def test_kv_prompts_are_prepended_to_keys_and_values(attention):
    b, t, d, h, m = 2, 3, 8, 2, 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    keys, values = (rng.normal(size=(b, h, m, d // h)).astype(np.float32) for _ in range(2))
    layer = vit.MultiHeadDotProductAttention(num_heads=h, attention=attention)
    params = layer.init(jax.random.PRNGKey(0), x, deterministic=True)["params"]
    got = layer.apply({"params": params}, x, deterministic=True, kv_prompts=(keys, values))

    p = jax.tree.map(np.asarray, params)

    def project(name):  # (B, H, T, D/H)
        y = np.einsum("btd,dhk->bhtk", x, p[name]["kernel"]) + p[name]["bias"][:, None]
        return y

    q, k, v = project("query"), project("key"), project("value")
    k = np.concatenate([keys, k], axis=2)  # the prompts as extra keys and values, no bias
    v = np.concatenate([values, v], axis=2)
    logits = np.einsum("bhqk,bhsk->bhqs", q, k) / np.sqrt(d // h)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhqs,bhsk->bhqk", weights, v)
    expected = np.einsum("bhtk,hkd->btd", y, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (b, t, d)  # the sequence keeps its length


# --- Pruning masks and settings, worked out by hand from the official algorithm ----------------


def test_prune_counts_follow_determine_mask_sequence():
    # P=5 tokens, MIN_NUMBER_CLS_TOKEN=1: int(5 * {10..90} / 100) = 0,1,1,2,2,3,3,4,4 (none
    # above 5 - 1): files 0..4.
    assert e2vpt.prune_counts(5, minimum=e2vpt.MIN_TOKENS) == (0, 1, 2, 3, 4)
    # S=16 pieces, MIN_NUMBER_CLS_TOKEN_PIECE=4: 1,3,4,6,8,9,11,12, then 90% gives 14 > 12:
    # 12 is appended and the loop ends.
    assert e2vpt.prune_counts(16, minimum=e2vpt.MIN_PIECES) == (1, 3, 4, 6, 8, 9, 11, 12)
    # The loop stops at the first count over the limit, in the given order: 90% of 4 is 3 > 2,
    # so 10% is never reached.
    assert e2vpt.prune_counts(4, (90, 10), minimum=2) == (2,)
    assert e2vpt.prune_counts(4, (50, 90, 10), minimum=1) == (0, 2, 3)


def test_rewind_grid_prunes_the_lowest_scores_ties_by_index():
    token_scores = np.array([0.3, -0.1, 0.3, 0.2, -0.1])  # ascending: 1, 4, 3, 0, 2
    piece_scores = np.ones((5, 16))
    piece_scores[0] = 16 - np.arange(16)  # lowest last: 15, 14, 13, ...
    piece_scores[1] = 0.0  # all tied: by index 0, 1, 2, ...
    piece_scores[2, [5, 7, 9]] = [-1.0, -2.0, -0.5]  # 7, 5, 9 then the tied rest by index
    piece_scores[3] = -np.arange(16) % 5  # 0, 4, 3, 2, 1, 0, 4, ...: the zeros at 0, 5, 10, 15
    grid = e2vpt.rewind_grid({"token_mask": token_scores[:, None], "piece_mask": piece_scores})
    assert sorted(grid) == [(t, s) for t in (0, 1, 2, 3, 4) for s in (1, 3, 4, 6, 8, 9, 11, 12)]
    assert [grid[t, 1]["pruned_tokens"] for t in range(5)] == [
        (),
        (1,),
        (1, 4),
        (1, 3, 4),
        (0, 1, 3, 4),
    ]
    pieces = grid[2, 4]["pruned_pieces"]
    assert pieces[0] == (12, 13, 14, 15)
    assert pieces[1] == (0, 1, 2, 3)
    assert pieces[2] == (0, 5, 7, 9)
    assert pieces[3] == (0, 5, 10, 15)
    assert pieces[4] == (0, 1, 2, 3)


def test_masks_scale_tokens_by_strided_pieces():
    masks = e2vpt.prompt_masks(3, 4, pruned_tokens=(2,), pruned_pieces=((1,), (0, 3), ()))
    np.testing.assert_array_equal(masks["token_mask"], [[1], [1], [0]])
    np.testing.assert_array_equal(masks["piece_mask"], [[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]])
    tokens = jnp.arange(1.0, 25.0).reshape(3, 8)  # D = 8: piece s is dimensions s and s + 4
    got = e2vpt.apply_masks(tokens, masks["token_mask"], masks["piece_mask"])
    expected = [
        [1, 0, 3, 4, 5, 0, 7, 8],
        [0, 10, 11, 0, 0, 14, 15, 0],
        [0] * 8,
    ]
    np.testing.assert_array_equal(got, expected)


# --- The method --------------------------------------------------------------------------------


@contextlib.contextmanager
def kv_per_layer():
    """Collects the ``kv_prompts`` each encoder block's attention is called with, by block."""
    seen = collections.defaultdict(list)

    def record(next_fun, args, kwargs, context):
        attention = isinstance(context.module, vit.MultiHeadDotProductAttention)
        if attention and context.method_name == "__call__":
            seen[context.module.parent.name].append(kwargs["kv_prompts"])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        yield seen


def test_apply_is_the_backbone_with_masked_prompts_and_each_layers_kv_prompts():
    backbone, params = pretrained()  # depth 2, width 64, 2 heads of 32
    method = build(
        backbone, rewind=True, pruned_tokens=(1,), pruned_pieces=((0, 5), (), (), (), ())
    )
    trained, frozen = method.init(jax.random.PRNGKey(2), {})
    frozen["backbone"] = params
    prompter = trained["params"]["prompter"]
    tokens = np.asarray(prompter["tokens"])  # (L=2, P=5, 64)
    masked = tokens.copy()
    masked[:, 1] = 0.0  # the pruned token
    masked[:, 0, 0::16] = 0.0  # token 0's pieces 0 and 5: dimensions 0, 16, 32, 48 and 5, 21, ...
    masked[:, 0, 5::16] = 0.0
    x = images()
    run = jax.jit(lambda t, x: method.apply(t, frozen, x)[0])
    logits = run(trained, x)

    kv = np.broadcast_to(np.asarray(prompter["kv"])[:, None], (2, 4, 2, 5, 32))
    deep = jnp.broadcast_to(masked[:, None], (2, 4, 5, 64))

    def by_hand(kv_prompts):  # the pooled features and what each layer's attention was given
        with kv_per_layer() as seen:
            pooled, _ = backbone.module.apply(
                {"params": params}, x, deep_prompts=deep, kv_prompts=kv_prompts
            )
        return pooled, dict(seen)

    pooled, seen = jax.jit(by_hand)((kv, kv))
    np.testing.assert_allclose(
        logits, heads.apply_linear_head(trained["params"]["head"], pooled), **LOGITS_TOL
    )
    # Layer i's attention gets layer i's keys and values; with one layer's, the first alone.
    for i in range(2):
        for keys, values in seen[f"encoderblock_{i}"]:
            np.testing.assert_array_equal(keys, kv[i])
            np.testing.assert_array_equal(values, kv[i])
    _, seen = jax.eval_shape(by_hand, (kv[:1], kv[:1]))
    assert seen["encoderblock_0"][0][0].shape == kv[0].shape
    assert all(given is None for given in seen["encoderblock_1"])
    with pytest.raises(ValueError, match=r"kv_prompts keys: expected shape \(L, B, H, m, D/H\)"):
        by_hand((kv[:, :1], kv))

    # A pruned token is a zero vector whatever it holds; the key-value prompts matter.
    changed = jax.tree.map(lambda a: a, trained)
    changed["params"]["prompter"]["tokens"] = prompter["tokens"].at[:, 1].add(1.0)
    np.testing.assert_allclose(run(changed, x), logits, rtol=1e-6, atol=1e-6)
    changed["params"]["prompter"]["kv"] = prompter["kv"] + 1.0
    assert np.abs(run(changed, x) - logits).max() > 1e-3


def test_importance_scores_are_mean_mask_gradients():
    backbone, params = pretrained()
    method = build(backbone)
    trained, frozen = method.init(jax.random.PRNGKey(2), {})
    frozen["backbone"] = params
    np.testing.assert_array_equal(trained["params"]["prompter"]["token_mask"], np.ones((5, 1)))
    batches = [(images(seed=s), jnp.array([0, 1, 2, 3])) for s in (3, 4)]
    both = e2vpt.importance_scores(method, trained, frozen, batches)
    # The mean of two equal batches' mean losses is the mean loss of the two as one batch.
    joined = [tuple(jnp.concatenate(parts) for parts in zip(*batches, strict=True))]
    np.testing.assert_allclose(
        both["piece_mask"],
        e2vpt.importance_scores(method, trained, frozen, joined)["piece_mask"],
        rtol=1e-4,
        atol=1e-7,
    )
    # With every mask at 1, scaling token p scales all its pieces: d/dtoken_p = sum_s d/dpiece_ps.
    np.testing.assert_allclose(
        both["token_mask"][:, 0], both["piece_mask"].sum(1), rtol=1e-4, atol=1e-7
    )
    assert np.abs(both["piece_mask"]).min() > 0
    with pytest.raises(ValueError, match="trained masks of a run with rewind=False"):
        e2vpt.importance_scores(build(backbone, rewind=True), trained, frozen, batches)


def test_bad_options_fail_clearly():
    backbone = make_backbone()
    for options, message in (
        (dict(pruned_tokens=(1,)), "set rewind=True"),
        (dict(rewind=True, pruned_tokens=(5,)), r"must be in \[0, num_tokens=5\)"),
        (dict(rewind=True, pruned_pieces=((1,),)), "one tuple per token"),
        (dict(pieces=24), "must divide the backbone's width 64"),
        (dict(kv_init="xavier"), "unknown kv_init 'xavier'"),
        (dict(prompt_init="spt"), "start uniform"),
    ):
        with pytest.raises(ValueError, match=message):
            build(backbone, **options)


def test_config_demo_and_full_recipe():
    demo = config_lib.load("configs/e2vpt.py:demo")
    assert demo.method.name == "e2vpt" and demo.method.num_tokens == 5 and demo.method.deep
    assert (demo.method.kv_tokens, demo.method.kv_init, demo.method.pieces) == (5, "kaiming", 16)
    full = config_lib.load(
        "configs/e2vpt.py:dataset=vtab/dtd,trainval", {"method.pruned_tokens": "(1, 4)"}
    )
    assert (full.batch_size, full.optim.lr, full.method.dropout) == (64, 0.25 * 64 / 256, 0.1)
    assert full.method.pruned_tokens == (1, 4) and full.protocol == ""
    assert full.backbone.activation == "gelu_exact" and full.input.normalization == "imagenet"
