"""Parity with the OFFICIAL code: LoR-VP's prompted image, EVP's shrunk image under its frame and
VFPT's Fourier prompt tokens and E2VPT's prompted ViT, as the papers' own modules computed them on
fixed small inputs (tests/fixtures/official_parity.md says how each fixture was made), against
jprompt's methods fed the same parameters. Only E2VPT's test runs a (tiny) ViT: its prompts act
inside the attention."""

import pathlib

import jax
import numpy as np
import pytest

from jprompt import methods
from jprompt.data import normalization
from jprompt.models import vit, vit_checkpoint
from jprompt.models.backbone import Backbone

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOL = dict(rtol=1e-5, atol=1e-5)


def load(name):
    with np.load(FIXTURES / f"official_{name}.npz") as data:
        return dict(data)


def build(name, image_size, normalization_name="minus_one_to_one", **options):
    backbone = Backbone(
        "vit_tiny4", vit.create("vit_tiny4", num_classes=0), image_size, normalization_name
    )
    return methods.build(name, backbone=backbone, num_classes=3, **options)


def prompter_layout(method, prompter):
    """Assert that ``prompter`` has the layout ``init`` makes (traced, not run: no compiles)."""
    made = jax.eval_shape(method.init, jax.random.PRNGKey(0), {})[0]["params"]["prompter"]
    assert jax.tree.map(np.shape, prompter) == jax.tree.map(lambda x: x.shape, made)


def normalized(image_uint8, normalization_name):
    scale, offset = normalization.affine(normalization_name)
    return image_uint8.astype(np.float32) * scale + offset


@pytest.mark.parametrize("normalization_name", ["minus_one_to_one", "imagenet"])
def test_lor_vp_matches_the_official_module(normalization_name):
    # LoR_VP.forward: normalize(x + bmm(left_bar, right_bar)), x the [0, 1] image; its ViTs
    # normalise with mean = std = 0.5 (jprompt's minus_one_to_one), its ResNets with ImageNet's.
    data = load("lor_vp")
    _, size, _, _ = data["image"].shape
    method = build("lor_vp", size, normalization_name, rank=data["A"].shape[1])
    prompter = {"B": data["B"], "A": data["A"]}  # its left_bar and right_bar
    prompter_layout(method, prompter)
    got = normalized(data["image"], normalization_name) + method.prompt(prompter)
    np.testing.assert_allclose(got, data[f"prompted_{normalization_name}"], **TOL)


def test_evp_matches_the_official_frame_and_resize():
    # main.py eval(): normalization(F.pad(image shrunk by preprocess_test, 30 zeros) + frame),
    # recorded at S = 12, p = 2 (the image shrunk to 8) with CLIP's normalisation.
    data = load("evp")
    _, size, _, _ = data["image"].shape
    frame, p = data["frame"], 2
    method = build("evp", size, "clip", prompt_size=p)
    strips = {
        "pad_up": frame[:p],
        "pad_down": frame[size - p :],
        "pad_left": frame[p : size - p, :p],
        "pad_right": frame[p : size - p, size - p :],
    }
    prompter_layout(method, strips)
    got = np.asarray(method.shrink(normalized(data["image"], "clip")) + method.prompt(strips))
    official = data["prompted"]
    inside = np.zeros(got.shape, bool)
    inside[:, p : size - p, p : size - p] = True
    # Black border plus frame, in the normalised input: exactly the official values.
    np.testing.assert_allclose(got[~inside], official[~inside], **TOL)
    # The shrunk image. jprompt's antialiased bicubic is PIL's bicubic (the filter of
    # preprocess_test's Resize) run on float pixels, clipped: equal to float precision.
    got_rgb = normalization.to_rgb(got, "clip")[:, p : size - p, p : size - p]
    np.testing.assert_allclose(got_rgb, 255 * data["shrunk_unrounded"], atol=1e-3)
    # The official 8-bit PIL rounds after each of its two 1D passes, so it differs from that by
    # up to one 8-bit level (0.88 here); jprompt does not round.
    np.testing.assert_allclose(got_rgb, 255 * data["shrunk"], atol=1.0)


@pytest.mark.parametrize("case", ["shallow_all", "deep_all_proj", "deep_sequence", "deep_hidden"])
def test_vfpt_prompts_match_the_official_tokens(case):
    # What each block of the official PromptedTransformer_Fourier received at the p prompt
    # positions: Re(FFT) of the first floor(p / 2) tokens of each set, after the projection.
    data = load("vfpt")
    tokens, official = data[f"{case}/tokens"], data[f"{case}/inserted"]
    deep = case.startswith("deep")
    prompter = {"tokens": tokens}
    if f"{case}/proj_kernel" in data:
        prompter["proj"] = {
            "kernel": data[f"{case}/proj_kernel"],
            "bias": data[f"{case}/proj_bias"],
        }
    method = build(
        "vfpt",
        8,
        num_tokens=tokens.shape[-2],
        deep=deep,
        project_dim=tokens.shape[-1] if "proj" in prompter else -1,
        fourier_fraction=0.5,
        fourier_dims=case.split("_")[1],
    )
    prompter_layout(method, prompter)
    got = method.prompts(prompter, official.shape[-3], rng=None, train=False)
    np.testing.assert_allclose(got, official, **TOL)


@pytest.mark.parametrize("case", ["deep_shared", "shallow_separate"])
def test_e2vpt_matches_the_official_prompted_vit(case, tmp_path):
    # The official PromptedVisionTransformer_Prompt_VK (P_VK) on seeded weights in vit_jax's
    # naming, with visual prompts, key-value prompts and pruning masks (some zero): its CLS
    # feature and its whole sequence after encoder_norm. Its blocks compute the exact GELU.
    data = load("e2vpt")
    path = tmp_path / "vit.npz"
    weights = {key.removeprefix("weights/"): v for key, v in data.items() if "weights/" in key}
    np.savez(path, **weights)  # vit_jax's pre-Linen naming, the official load_from's
    module = vit.create(
        "vit_tiny4", hidden_size=32, mlp_dim=64, num_heads=4, activation="gelu_exact"
    )
    size = data["image"].shape[1]
    backbone = Backbone("vit_tiny4", module, size, "minus_one_to_one")
    kv_names = ("kv",) if f"{case}/kv" in data else ("keys", "values")
    deep = case.startswith("deep")
    tokens = data[f"{case}/tokens"]
    method = methods.build(
        "e2vpt",
        backbone=backbone,
        num_classes=3,
        num_tokens=tokens.shape[-2],
        deep=deep,
        kv_tokens=data[f"{case}/{kv_names[0]}"].shape[-2],
        kv_deep=deep,
        share_kv=kv_names == ("kv",),
        pieces=data[f"{case}/piece_mask"].shape[-1],
    )
    prompter = {
        "tokens": tokens,
        **{name: data[f"{case}/{name}"] for name in kv_names},
        "token_mask": data[f"{case}/token_mask"][:, None],  # official (P,), jprompt's (P, 1)
        "piece_mask": data[f"{case}/piece_mask"],
    }
    prompter_layout(method, prompter)
    # As many as the official code trains (its parameters named "QKV" or "prompt"), head aside.
    assert vit_checkpoint.count_params(prompter) == data[f"{case}/trainable"]
    head, head_frozen = method.init_head(jax.random.PRNGKey(0))
    trained = {"params": {"prompter": prompter, **head}}
    params = vit_checkpoint.load_pretrained(path, module, image_size=size)
    frozen = {"backbone": params, **head_frozen}
    # One compile of the whole forward costs less than running it op by op.
    _, out = jax.jit(method.apply)(trained, frozen, data["image"])
    np.testing.assert_allclose(out["features"], data[f"{case}/features"], **TOL)
    np.testing.assert_allclose(out["encoded"], data[f"{case}/encoded"], **TOL)
