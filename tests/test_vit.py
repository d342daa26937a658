"""ViT: the published parameter tree and counts, the forward pass, and prompt semantics.

Big models are only traced with ``jax.eval_shape``; everything that computes uses ``vit_tiny4``
(D=64, 2 layers, 2 heads) on 16x16 images (a 4x4 grid of patches).
"""

import functools
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jprompt.models import backbones, clip, vit
from jprompt.models.vit_checkpoint import count_params, flatten

# From google-research/vision_transformer vit_jax/models_test.py (1000 classes, 224px, no
# representation layer).
PUBLISHED_COUNTS = {
    ("vit_ti16", "tok"): 5_717_416,
    ("vit_s16", "tok"): 22_050_664,
    ("vit_s32", "tok"): 22_878_952,
    ("vit_b8", "tok"): 86_576_872,
    ("vit_b16", "tok"): 86_567_656,
    ("vit_b32", "tok"): 88_224_232,
    ("vit_l16", "tok"): 304_326_632,
    ("vit_l32", "tok"): 306_535_400,
    ("vit_h14", "tok"): 632_045_800,
    ("vit_s16", "gap"): 22_049_896,
    ("vit_s32", "gap"): 22_878_184,
    ("vit_b16", "gap"): 86_566_120,
    ("vit_b32", "gap"): 88_222_696,
}
# vit_jax's "testing" model: patch 16, hidden 10, 1 layer, mlp 10, 2 heads, 1000 classes.
TESTING_COUNT = 21_390

IMAGE = 16
PATCH = 4
NUM_PATCHES = (IMAGE // PATCH) ** 2
D = 64
DEPTH = 2
P = 3  # prompt tokens
B = 2


def _abstract_params(model, image_size=224):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _shapes(tree):
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


# ---------------------------------------------------------------------------------------------
# Parameter tree and counts.


def test_b16_tree_is_the_published_one():
    shapes = _shapes(_abstract_params(vit.create("vit_b16", num_classes=1000)))
    top = {k: v for k, v in shapes.items() if "encoderblock" not in k}
    assert top == {
        "Transformer/encoder_norm/bias": (768,),
        "Transformer/encoder_norm/scale": (768,),
        "Transformer/posembed_input/pos_embedding": (1, 197, 768),
        "cls": (1, 1, 768),
        "embedding/bias": (768,),
        "embedding/kernel": (16, 16, 3, 768),
        "head/bias": (1000,),
        "head/kernel": (768, 1000),
    }
    prefix = "Transformer/encoderblock_0/"
    block = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    assert sorted(block.items()) == [
        ("LayerNorm_0/bias", (768,)),
        ("LayerNorm_0/scale", (768,)),
        ("LayerNorm_1/bias", (768,)),
        ("LayerNorm_1/scale", (768,)),
        ("MlpBlock_0/Dense_0/bias", (3072,)),
        ("MlpBlock_0/Dense_0/kernel", (768, 3072)),
        ("MlpBlock_0/Dense_1/bias", (768,)),
        ("MlpBlock_0/Dense_1/kernel", (3072, 768)),
        ("MultiHeadDotProductAttention_0/key/bias", (12, 64)),
        ("MultiHeadDotProductAttention_0/key/kernel", (768, 12, 64)),
        ("MultiHeadDotProductAttention_0/out/bias", (768,)),
        ("MultiHeadDotProductAttention_0/out/kernel", (12, 64, 768)),
        ("MultiHeadDotProductAttention_0/query/bias", (12, 64)),
        ("MultiHeadDotProductAttention_0/query/kernel", (768, 12, 64)),
        ("MultiHeadDotProductAttention_0/value/bias", (12, 64)),
        ("MultiHeadDotProductAttention_0/value/kernel", (768, 12, 64)),
    ]
    blocks = {k.split("/")[1] for k in shapes if "encoderblock" in k}
    assert blocks == {f"encoderblock_{i}" for i in range(12)}
    assert count_params(_abstract_params(vit.create("vit_b16", num_classes=1000))) == 86_567_656


@pytest.mark.parametrize(("name", "pool"), sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name, pool):
    model = vit.create(name, num_classes=1000, pool=pool)
    assert count_params(_abstract_params(model)) == PUBLISHED_COUNTS[(name, pool)]


def test_vit_jax_testing_model_count():
    model = vit.VisionTransformer(
        num_classes=1000, patch_size=16, hidden_size=10, depth=1, mlp_dim=10, num_heads=2
    )
    assert count_params(_abstract_params(model)) == TESTING_COUNT


def test_gap_has_no_cls_and_headless_has_no_head_and_pre_logits_adds_a_dense():
    tok = _shapes(_abstract_params(vit.create("vit_s16", num_classes=10)))
    gap = _shapes(_abstract_params(vit.create("vit_s16", num_classes=10, pool="gap")))
    assert "cls" not in gap
    assert gap["Transformer/posembed_input/pos_embedding"] == (1, 196, 384)
    assert tok.keys() - gap.keys() == {"cls"}
    headless = _shapes(_abstract_params(vit.create("vit_s16")))
    assert tok.keys() - headless.keys() == {"head/kernel", "head/bias"}
    rep = _shapes(_abstract_params(vit.create("vit_s16", num_classes=10, representation_size=7)))
    assert rep["pre_logits/kernel"] == (384, 7)
    assert rep["head/kernel"] == (7, 10)


# ---------------------------------------------------------------------------------------------
# Names.


def test_names_and_parse_name():
    assert vit.parse_name("vit_b16") == ("b", 16)
    assert vit.parse_name("vit_ti16") == ("ti", 16)
    assert vit.parse_name("vit_tiny4") == ("tiny", 4)
    assert vit.parse_name("vit_h14") == ("h", 14)
    assert len(vit.NAMES) == 6 * 4 + 4
    assert {"vit_b16", "vit_l14", "vit_s32", "vit_tiny2", "vit_tiny16"} <= set(vit.NAMES)
    assert "vit_tiny14" not in vit.NAMES and "vit_b4" not in vit.NAMES
    m = vit.create("vit_l14", num_classes=5, pool="gap")
    assert (m.hidden_size, m.depth, m.mlp_dim, m.num_heads, m.patch_size) == (
        1024,
        24,
        4096,
        16,
        14,
    )
    assert (m.num_classes, m.pool) == (5, "gap")


@pytest.mark.parametrize("name", ["vit_q16", "vit_b15", "vit_tiny14", "b16", "vit_b", "vit_b16x"])
def test_unknown_name_lists_valid_choices(name):
    with pytest.raises(ValueError, match="unknown ViT backbone") as err:
        vit.create(name)
    message = str(err.value)
    assert repr(name) in message
    assert "['ti', 's', 'b', 'l', 'h', 'g', 'tiny']" in message
    assert "[8, 14, 16, 32]" in message


# ---------------------------------------------------------------------------------------------
# Tiny model: init and forward pass against a plain-numpy reimplementation.


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (B, IMAGE, IMAGE, 3)), jnp.float32)


def _random_params(model, seed, image_size=IMAGE):
    """Random parameters of ``model``'s exact tree, drawn with numpy.

    Real ``model.init`` costs seconds of XLA compilation on CPU, so only the init test uses it.
    Unlike the real init, cls and head are non-zero here, so every path matters.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1]
        if name == "scale":
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        elif name == "kernel":
            attention_in = path[-2] in ("query", "key", "value")
            fan_in = leaf.shape[0] if attention_in else math.prod(leaf.shape[:-1])
            value = rng.normal(size=leaf.shape) / math.sqrt(fan_in)
        else:  # biases, cls, position embedding
            value = 0.3 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    flat = traverse_util.flatten_dict(_abstract_params(model, image_size))
    return traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})


def _tiny(pool="tok", num_classes=5, seed=0, **kw):
    model = vit.create(f"vit_tiny{PATCH}", num_classes=num_classes, pool=pool, **kw)
    return model, _random_params(model, seed)


def _prompts(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_init_follows_vit_jax():
    model = vit.create("vit_tiny4", num_classes=7, head_bias_init=-4.6)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((D, 7)))
    np.testing.assert_allclose(params["head"]["bias"], np.full((7,), -4.6), rtol=1e-6)
    np.testing.assert_array_equal(params["cls"], np.zeros((1, 1, D)))
    posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    assert posemb.shape == (1, 1 + 16 * 16, D)
    assert abs(posemb.std() - 0.02) < 0.002 and abs(posemb.mean()) < 0.002
    block = params["Transformer"]["encoderblock_0"]
    mlp = block["MlpBlock_0"]["Dense_0"]
    bound = math.sqrt(6 / (D + 128))  # xavier_uniform, fan_in 64, fan_out 128
    kernel = np.abs(np.asarray(mlp["kernel"]))
    assert kernel.max() <= bound and kernel.max() > 0.95 * bound
    assert 0 < np.abs(np.asarray(mlp["bias"])).max() < 1e-5  # normal(1e-6)
    query = np.abs(np.asarray(block["MultiHeadDotProductAttention_0"]["query"]["kernel"]))
    bound = math.sqrt(6 / (D + D))  # fans of the flattened (D, H * D/H) kernel
    assert query.max() <= bound and query.max() > 0.95 * bound
    np.testing.assert_array_equal(block["LayerNorm_0"]["scale"], np.ones(D))
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x):  # flax's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _block(x, p):
    att = p["MultiHeadDotProductAttention_0"]
    y = _layer_norm(x, p["LayerNorm_0"])
    q, k, v = (
        np.einsum("btd,dhk->bthk", y, att[n]["kernel"]) + att[n]["bias"]
        for n in ("query", "key", "value")
    )
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhqs,bshk->bqhk", weights, v)
    x = x + np.einsum("bqhk,hkd->bqd", y, att["out"]["kernel"]) + att["out"]["bias"]
    mlp = p["MlpBlock_0"]
    y = _layer_norm(x, p["LayerNorm_1"])
    y = _gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    return x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def _reference(params, images, pool="tok", prompts=None, deep=None, position="after_cls"):
    """The ViT written out in numpy, with VPT/PGN prompt insertion as METHODS.md describes."""
    p = _np(params)
    images = np.asarray(images, np.float64)
    n, h, w, _ = images.shape
    g = PATCH
    patches = images.reshape(n, h // g, g, w // g, g, 3).transpose(0, 1, 3, 2, 4, 5)
    kernel = p["embedding"]["kernel"].reshape(g * g * 3, -1)
    x = patches.reshape(n, -1, g * g * 3) @ kernel + p["embedding"]["bias"]
    num_cls = 0
    if pool == "tok":
        x = np.concatenate([np.tile(p["cls"], (n, 1, 1)), x], axis=1)
        num_cls = 1
    x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
    start = num_cls if position == "after_cls" else x.shape[1]
    if deep is not None:
        prompts = deep[0]
    num_prompts = 0
    if prompts is not None:
        prompts = np.asarray(prompts, np.float64)
        num_prompts = prompts.shape[1]
        x = np.concatenate([x[:, :start], prompts, x[:, start:]], axis=1)
    for i in range(DEPTH):
        if deep is not None and i > 0:
            x[:, start : start + num_prompts] = np.asarray(deep[i], np.float64)
        x = _block(x, p["Transformer"][f"encoderblock_{i}"])
    x = _layer_norm(x, p["Transformer"]["encoder_norm"])
    if pool == "tok":
        pooled = x[:, 0]
    else:
        pooled = np.delete(x, np.arange(start, start + num_prompts), axis=1).mean(1)
    return pooled @ p["head"]["kernel"] + p["head"]["bias"], x


CASES = {
    "no_prompts": {},
    "shallow_after_cls": {"prompts": (P,)},
    "shallow_end": {"prompts": (P,), "position": "end"},
    "deep_after_cls": {"deep": (P,)},
    "deep_end": {"deep": (P,), "position": "end"},
}


@pytest.mark.parametrize("pool", ["tok", "gap"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_numpy_reference(images, pool, case):
    model, params = _tiny(pool)
    spec = CASES[case]
    position = spec.get("position", "after_cls")
    kwargs, ref_kwargs = {"prompt_position": position}, {"position": position}
    if "prompts" in spec:
        kwargs["prompt_tokens"] = ref_kwargs["prompts"] = _prompts(3, (B, P, D))
    if "deep" in spec:
        kwargs["deep_prompts"] = ref_kwargs["deep"] = _prompts(4, (DEPTH, B, P, D))
    logits, out = model.apply({"params": params}, images, **kwargs)
    ref_logits, ref_encoded = _reference(params, images, pool, **ref_kwargs)
    num_prompts = P if ("prompts" in spec or "deep" in spec) else 0
    assert out["encoded"].shape == (B, (pool == "tok") + num_prompts + NUM_PATCHES, D)
    np.testing.assert_allclose(out["encoded"], ref_encoded, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=2e-4)
    assert np.abs(ref_logits).max() > 0.1  # the comparison is not between near-zeros


def test_headless_model_returns_pre_logits_with_representation(images):
    model = vit.create("vit_tiny4", representation_size=12)
    params = _random_params(model, 0)
    logits, out = model.apply({"params": params}, images)
    assert logits.shape == (B, 12)
    np.testing.assert_array_equal(logits, out["features"])
    dense = params["pre_logits"]
    expected = np.tanh(out["encoded"][:, 0] @ dense["kernel"] + dense["bias"])
    np.testing.assert_allclose(logits, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Prompt semantics, checked on the inputs the blocks actually receive.


def _block_io(model, params, images, **kwargs):
    """Runs the model recording each block's input and output: {name: (input, output)}."""
    seen = {}

    def record(next_fun, args, kw, context):
        result = next_fun(*args, **kw)
        if isinstance(context.module, vit.Encoder1DBlock) and context.method_name == "__call__":
            seen[context.module.name] = (args[0], result)
        return result

    with nn.intercept_methods(record):
        logits, out = model.apply({"params": params}, images, **kwargs)
    return logits, out, seen


def _embedded(params, images):
    """Patch embeddings (B, N, D) computed directly from the conv weights."""
    x = jax.lax.conv_general_dilated(
        images,
        params["embedding"]["kernel"],
        (PATCH, PATCH),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return (x + params["embedding"]["bias"]).reshape(B, -1, D)


@pytest.mark.parametrize("position", ["after_cls", "end"])
def test_shallow_prompts_carry_no_position_embedding(images, position):
    model, params = _tiny("tok")
    prompts = _prompts(3, (B, P, D))
    _, _, io = _block_io(model, params, images, prompt_tokens=prompts, prompt_position=position)
    x0 = io["encoderblock_0"][0]
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert x0.shape == (B, 1 + P + NUM_PATCHES, D)
    at = slice(1, 1 + P) if position == "after_cls" else slice(1 + NUM_PATCHES, None)
    patches = slice(1 + P, None) if position == "after_cls" else slice(1, 1 + NUM_PATCHES)
    np.testing.assert_array_equal(x0[:, at], prompts)  # exactly the prompts, nothing added
    np.testing.assert_allclose(x0[:, 0], (params["cls"] + posemb[:, 0])[0].repeat(B, 0))
    np.testing.assert_allclose(
        x0[:, patches], _embedded(params, images) + posemb[:, 1:], atol=1e-5, rtol=1e-5
    )


def test_prompt_position_only_permutes_the_sequence(images):
    # Prompts carry no position embedding and attention has no positional bias, so moving them
    # from after the CLS token to the end permutes the tokens and leaves CLS unchanged.
    model, params = _tiny("tok")
    prompts = _prompts(3, (B, P, D))
    first, out_first = model.apply({"params": params}, images, prompt_tokens=prompts)
    last, out_last = model.apply(
        {"params": params}, images, prompt_tokens=prompts, prompt_position="end"
    )
    np.testing.assert_allclose(first, last, atol=1e-5)
    np.testing.assert_allclose(
        out_first["encoded"][:, 1 : 1 + P], out_last["encoded"][:, 1 + NUM_PATCHES :], atol=1e-5
    )
    plain, _ = model.apply({"params": params}, images)
    assert np.abs(np.asarray(first - plain)).max() > 1e-3  # the prompts do change the output


@pytest.mark.parametrize("position", ["after_cls", "end"])
def test_deep_prompts_overwrite_previous_layer_outputs(images, position):
    model, params = _tiny("tok")
    deep = _prompts(4, (DEPTH, B, P, D))
    logits, _, io = _block_io(model, params, images, deep_prompts=deep, prompt_position=position)
    at = slice(1, 1 + P) if position == "after_cls" else slice(1 + NUM_PATCHES, None)
    x0, y0 = io["encoderblock_0"]
    x1, _ = io["encoderblock_1"]
    np.testing.assert_array_equal(x0[:, at], deep[0])
    np.testing.assert_array_equal(x1[:, at], deep[1])  # overwritten, not added
    # Layer 0's outputs at the prompt positions would be thrown away, so it computes none there;
    # everything else is carried over.
    assert y0.shape == (B, 1 + NUM_PATCHES, D)
    rest = np.ones(x1.shape[1], bool)
    rest[at] = False
    np.testing.assert_array_equal(x1[:, rest], y0)

    changed = deep.at[1].set(_prompts(5, (B, P, D)))
    other = model.apply({"params": params}, images, deep_prompts=changed, prompt_position=position)
    assert np.abs(np.asarray(other[0] - logits)).max() > 1e-3


def _every_row_forward(model, params, images, deep=None):
    """``(logits, encoded)`` of the tiny "tok" ViT as the official VPT code runs it, from the
    module's own blocks: every block computes every row, the deep prompts overwrite theirs."""
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    cls = jnp.tile(params["cls"], (B, 1, 1))
    x = jnp.concatenate([cls, _embedded(params, images)], axis=1) + posemb
    if deep is not None:
        x = jnp.concatenate([x[:, :1], deep[0], x[:, 1:]], axis=1)
    block = vit.Encoder1DBlock(mlp_dim=model.mlp_dim, num_heads=model.num_heads)
    for i in range(DEPTH):
        if i and deep is not None:
            x = x.at[:, 1 : 1 + P].set(deep[i])
        p = params["Transformer"][f"encoderblock_{i}"]
        x = block.apply({"params": p}, x, deterministic=True)
    norm = nn.LayerNorm(epsilon=1e-6).apply({"params": params["Transformer"]["encoder_norm"]}, x)
    head = params["head"]
    return norm[:, 0] @ head["kernel"] + head["bias"], norm


def test_deep_prompts_equal_manual_loop_over_the_modules_blocks(images):
    model, params = _tiny("tok")
    deep = _prompts(4, (DEPTH, B, P, D))
    logits, out = model.apply({"params": params}, images, deep_prompts=deep)
    expected_logits, expected_encoded = _every_row_forward(model, params, images, deep)
    np.testing.assert_allclose(out["encoded"], expected_encoded, atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)


def test_skipping_discarded_rows_keeps_the_gradients(images):
    # The model computes no outputs where they are discarded (deep prompt rows before their
    # overwrite, all but the CLS row in the last block); the gradients a prompt gets, through
    # the tokens or through the pixels (VP), are those of computing every row.
    model, params = _tiny("tok")
    deep = _prompts(4, (DEPTH, B, P, D))

    def loss(forward, deep, images):
        return jnp.sum(jnp.sin(3.0 * forward(deep, images)))

    def skipping(deep, images):
        return model.apply({"params": params}, images, deep_prompts=deep)[0]

    def every_row(deep, images):
        return _every_row_forward(model, params, images, deep)[0]

    def compiled_grad(forward):
        step = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
        return step.lower(forward, deep, images).compile()

    skipping_grad, every_row_grad = compiled_grad(skipping), compiled_grad(every_row)
    grads, expected = skipping_grad(deep, images), every_row_grad(deep, images)
    for got, want in zip(grads, expected, strict=True):
        assert np.abs(want).max() > 1e-3  # not a comparison of near-zeros
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)

    # What it skips: the compiled gradient does less work than computing every row.
    flops = [grad.cost_analysis()["flops"] for grad in (skipping_grad, every_row_grad)]
    assert flops[0] < 0.9 * flops[1], flops


@pytest.mark.parametrize("position", ["after_cls", "end"])
def test_gap_pool_excludes_prompts(images, position):
    model, params = _tiny("gap")
    prompts = _prompts(3, (B, P, D))
    _, out = model.apply(
        {"params": params}, images, prompt_tokens=prompts, prompt_position=position
    )
    encoded = np.asarray(out["encoded"])
    assert encoded.shape == (B, P + NUM_PATCHES, D)
    patches = encoded[:, P:] if position == "after_cls" else encoded[:, :NUM_PATCHES]
    np.testing.assert_allclose(out["features"], patches.mean(1), atol=1e-6)
    assert np.abs(encoded.mean(1) - patches.mean(1)).max() > 1e-3


R = 2  # register tokens


@pytest.mark.parametrize("position", ["after_cls", "end"])
def test_registers_prompts_and_gap_rows(images, position):
    # DINOv2's layout: [CLS + posemb, registers (no posemb), patches + posemb]; VPT's prompts go
    # after the CLS and register tokens, PGN's at the end; "gap" averages the patches alone.
    model, params = _tiny("gap", class_token=True, num_registers=R, layerscale=True)
    deep = _prompts(3, (DEPTH, B, P, D))
    _, out, io = _block_io(model, params, images, deep_prompts=deep, prompt_position=position)
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    at = slice(1 + R, 1 + R + P) if position == "after_cls" else slice(1 + R + NUM_PATCHES, None)
    patches = slice(1 + R + P, None) if position == "after_cls" else slice(1 + R, -P)
    x0, x1 = io["encoderblock_0"][0], io["encoderblock_1"][0]
    np.testing.assert_allclose(x0[:, 0], (params["cls"] + posemb[:, 0])[0].repeat(B, 0))
    np.testing.assert_array_equal(x0[:, 1 : 1 + R], params["registers"][0][None].repeat(B, 0))
    np.testing.assert_array_equal(x0[:, at], deep[0])
    np.testing.assert_array_equal(x1[:, at], deep[1])
    np.testing.assert_allclose(
        x0[:, patches], _embedded(params, images) + posemb[:, 1:], atol=1e-5, rtol=1e-5
    )
    encoded = np.asarray(out["encoded"])
    np.testing.assert_allclose(out["features"], encoded[:, patches].mean(1), atol=1e-6)
    # The prompts' place among the position-free tokens changes no output.
    other = "end" if position == "after_cls" else "after_cls"
    _, out_other = model.apply({"params": params}, images, deep_prompts=deep, prompt_position=other)
    np.testing.assert_allclose(out_other["features"], out["features"], atol=1e-5)
    np.testing.assert_allclose(out_other["encoded"][:, 0], encoded[:, 0], atol=1e-5)


def test_layerscale_and_swiglu_change_the_blocks_as_dinov2(images):
    model, params = _tiny("tok", class_token=True, layerscale=True, ffn="swiglu", mlp_dim=48)
    block = params["Transformer"]["encoderblock_0"]
    assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (D, 2 * 48)
    assert block["MlpBlock_0"]["Dense_1"]["kernel"].shape == (48, D)
    x = _prompts(6, (B, 5, D))
    mlp = vit.MlpBlock(mlp_dim=48, ffn="swiglu")
    dense = block["MlpBlock_0"]
    hidden = x @ dense["Dense_0"]["kernel"] + dense["Dense_0"]["bias"]
    gate, up = hidden[..., :48], hidden[..., 48:]
    want = (gate / (1 + np.exp(-gate)) * up) @ dense["Dense_1"]["kernel"] + dense["Dense_1"]["bias"]
    got = mlp.apply({"params": dense}, x, deterministic=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # LayerScale scales each branch before the residual: a zero scale makes the block identity.
    zero = jax.tree.map(np.zeros_like, {k: block[k] for k in ("LayerScale_0", "LayerScale_1")})
    layer = vit.Encoder1DBlock(mlp_dim=48, num_heads=2, ffn="swiglu", layerscale=True)
    np.testing.assert_array_equal(layer.apply({"params": {**block, **zero}}, x, True), x)


def test_prompt_argument_errors(images):
    model, params = _tiny("tok")
    variables = {"params": params}
    good = jnp.zeros((B, P, D))
    with pytest.raises(ValueError, match="not both"):
        model.apply(variables, images, prompt_tokens=good, deep_prompts=good[None].repeat(DEPTH, 0))
    with pytest.raises(
        ValueError, match=r"prompt_tokens: expected .*\(2, 'p', 64\), got \(2, 3, 32\)"
    ):
        model.apply(variables, images, prompt_tokens=jnp.zeros((B, P, 32)))
    with pytest.raises(ValueError, match=r"prompt_tokens: expected .* got \(3, 3, 64\)"):
        model.apply(variables, images, prompt_tokens=jnp.zeros((B + 1, P, D)))
    with pytest.raises(ValueError, match=r"prompt_tokens: expected .* got \(3, 64\)"):
        model.apply(variables, images, prompt_tokens=jnp.zeros((P, D)))
    with pytest.raises(
        ValueError, match=r"deep_prompts: expected .*\(2, 2, 'p', 64\), got \(3, 2, 3, 64\)"
    ):
        model.apply(variables, images, deep_prompts=jnp.zeros((DEPTH + 1, B, P, D)))
    with pytest.raises(ValueError, match="unknown prompt_position 'middle'"):
        model.apply(variables, images, prompt_tokens=good, prompt_position="middle")


# ---------------------------------------------------------------------------------------------
# dtype and dropout.


def test_bfloat16_compute_keeps_float32_params(images):
    model, params = _tiny("tok")
    model16 = model.clone(dtype=jnp.bfloat16)
    init16 = _abstract_params(model16, IMAGE)
    assert {leaf.dtype for leaf in jax.tree.leaves(init16)} == {jnp.dtype(jnp.float32)}
    logits32, _ = model.apply({"params": params}, images)
    logits16, out16 = model16.apply({"params": params}, images)
    assert out16["encoded"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits16, np.float32), logits32, atol=0.1, rtol=0.05)


def test_dropout_only_in_training(images):
    model, params = _tiny("tok", dropout_rate=0.3, attention_dropout_rate=0.3)
    variables = {"params": params}
    plain, _ = _tiny("tok")[0].apply(variables, images)
    evaluated, _ = model.apply(variables, images)
    np.testing.assert_array_equal(evaluated, plain)
    rngs = {"dropout": jax.random.key(5, impl="rbg")}  # rbg: compiles fast
    trained, _ = model.apply(variables, images, train=True, rngs=rngs)
    assert np.abs(np.asarray(trained - plain)).max() > 1e-3


@pytest.mark.parametrize("attention", ["heads_major", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_jax_dot_product_attention(causal, attention):
    # The heads-major layout must compute exactly what jax's reference attention computes from
    # the same q/k/v projections (flax's (B, T, H, D/H) layout), causal mask included; and so
    # must the module when it calls that function itself.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 32))
    attention = vit.MultiHeadDotProductAttention(num_heads=4, causal=causal, attention=attention)
    params = attention.init(jax.random.PRNGKey(1), x, deterministic=True)["params"]
    q, k, v = (
        jnp.einsum("btd,dhk->bthk", x, params[n]["kernel"]) + params[n]["bias"]
        for n in ("query", "key", "value")
    )
    y = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    expected = jnp.einsum("bthk,hkd->btd", y, params["out"]["kernel"]) + params["out"]["bias"]
    got = attention.apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "causal, attention", [(False, "heads_major"), (True, "heads_major"), (False, "xla")]
)
def test_attention_query_rows_are_those_rows_of_the_full_attention(causal, attention):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 32))
    attention = vit.MultiHeadDotProductAttention(num_heads=4, causal=causal, attention=attention)
    params = attention.init(jax.random.PRNGKey(1), x, deterministic=True)["params"]
    full = attention.apply({"params": params}, x, deterministic=True)
    rows = ((0, 2), (4, 7))
    some = attention.apply({"params": params}, x, deterministic=True, query_rows=rows)
    np.testing.assert_allclose(some, full[:, [0, 1, 4, 5, 6]], atol=1e-6)


def test_dot_product_attention_refuses_what_it_cannot_compute():
    x = jnp.zeros((2, 7, 32))
    params = vit.MultiHeadDotProductAttention(num_heads=4).init(
        jax.random.PRNGKey(1), x, deterministic=True
    )
    dropout = vit.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.1, attention="xla")
    rngs = {"dropout": jax.random.key(0)}
    with pytest.raises(ValueError, match="attention='xla' takes no attention dropout"):
        dropout.apply(params, x, deterministic=False, rngs=rngs)
    dropout.apply(params, x, deterministic=True)  # evaluation has no dropout: fine
    causal = vit.MultiHeadDotProductAttention(num_heads=4, causal=True, attention="xla")
    with pytest.raises(ValueError, match="no causal mask for query_rows"):
        causal.apply(params, x, deterministic=True, query_rows=((0, 2),))
    unknown = vit.MultiHeadDotProductAttention(num_heads=4, attention="flash")
    with pytest.raises(ValueError, match=r"unknown attention 'flash'; valid choices: \("):
        unknown.apply(params, x, deterministic=True)


def test_vpt_deep_through_dot_product_attention_has_the_same_output_and_gradients(images):
    # The whole model, discarded rows skipped, with jax.nn.dot_product_attention's layout.
    model, params = _tiny("tok")
    deep = _prompts(4, (DEPTH, B, P, D))

    def loss_and_grad(attention):
        def loss(deep):
            logits = model.clone(attention=attention).apply(
                {"params": params}, images, deep_prompts=deep
            )[0]
            return jnp.sum(jnp.sin(3.0 * logits))

        return jax.jit(jax.value_and_grad(loss))(deep)

    (value, grad), (expected_value, expected_grad) = map(loss_and_grad, ("xla", "heads_major"))
    np.testing.assert_allclose(value, expected_value, rtol=1e-4)  # two attention programs
    assert np.abs(expected_grad).max() > 1e-3
    np.testing.assert_allclose(grad, expected_grad, atol=2e-5, rtol=1e-4)


def test_rows_without_and_take_rows():
    assert vit.rows_without(10, 1, 3) == ((0, 1), (4, 10))
    assert vit.rows_without(10, 0, 3) == ((3, 10),)
    assert vit.rows_without(10, 7, 3) == ((0, 7),)
    x = jnp.arange(10)[None]
    np.testing.assert_array_equal(vit.take_rows(x, ((0, 1), (4, 10))), [[0, 4, 5, 6, 7, 8, 9]])
    assert vit.take_rows(x, None) is x


def test_attention_params_are_flax_dense_general_ones():
    # Same names, shapes and initialisation as flax's own attention, whose tree the checkpoints use.
    x = jnp.zeros((1, 5, 32))
    ours = vit.MultiHeadDotProductAttention(num_heads=4).init(
        jax.random.PRNGKey(3), x, deterministic=True
    )
    theirs = nn.MultiHeadDotProductAttention(
        num_heads=4, kernel_init=nn.initializers.xavier_uniform()
    ).init(jax.random.PRNGKey(3), x)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_pixel_prompt_is_the_prompted_images_output_and_gradient(images):
    # VP's prompt, embedded once for the batch: the model's output, and the prompt's gradient,
    # are those of images + prompt.
    model, params = _tiny("tok")
    prompt = _prompts(6, images.shape[1:])

    def loss(prompt, shared: bool):
        kwargs = {"pixel_prompt": prompt} if shared else {}
        pixels = images if shared else images + prompt
        logits, _ = model.apply({"params": params}, pixels, **kwargs)
        return jnp.sum(jnp.sin(3.0 * logits))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (value, grad), (expected_value, expected) = (value_and_grad(prompt, s) for s in (True, False))
    np.testing.assert_allclose(value, expected_value, rtol=1e-4)  # two attention programs
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(grad, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"pixel_prompt: expected shape \(H, W, 3\)"):
        model.apply({"params": params}, images, pixel_prompt=prompt[:8])


@pytest.mark.parametrize("size, use_bias", [(32, True), (35, False)])  # 35: a dropped border
def test_patch_embedding_is_the_patch_convolution(size, use_bias):
    images = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
    embedding = vit.PatchEmbedding(16, 8, use_bias=use_bias)
    params = embedding.init(jax.random.PRNGKey(1), images)
    conv = nn.Conv(16, (8, 8), strides=(8, 8), padding="VALID", use_bias=use_bias)
    # Same parameter names, shapes and initialisation as the convolution it replaces.
    jax.tree.map(np.testing.assert_array_equal, params, conv.init(jax.random.PRNGKey(1), images))
    if use_bias:  # a non-zero bias, so that adding it is checked too
        params = jax.tree.map(lambda x: x + 0.1, params)
    expected = conv.apply(params, images).reshape(2, -1, 16)
    np.testing.assert_allclose(embedding.apply(params, images), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The MLP activation: tanh GELU (vit_jax), exact GELU (PyTorch-trained weights), quick_gelu (CLIP).


def test_gelu_exact_is_the_erf_gelu_and_differs_from_the_tanh_one():
    x = 1.5
    exact = 0.5 * x * (1 + math.erf(x / math.sqrt(2)))
    assert float(vit.ACTIVATIONS["gelu_exact"](jnp.float32(x))) == pytest.approx(exact, abs=1e-6)
    assert float(vit.ACTIVATIONS["gelu_tanh"](jnp.float32(x))) == pytest.approx(_gelu(x), abs=1e-6)
    assert exact - _gelu(x) == pytest.approx(2.176e-4, rel=1e-3)  # far above float32 rounding
    xs = jnp.linspace(-5, 5, 101)
    np.testing.assert_array_equal(vit.gelu_exact(xs), jax.nn.gelu(xs, approximate=False))
    block = vit.MlpBlock(mlp_dim=4, activation="gelu")
    with pytest.raises(
        ValueError, match=r"unknown activation 'gelu'; valid choices: \['gelu_tanh', 'gelu_exact'"
    ):
        block.init(jax.random.key(0), jnp.zeros((1, 2)), deterministic=True)


def test_exact_gelu_vit_matches_a_pytorch_vit_and_tanh_gelu_does_not(images, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch_reference

    exact, params = _tiny("tok", num_classes=0, activation="gelu_exact")
    twin = torch_reference.ViT(exact, IMAGE).eval()
    twin.load_state_dict(torch_reference.state_dict(exact, params))
    assert twin.blocks[0].activation is torch.nn.functional.gelu  # approximate="none"
    with torch.no_grad():
        expected = twin(torch.tensor(np.asarray(images).transpose(0, 3, 1, 2))).numpy()
    assert np.abs(expected).max() > 0.5
    # The same weights with flax's default tanh GELU too, in one compiled program.
    modules = (exact, exact.clone(activation="gelu_tanh"))
    forward = jax.jit(lambda params: [m.apply({"params": params}, images)[0] for m in modules])
    got, tanh = forward(params)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(tanh) - expected).max() > 1e-4  # measured 4.5e-4


def _built_backbone(config):
    """``backbones.build(config)``'s backbone, its weights only traced (``jax.eval_shape``)."""
    built = []

    def build(rng):
        built.append(backbones.build(config, image_size=IMAGE, rng=rng))
        return built[0][1]

    jax.eval_shape(build, jax.random.key(0))
    return built[0][0]


def test_backbone_activation_defaults_to_the_checkpoint_family_and_reaches_the_modules(
    monkeypatch,
):
    assert backbones.activation(backbones.default_config("vit_b16")) == "gelu_tanh"
    assert backbones.activation(backbones.default_config("clip_b32")) == "quick_gelu"
    assert _built_backbone(backbones.default_config("vit_tiny4")).module.activation == "gelu_tanh"
    # CLIP's build reads its logit scale as a number: zero weights of the right shapes instead.
    init = clip.init_params

    def zeros(name, rng, *, image_size):
        shapes = jax.eval_shape(functools.partial(init, name, image_size=image_size), rng)
        return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)

    monkeypatch.setattr(clip, "init_params", zeros)
    config = backbones.default_config("clip_tiny4", activation="gelu_exact")
    assert backbones.activation(config) == "gelu_exact"
    backbone = _built_backbone(config)
    # open_clip builds both towers with one activation, so the text tower follows.
    assert (backbone.module.activation, backbone.text.module.activation) == ("gelu_exact",) * 2
    with pytest.raises(
        ValueError,
        match=r"unknown backbone.activation 'gelu'; valid choices: "
        r"\['', 'gelu_tanh', 'gelu_exact', 'quick_gelu'\]",
    ):
        _built_backbone(backbones.default_config("vit_tiny4", activation="gelu"))
