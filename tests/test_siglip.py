"""SigLIP's image tower from big_vision's ``.npz`` naming: numerical parity with transformers.

The reference is transformers' ``SiglipVisionModel`` (a tiny config, random weights), written
under big_vision's names as the inverse of transformers' ``convert_siglip_to_hf.py`` (kernels
transposed, attention split into heads, ``MAPHead_0``'s ``nn.MultiheadAttention`` ``in_proj``
split into query, key and value), with scanned encoder blocks and the text tower's keys beside
it, as the two-towers files hold them. They skip without torch or transformers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt.errors import InputError, MissingFileError
from jprompt.methods import heads
from jprompt.models import backbones, siglip, siglip_checkpoint, siglip_tokenizer

NAME = "siglip_tiny4"
SPEC = siglip.VARIANTS[NAME]
WIDTH, HEADS = SPEC.hidden_size, SPEC.num_heads
TEXT = siglip.TEXT_VARIANTS[NAME]


def _reference(torch, transformers):
    vision = dict(
        hidden_size=WIDTH,
        intermediate_size=SPEC.mlp_dim,
        num_hidden_layers=SPEC.depth,
        num_attention_heads=HEADS,
        image_size=SPEC.image_size,
        patch_size=SPEC.patch_size,
    )
    text = dict(
        vocab_size=TEXT.vocab_size,
        hidden_size=TEXT.hidden_size,
        intermediate_size=TEXT.mlp_dim,
        num_hidden_layers=TEXT.depth,
        num_attention_heads=TEXT.num_heads,
        max_position_embeddings=TEXT.context_length,
        projection_size=TEXT.embed_dim,
        bos_token_id=0,
        eos_token_id=1,
    )
    config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    model = transformers.SiglipModel(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LayerNorms leave 1 and biases 0
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _dense(weight, bias, heads: int = 0, heads_in=False) -> dict:
    """A torch Linear -> a flax Dense, or with ``heads`` a DenseGeneral with its heads split out:
    query, key and value (D, H, D/H), or with ``heads_in`` out (H, D/H, D)."""
    kernel = weight.T
    if heads and heads_in:
        kernel = kernel.reshape(heads, -1, kernel.shape[-1])
    elif heads:
        kernel, bias = kernel.reshape(kernel.shape[0], heads, -1), bias.reshape(heads, -1)
    return {"kernel": kernel, "bias": bias}


def _big_vision_npz(model, path) -> None:
    """``model``'s weights under big_vision's SigLIP names: ``params/img`` (scanned blocks, as
    big_vision's scan=True files), ``params/txt`` (unrolled), ``params/t``, ``params/b``."""
    s = {key: value.detach().numpy() for key, value in model.state_dict().items()}

    def norm(prefix):
        return {"scale": s[f"{prefix}.weight"], "bias": s[f"{prefix}.bias"]}

    def linear(prefix, **heads):
        return _dense(s[f"{prefix}.weight"], s[f"{prefix}.bias"], **heads)

    def mlp(prefix):
        return {"Dense_0": linear(f"{prefix}.fc1"), "Dense_1": linear(f"{prefix}.fc2")}

    def block(at, heads):
        attention = {
            name: linear(f"{at}.self_attn.{short}_proj", heads=heads)
            for name, short in (("query", "q"), ("key", "k"), ("value", "v"))
        }
        attention["out"] = linear(f"{at}.self_attn.out_proj", heads=heads, heads_in=True)
        return {
            "LayerNorm_0": norm(f"{at}.layer_norm1"),
            "MultiHeadDotProductAttention_0": attention,
            "LayerNorm_1": norm(f"{at}.layer_norm2"),
            "MlpBlock_0": mlp(f"{at}.mlp"),
        }

    v, t = "vision_model", "text_model"
    blocks = [block(f"{v}.encoder.layers.{i}", HEADS) for i in range(SPEC.depth)]
    in_weights = np.split(s[f"{v}.head.attention.in_proj_weight"], 3)
    in_biases = np.split(s[f"{v}.head.attention.in_proj_bias"], 3)
    pooling = {
        name: _dense(weight, bias, heads=HEADS)
        for name, weight, bias in zip(("query", "key", "value"), in_weights, in_biases, strict=True)
    }
    pooling["out"] = linear(f"{v}.head.attention.out_proj", heads=HEADS, heads_in=True)
    image = {
        "embedding": {
            "kernel": s[f"{v}.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
            "bias": s[f"{v}.embeddings.patch_embedding.bias"],
        },
        "pos_embedding": s[f"{v}.embeddings.position_embedding.weight"][None],
        "Transformer": {
            "encoderblock": jax.tree.map(lambda *layers: np.stack(layers), *blocks),
            "encoder_norm": norm(f"{v}.post_layernorm"),
        },
        "MAPHead_0": {
            "probe": s[f"{v}.head.probe"],
            "MultiHeadDotProductAttention_0": pooling,
            "LayerNorm_0": norm(f"{v}.head.layernorm"),
            "MlpBlock_0": mlp(f"{v}.head.mlp"),
        },
    }
    text = {
        "Embed_0": {"embedding": s[f"{t}.embeddings.token_embedding.weight"]},
        "pos_embedding": s[f"{t}.embeddings.position_embedding.weight"][None],
        "Encoder_0": {
            **{
                f"encoderblock_{i}": block(f"{t}.encoder.layers.{i}", TEXT.num_heads)
                for i in range(TEXT.depth)
            },
            "encoder_norm": norm(f"{t}.final_layer_norm"),
        },
        "head": linear(f"{t}.head"),
    }
    tree = {"img": image, "txt": text, "t": s["logit_scale"], "b": s["logit_bias"]}
    np.savez(path, **{f"params/{key}": value for key, value in _flatten(tree).items()})


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_towers_and_sigmoid_logits_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _reference(torch, transformers)
    path = tmp_path / "siglip.npz"
    _big_vision_npz(model, path)

    image, text = siglip.image_tower(NAME), siglip.text_tower(NAME)
    size = SPEC.image_size
    image_params, text_params, t, b = siglip_checkpoint.load_towers(
        path, image, text, image_size=size
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    token_ids = rng.integers(0, TEXT.vocab_size, (3, TEXT.context_length), dtype=np.int32)

    @jax.jit
    def run(images, token_ids):
        features, out = image.apply({"params": image_params}, images)
        texts = text.apply({"params": text_params}, token_ids)
        return features, out["encoded"], texts, siglip.sigmoid_logits(features, texts, t, b)

    features, encoded, texts, logits = run(images, token_ids)
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(token_ids).long(),
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
        )
    tolerance = dict(rtol=1e-4, atol=1e-5)
    vision = expected.vision_model_output
    np.testing.assert_allclose(encoded, vision.last_hidden_state.numpy(), **tolerance)
    np.testing.assert_allclose(features, vision.pooler_output.numpy(), **tolerance)
    np.testing.assert_allclose(texts, expected.text_model_output.pooler_output, **tolerance)
    np.testing.assert_allclose(logits, expected.logits_per_image.numpy(), **tolerance)


def test_map_head_reads_the_patches_wherever_the_prompts_sit():
    """Prompt tokens carry no position embedding and attention is order-blind, so the pooled
    feature is the same with the prompts first or last only if the head skips exactly them."""
    module = siglip.image_tower(NAME)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    prompts = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, WIDTH)), jnp.float32)

    @jax.jit  # one compilation for the three calls
    def run(images, prompts):
        variables = module.init(jax.random.key(0), images)
        plain, _ = module.apply(variables, images)
        first, out = module.apply(variables, images, prompt_tokens=prompts)
        last, _ = module.apply(variables, images, prompt_tokens=prompts, prompt_position="end")
        return plain, first, last, out

    plain, first, last, out = run(images, prompts)
    assert out["encoded"].shape == (2, 3 + 16, WIDTH)
    np.testing.assert_allclose(np.asarray(first), np.asarray(last), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(first) - np.asarray(plain)).max() > 1e-3  # prompts still act


def test_position_embedding_resampled_as_big_vision(tmp_path):
    """An unrolled image-tower file with a 4x4 grid whose embedding ramps down the rows, read
    at 32 pixels (8x8): bilinear zoom with corners kept gives row k the value 3k/7."""
    module = siglip.image_tower(NAME)
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    flat = {key: np.ones(value.shape, np.float32) for key, value in _flatten(params).items()}
    del flat["Transformer/posembed_input/pos_embedding"]
    rows = np.repeat(np.arange(4.0), 4)  # row index of each of the 16 grid positions
    flat["pos_embedding"] = np.tile(rows[None, :, None], (1, 1, WIDTH)).astype(np.float32)
    np.savez(tmp_path / "tower.npz", **flat)

    loaded = siglip_checkpoint.load(tmp_path / "tower.npz", module, image_size=32)
    table = loaded["Transformer"]["posembed_input"]["pos_embedding"].reshape(8, 8, WIDTH)
    expected = np.broadcast_to(3 * np.arange(8.0)[:, None, None] / 7, table.shape)
    np.testing.assert_allclose(table, expected, atol=1e-6)


def test_a_file_without_map_head_is_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "vit.npz", **{"params/cls": np.zeros((1, 1, WIDTH))})
    with pytest.raises(InputError, match=r"vit\.npz has no MAPHead_0") as error:
        siglip_checkpoint.load(tmp_path / "vit.npz", siglip.image_tower(NAME), image_size=16)
    assert "\n" not in str(error.value)


def _sentencepiece_model(tmp_path, sentencepiece):
    """A word-level SentencePiece model trained here, with c4_en's special ids."""
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(["a cat on the mat with a dog"] * 20),
        model_prefix=str(tmp_path / "sp"),
        model_type="word",
        vocab_size=10,
        hard_vocab_limit=False,
        # c4_en's special ids: pad 0, EOS 1, unk 2, no BOS
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
    )
    return tmp_path / "sp.model"


def test_tokenizer_lowercases_ends_with_eos_and_keeps_it_when_cutting(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    model_file = _sentencepiece_model(tmp_path, sentencepiece)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    cat, on, the, mat = (
        reference.PieceToId(f"\u2581{word}") for word in ("cat", "on", "the", "mat")
    )
    tokenize = siglip_tokenizer.Tokenizer(model_file, context_length=4)
    np.testing.assert_array_equal(
        tokenize(["Cat", "cat on the mat"]), [[cat, 1, 1, 1], [cat, on, the, 1]]
    )
    with pytest.raises(MissingFileError, match="there is no SentencePiece model") as error:
        siglip_tokenizer.Tokenizer(tmp_path / "none.model", context_length=4)
    assert "\n" not in str(error.value)


def test_the_zero_shot_head_reads_the_text_tower_through_the_tokenizer(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sentencepiece = pytest.importorskip("sentencepiece")
    path = tmp_path / "siglip.npz"
    _big_vision_npz(_reference(torch, transformers), path)
    model_file = _sentencepiece_model(tmp_path, sentencepiece)
    config = backbones.default_config(NAME, checkpoint=str(path), tokenizer=str(model_file))
    backbone, _ = backbones.build(
        config, image_size=SPEC.image_size, rng=jax.random.key(0), text=True
    )
    head = heads.build_zeroshot_head(
        backbone.text, ["cat", "dog"], ["a {} on the mat"], backbone_name=NAME
    )
    # By hand: the file's text tower on the tokenized prompts, unit-normed; its t as the scale.
    text = siglip.text_tower(NAME)
    _, text_params, t, _ = siglip_checkpoint.load_towers(
        path, siglip.image_tower(NAME), text, image_size=SPEC.image_size
    )
    ids = siglip_tokenizer.Tokenizer(model_file, TEXT.context_length)(
        ["a cat on the mat", "a dog on the mat"]
    )
    features = np.array(text.apply({"params": text_params}, ids))
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    np.testing.assert_allclose(head.class_embeddings, features, rtol=1e-5, atol=1e-6)
    assert head.logit_scale == pytest.approx(t)
    # Without text=True (a linear head) the backbone carries no text tower.
    linear, _ = backbones.build(config, image_size=SPEC.image_size, rng=jax.random.key(0))
    assert linear.text is None
