"""CLIP in jprompt: where prompts enter the image tower, the causal text tower, the zero-shot
head, the released CLIP PGN on the B/32 image tower, and every method trained on the tiny CLIP.

Numerical parity with PyTorch and the weight import are in test_clip_checkpoint.py.
"""

import pathlib

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt.data import presets
from jprompt.methods import heads, pgn, pgn_release
from jprompt.models import backbone, clip, clip_checkpoint, clip_tokenizer
from jprompt.train import trainer

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = "clip_tiny4"
S = 32


@pytest.fixture(scope="module")
def tiny_params():
    return clip.init_params(TINY, jax.random.PRNGKey(0))


def images(batch=2, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, S, S, 3))


def pre_norm_input(params, x, **prompts):
    """The sequence entering ``ln_pre`` (after position embedding and prompt insertion)."""
    with helpers.module_inputs(nn.LayerNorm) as seen:
        clip.image_tower(TINY).apply({"params": params["image"]}, x, **prompts)
    return seen[0]  # the first LayerNorm called is ln_pre


def embedded_patches(params, x):
    """Class token and patches plus position embedding, computed here from the parameters."""
    p = params["image"]
    patches = jax.lax.conv_general_dilated(
        x, p["embedding"]["kernel"], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).reshape(x.shape[0], -1, 64)
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, 64))
    return np.asarray(
        jnp.concatenate([cls, patches], 1) + p["Transformer"]["posembed_input"]["pos_embedding"]
    )


def test_image_tower_has_clips_architecture(tiny_params):
    image = tiny_params["image"]
    assert "bias" not in image["embedding"]  # conv1 without bias
    assert set(image["Transformer"]) >= {"pre_norm", "encoder_norm", "posembed_input"}
    assert image["proj"]["kernel"].shape == (64, 32) and "bias" not in image["proj"]
    module = clip.image_tower("clip_b32")
    assert (module.layernorm_epsilon, module.activation, module.num_heads) == (
        1e-5,
        "quick_gelu",
        12,
    )


def test_pgn_tokens_are_appended_before_ln_pre_without_position_embedding(tiny_params):
    x = images()
    tokens = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 64))
    seen = pre_norm_input(tiny_params, x, prompt_tokens=tokens, prompt_position="end")
    expected = np.concatenate([embedded_patches(tiny_params, x), np.asarray(tokens)], axis=1)
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-5)


def test_vpt_tokens_follow_the_class_token_before_ln_pre(tiny_params):
    x = images()
    tokens = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 64))
    seen = pre_norm_input(tiny_params, x, prompt_tokens=tokens, prompt_position="after_cls")
    plain = embedded_patches(tiny_params, x)
    expected = np.concatenate([plain[:, :1], np.asarray(tokens), plain[:, 1:]], axis=1)
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-5)


def test_image_features_are_the_projected_normalized_class_token(tiny_params):
    x = images()
    features, out = clip.image_tower(TINY).apply({"params": tiny_params["image"]}, x)
    proj = tiny_params["image"]["proj"]["kernel"]
    np.testing.assert_allclose(features, out["encoded"][:, 0] @ proj, rtol=1e-5, atol=1e-6)
    assert features.shape == (2, 32)


def test_text_features_are_causal_and_read_at_the_end_of_text_token(tiny_params):
    tokenizer = clip_tokenizer.load_default()
    ids = tokenizer(["a photo of a cat", "a photo of a cat"])
    end = int(np.argmax(ids[0]))
    ids[1, end + 1 :] = 123  # tokens after end-of-text must not matter (causal attention)
    module = clip.text_tower(TINY)
    features = np.asarray(module.apply({"params": tiny_params["text"]}, jnp.asarray(ids)))
    np.testing.assert_allclose(features[0], features[1], rtol=1e-5, atol=1e-6)
    ids[1, 2] = 456  # a token before it does
    changed = np.asarray(module.apply({"params": tiny_params["text"]}, jnp.asarray(ids)))
    assert np.abs(changed[1] - features[1]).max() > 1e-4


def test_class_names_and_templates_as_the_papers_code():
    assert heads.clean_class_name("Golden_Retriever") == "golden retriever"
    assert heads.clean_class_name("sea-lion") == "sea lion"
    # PGN's datamodules keep hyphens (DTD's "polka-dotted"); VP's refine_classname does not.
    assert heads.clean_class_name("Polka-dotted_x", "pgn") == "polka-dotted x"
    with pytest.raises(ValueError, match="unknown class-name rule 'coop'.*'vp', 'pgn'"):
        heads.clean_class_name("a", "coop")
    assert presets.get("cifar100").templates == ("A photo of a {}",)
    assert presets.get("cifar10").templates == ("This is a photo of a {}",)
    assert presets.get("jprompt_shapes/colors").templates == ("This is a photo of a {}",)


def test_zero_shot_head_is_scaled_cosine_of_ensembled_text_features(tiny_params):
    text = backbone.TextEncoder(
        clip.text_tower(TINY), tiny_params["text"], float(tiny_params["logit_scale"])
    )
    templates = ("a photo of a {}", "a drawing of a {}")
    head = heads.build_zeroshot_head(text, ["Red_Car", "blue"], templates, backbone_name=TINY)
    tokenizer = clip_tokenizer.load_default()
    raw = text.encode(
        tokenizer(["a photo of a red car", "a drawing of a red car", "a photo of a blue"])
    )
    unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
    red = (unit[0] + unit[1]) / np.linalg.norm(unit[0] + unit[1])
    # Encoded in batches of other sizes (other compiled programs): float32 agreement to 1e-4.
    np.testing.assert_allclose(head.class_embeddings[0], red, rtol=1e-4, atol=1e-6)

    features = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    logits = heads.apply_zeroshot_head(head.variables(), jnp.asarray(features))
    cosine = (features / np.linalg.norm(features, axis=-1, keepdims=True)) @ (
        head.class_embeddings.T
    )
    # A cosine may be near 0, so bound the error by the logits' scale, exp(logit_scale).
    scale = np.exp(tiny_params["logit_scale"])
    np.testing.assert_allclose(logits, scale * cosine, rtol=1e-5, atol=1e-5 * scale)


def test_zero_shot_head_needs_a_text_tower():
    with pytest.raises(ValueError, match="text tower.*vit_tiny4"):
        heads.build_zeroshot_head(None, ["a"], ("{}",), backbone_name="vit_tiny4")
    with pytest.raises(ValueError, match="exactly one"):
        heads.class_embeddings(None, ["a"], ("no placeholder",))


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} is absent")
def test_released_clip_pgn_runs_on_the_clip_b32_image_tower():
    params, batch_stats = pgn_release.load(FIXTURES / "pgn_clip_cifar10.pt")
    tower = clip.image_tower("clip_b32")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 224, 224, 3))
    # Any weights of the tower's shapes: drawn in numpy, which is quicker than compiling
    # and running flax's initialisation of 88M parameters.
    shapes = jax.eval_shape(tower.init, jax.random.PRNGKey(1), x[:1])["params"]
    draws = np.random.default_rng(1)
    image_params = jax.tree.map(
        lambda s: draws.normal(0.0, 0.02, s.shape).astype(np.float32), shapes
    )
    b32 = backbone.Backbone("clip_b32", tower, 224, normalization="clip")
    embeddings = np.eye(10, 512, dtype=np.float32)  # any unit rows: the head is not under test
    method = pgn.PromptGenerationNetwork(
        backbone=b32,
        num_classes=10,
        num_tokens=16,
        library_size=256,
        zeroshot=heads.ZeroShotHead(embeddings, logit_scale=float(np.log(100.0))),
    )
    # The released arrays are all the PGN trains (the zero-shot head is frozen): no rng needed.
    trained, frozen = method.from_arrays(image_params, params, batch_stats=batch_stats)
    assert pgn.count_pgn_params(trained["params"]) == 1_032_304
    logits, aux = jax.jit(method.apply)(trained, frozen, x)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    assert aux["encoded"].shape == (2, 1 + 49 + 16, 768)  # 16 tokens after the 49 patches
    np.testing.assert_allclose(aux["token_weights"].sum(-1), 1.0, rtol=1e-5)


CLIP_DEMOS = [
    ("vp.py", "demo"),
    ("vp.py", "demo,prompter=fixed_patch"),
    ("vp.py", "demo,prompter=random_patch"),
    ("vpt.py", "demo,backbone=clip_b32"),
    ("vpt.py", "demo,backbone=clip_b32,deep"),
    ("pgn.py", "demo"),
    ("pgn.py", "demo,baseline"),
    ("adavipro.py", "demo,backbone=clip_b32"),
    ("finetune.py", "demo,backbone=clip_b32"),
    ("linear_probe.py", "demo,backbone=clip_b32"),
]


@pytest.mark.parametrize("file,arg", CLIP_DEMOS)
def test_every_method_trains_on_the_tiny_clip(file, arg, shapes_data_dir):
    config = helpers.shrink(helpers.load_config(file, arg), shapes_data_dir)
    assert config.backbone.name == TINY
    experiment = trainer.create_experiment(config)
    zero_shot = config.head.name == "zeroshot"
    assert ("zeroshot_head" in experiment.frozen) == zero_shot
    assert ("head" in experiment.state["trained"]["params"]) != zero_shot
    helpers.train_with_frozen_backbone(experiment, num_steps=3)


def test_zero_shot_config_evaluates_without_training(shapes_data_dir, tmp_path):
    config = helpers.shrink(helpers.load_config("zeroshot.py", "demo"), shapes_data_dir)
    config.unlock()
    config.num_epochs = 0
    results = trainer.train_and_evaluate(config, tmp_path)
    assert results["trainable_params"] == 0 and results["total_steps"] == 0
    assert results["test"]["num_examples"] == 64 and 0.0 <= results["test"]["accuracy"] <= 1.0


def test_missing_clip_weights_say_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m jprompt.tools.convert_clip --input="):
        clip_checkpoint.load(str(tmp_path / "clip_b32.npz"), "clip_b32", image_size=224)
