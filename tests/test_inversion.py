"""PGN prompt inversion: the deployed RGB pipeline computes what the latent model computes.

Randomly initialised ``vit_tiny8`` (linear head) and ``clip_tiny8`` (zero-shot head) at 32px:
a 4x4 patch grid, D = 64 <= 3 * 8 * 8 = 192. ViT with K = 3 tokens (one extra row: 3 prompt
slots and 1 filler), CLIP with K = 6 (two rows: 6 prompt slots and 2 fillers). The token
library is scaled from its N(0, 0.02^2) init to unit scale, so that the prompts are as large as
the image's patch embeddings and visibly move the logits.
"""

import functools
import threading
import urllib.error

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from jprompt.data import crops, preprocess
from jprompt.deploy import client, server
from jprompt.errors import InputError
from jprompt.methods import heads, inversion, pgn, vp
from jprompt.models import backbones, clip, vit

BATCH = 4
NUM_CLASSES = 5
IMAGE_SIZE = 32
PATCH = 8
GRID = IMAGE_SIZE // PATCH
LOGIT_RTOL = 2e-5  # float32: deviations are measured relative to the largest logit


def make_backbone(name: str, **overrides):
    if name.startswith("clip"):
        module = clip.image_tower(name, **overrides)
        return backbones.Backbone(name, module, IMAGE_SIZE, backbones.CLIP_NORMALIZATION)
    module = vit.create(name, num_classes=0, **overrides)
    return backbones.Backbone(name, module, IMAGE_SIZE, backbones.VIT_NORMALIZATION)


class Setup:
    """A random deployable PGN, its latent outputs, its deployment and the served model."""

    def __init__(self, name: str, num_tokens: int):
        rng = np.random.default_rng(0)
        self.backbone = make_backbone(name)
        dummy = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
        params = jax.jit(self.backbone.module.init)(jax.random.PRNGKey(0), dummy)["params"]
        zeroshot = None
        if name.startswith("clip"):  # a frozen zero-shot head of random class embeddings
            embeddings = rng.normal(size=(NUM_CLASSES, self.backbone.feature_dim))
            embeddings /= np.linalg.norm(embeddings, axis=-1, keepdims=True)
            zeroshot = heads.ZeroShotHead(embeddings.astype(np.float32), logit_scale=4.6)
        self.method = pgn.PromptGenerationNetwork(
            backbone=self.backbone,
            num_classes=NUM_CLASSES,
            num_tokens=num_tokens,
            library_size=8,
            deployable=True,
            zeroshot=zeroshot,
        )
        trained, self.frozen = self.method.init(jax.random.PRNGKey(1), params)
        self.trained = helpers.to_numpy(trained)
        self.trained["params"]["library"] = 50.0 * self.trained["params"]["library"]
        if zeroshot is None:
            kernel = self.trained["params"]["head"]["kernel"]
            self.trained["params"]["head"]["kernel"] = rng.normal(size=kernel.shape).astype(
                np.float32
            )
        self.images = rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        self.normalized = inversion.normalize(self.images, self.backbone.normalization)
        apply = jax.jit(functools.partial(self.method.apply, rng=None, train=False))
        self.latent, self.aux = apply(self.trained, self.frozen, self.normalized)
        self.client = client.ClientModel.from_pgn(
            self.method, self.trained, self.frozen, eval_crop="resize", resize=crops.DEFAULT_RESIZE
        )
        self.prompted = client.deploy(self.client, self.images)
        self.served = server.ServedModel.from_trained(self.backbone, self.trained, self.frozen)

    def deviation(self, logits) -> float:
        return float(np.abs(np.asarray(logits) - np.asarray(self.latent)).max())

    @property
    def tolerance(self) -> float:
        return LOGIT_RTOL * float(np.abs(self.latent).max())


NUM_TOKENS = {"vit_tiny8": 3, "clip_tiny8": 6}


@functools.cache
def built(name: str) -> Setup:
    return Setup(name, NUM_TOKENS[name])


@pytest.fixture(params=sorted(NUM_TOKENS))
def setup(request):
    return built(request.param)


@pytest.fixture
def vit_setup():
    return built("vit_tiny8")


def test_normalization_matches_the_input_pipeline():
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    for kind in preprocess.NORMALIZATIONS:
        expected = preprocess.normalize(tf.constant(rgb), kind).numpy()
        normalized = inversion.normalize(rgb, kind)
        np.testing.assert_allclose(normalized, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(inversion.to_rgb(normalized, kind), rgb, atol=1e-4)


def test_inverted_rgb_reproduces_the_latent_logits(setup):
    """The unmodified backbone (extended position table) on the float min-norm RGB image
    (unquantized, no box projection) computes the latent model's logits and sequence."""
    prompted = setup.prompted
    rows = setup.method.geometry.rows
    assert prompted.min_norm.shape == (BATCH, IMAGE_SIZE + rows * PATCH, IMAGE_SIZE, 3)
    deviation = setup.deviation(setup.served.logits(prompted.min_norm))
    print(f"{setup.backbone.name}: largest logit deviation {deviation:.3g}")
    assert deviation <= setup.tolerance, (
        f"largest |latent - deployed| logit deviation {deviation:.3g} > {setup.tolerance:.3g}"
    )
    # Token by token, after the last block: CLS, 16 image patches, K prompts, S - K fillers.
    params = inversion.with_extra_rows(setup.frozen["backbone"], GRID, rows)
    normalized = inversion.normalize(prompted.min_norm, setup.backbone.normalization)
    _, out = setup.backbone.features(params, normalized)
    assert out["encoded"].shape == setup.aux["encoded"].shape
    assert out["encoded"].shape[1] == 1 + GRID * GRID + setup.method.geometry.slots
    np.testing.assert_allclose(out["encoded"], setup.aux["encoded"], atol=1e-4)
    # The check has teeth: gray rows instead of the prompt move the logits far more.
    gray = np.asarray(prompted.min_norm).copy()
    gray[:, IMAGE_SIZE:] = inversion.FILL_VALUE
    assert setup.deviation(setup.served.logits(gray)) > 1000 * setup.tolerance


def test_latent_model_is_the_methods_apply(setup):
    """Training computes the deployed geometry: the K tokens, then the filler patches' tokens
    ``W x_fill + b + pos_j`` from the edge-padded table, whose image rows are untouched."""
    geometry, params = setup.method.geometry, setup.frozen["backbone"]
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    extended = inversion.with_extra_rows(params, GRID, geometry.rows)
    extended = extended["Transformer"]["posembed_input"]["pos_embedding"]
    assert extended.shape == (1, 1 + (GRID + geometry.rows) * GRID, table.shape[-1])
    np.testing.assert_array_equal(extended[:, : 1 + GRID * GRID], table)
    for row in range(geometry.rows):  # the extra rows repeat the last image row
        start = 1 + (GRID + row) * GRID
        np.testing.assert_array_equal(extended[:, start : start + GRID], table[:, -GRID:])

    kernel = params["embedding"]["kernel"]  # (P, P, 3, D)
    bias = params["embedding"].get("bias", 0.0)  # CLIP's patch conv has none
    gray = inversion.normalize(
        np.full((PATCH, PATCH, 3), inversion.FILL_VALUE), setup.backbone.normalization
    )
    filler_slots = range(1 + GRID * GRID + geometry.num_tokens, extended.shape[1])
    fillers = np.stack(
        [np.einsum("ijc,ijcd->d", gray, kernel) + bias + extended[0, s] for s in filler_slots]
    )
    assert len(fillers) == geometry.slots - geometry.num_tokens > 0
    prompts, _, _ = setup.method.prompts(setup.trained, setup.normalized, train=False)
    tokens = np.concatenate([prompts, np.broadcast_to(fillers, (BATCH, *fillers.shape))], axis=1)
    features, _ = setup.backbone.features(
        params, setup.normalized, prompt_tokens=tokens, prompt_position="end"
    )
    manual = setup.method.head_logits(setup.trained["params"], setup.frozen, features)
    np.testing.assert_allclose(manual, setup.latent, rtol=1e-5, atol=setup.tolerance)


def test_box_projection_and_quantization(vit_setup):
    """Tokens made from random black-and-white patches: their min-norm solution leaves
    [0, 255], the box projection finds an exact in-range one. Rounding to uint8 moves each
    pixel by at most 0.5 and each token coordinate by at most 0.5 * scale * max_d sum |W_d|.
    Tokens 100x larger have no in-range solution: reported as such, pixels still valid."""
    setup = vit_setup
    geometry, normalization = setup.method.geometry, setup.backbone.normalization
    inverse = setup.client.inverse
    rng = np.random.default_rng(2)
    pixels = rng.choice([0.0, 255.0], (BATCH, geometry.num_tokens, PATCH, PATCH, 3))
    x_true = inversion.normalize(pixels, normalization).reshape(BATCH, geometry.num_tokens, -1)
    tokens = x_true @ inverse.kernel.T + inverse.offsets
    bounds = inversion.pixel_bounds(normalization, PATCH)

    min_norm = inverse.min_norm(tokens)
    min_norm_rgb = inversion.patches_to_rows(min_norm, geometry, normalization)
    assert min_norm_rgb.min() < -10 and min_norm_rgb.max() > 265
    boxed, residual, exact = inversion.project_to_box(inverse, tokens, min_norm, bounds)
    rgb = inversion.patches_to_rows(boxed, geometry, normalization)
    assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3
    assert residual.shape == (BATCH,) and np.all(exact), residual
    assert residual.max() < 1e-4

    rgb_patches = inversion.to_rgb(boxed.reshape(pixels.shape), normalization)
    quantized = inversion.quantize(rgb_patches)
    assert quantized.dtype == jnp.uint8
    assert np.abs(np.asarray(quantized, np.float32) - rgb_patches).max() <= 0.5 + 1e-4
    x_quantized = inversion.normalize(quantized, normalization).reshape(boxed.shape)
    token_error = np.abs(x_quantized @ inverse.kernel.T - inverse.targets(tokens)).max()
    grey_level = 1 / 127.5  # minus_one_to_one
    bound = 0.5 * grey_level * np.abs(inverse.kernel).sum(axis=1).max() + 1e-4
    print(f"8-bit token error {token_error:.3g} (bound {bound:.3g})")
    assert 0 < token_error <= bound

    boxed, residual, exact = inversion.project_to_box(
        inverse, 100 * tokens, inverse.min_norm(100 * tokens), bounds
    )
    rgb = inversion.patches_to_rows(boxed, geometry, normalization)
    assert not np.any(exact) and residual.min() > 1.0
    assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3


def test_deployed_uint8_images(setup, caplog):
    prompted = setup.prompted
    assert prompted.images.dtype == jnp.uint8
    np.testing.assert_array_equal(prompted.images[:, :IMAGE_SIZE], setup.images)
    np.testing.assert_array_equal(
        prompted.images[:, IMAGE_SIZE + PATCH * (setup.method.geometry.rows - 1) :, -PATCH:],
        inversion.FILL_VALUE,
    )  # the last slot is a filler in both setups
    assert np.all(prompted.exact) and prompted.residual.max() < 1e-4
    deviation = setup.deviation(setup.served.logits(prompted.images))
    print(f"{setup.backbone.name}: largest logit deviation after 8-bit rounding {deviation:.3g}")

    # A prompt far outside what pixels can express: deployed anyway, with a warning.
    params = setup.client.params
    loud = setup.client.replace(params={**params, "library": params["library"] * 1e4})
    with caplog.at_level("WARNING"):
        result = client.deploy(loud, setup.images)
    assert not np.any(result.exact)
    assert f"{BATCH} of {BATCH} images have no in-range exact prompt solution" in caplog.text


def test_client_file_round_trip(vit_setup, tmp_path):
    setup = vit_setup
    path = tmp_path / "client.npz"
    setup.client.save(path)
    with np.load(path) as data:
        keys = set(data.files)
    assert not any("Transformer" in key or "embedding" in key for key in keys)
    assert {"params/library", "inverse/pinv", "inverse/kernel", "inverse/offsets"} <= keys
    assert {"fill_value", "eval_crop", "resize"} <= keys
    loaded = client.ClientModel.load(path)
    assert loaded.geometry == setup.client.geometry
    assert loaded.normalization == setup.client.normalization
    assert (loaded.eval_crop, loaded.resize) == ("resize", "bilinear_antialias")
    again = client.deploy(loaded, setup.images)
    np.testing.assert_array_equal(again.images, setup.prompted.images)
    np.testing.assert_array_equal(again.min_norm, setup.prompted.min_norm)


def test_bad_client_files_are_named(tmp_path):
    expected = (
        "expected a PGN client file (an .npz written by python -m jprompt.deploy --mode=export)"
    )
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    array = tmp_path / "array.npz"
    with array.open("wb") as f:
        np.save(f, np.zeros(3))
    backbone = tmp_path / "backbone.npz"
    np.savez(backbone, **{"Transformer/encoder_norm/scale": np.ones(3)})
    for path, message in [
        (tmp_path / "missing.npz", f"{tmp_path / 'missing.npz'} does not exist; {expected}"),
        (garbage, f"{garbage} is not an .npz archive numpy can read; {expected}"),
        (array, f"{array} is not an .npz archive numpy can read; {expected}"),
        (
            backbone,
            f"{backbone} is not a PGN client file (an .npz written by python -m "
            "jprompt.deploy --mode=export): it lacks ['grid', 'patch_size', 'num_tokens', "
            "'normalization', 'eval_crop', 'resize', 'fill_value', 'params/library', "
            "'inverse/kernel', 'inverse/pinv', 'inverse/offsets']",
        ),
    ]:
        with pytest.raises(InputError) as raised:
            client.ClientModel.load(path)
        assert str(raised.value) == message


def test_only_a_deployable_pgn_has_a_client():
    backbone = make_backbone("vit_tiny8")
    fix = "can be deployed as RGB prompts (train one with --config=configs/pgn.py:...,deployable)"
    visual_prompt = vp.VisualPrompt(backbone=backbone, num_classes=NUM_CLASSES)
    latent_only = pgn.PromptGenerationNetwork(backbone=backbone, num_classes=NUM_CLASSES)
    for method, what in [
        (visual_prompt, "a VisualPrompt run"),
        (latent_only, "a PGN trained without deployable"),
    ]:
        with pytest.raises(InputError) as raised:
            client.ClientModel.from_pgn(method, {}, {}, eval_crop="resize", resize="bilinear")
        assert (
            str(raised.value) == f"cannot deploy {what}: only a PGN trained with deployable {fix}"
        )


def test_client_crops_as_the_evaluation_pipeline():
    """The client's window is the pipeline's, rounded to 8 bits (jax.image.resize and
    tf.image.resize agree to 1e-3): each eval crop and resize, landscape and portrait."""
    rng = np.random.default_rng(0)
    landscape = rng.integers(0, 256, (50, 68, 3), dtype=np.uint8)
    cases = [(landscape, crop, crops.DEFAULT_RESIZE) for crop in crops.EVAL_CROPS] + [
        (landscape, "center_crop", "bicubic"),
        (landscape, "resize", "bilinear"),
        (landscape.transpose(1, 0, 2), "resize_center_crop", crops.DEFAULT_RESIZE),
    ]
    for image, crop, resize in cases:
        ours = client.at_model_size(image, 24, crop, resize).astype(np.float32)
        pipeline = preprocess.eval_crop(tf.constant(image), 24, crop, resize).numpy()
        assert ours.shape == pipeline.shape == (24, 24, 3)
        assert np.abs(ours - pipeline).max() <= 0.5 + 1e-3, (crop, resize)
        assert np.mean(ours != np.round(pipeline)) < 0.01, (crop, resize)


def test_http_server_and_client(vit_setup):
    setup = vit_setup
    httpd = server.make_server(setup.served, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}{server.PREDICT_PATH}"
    try:
        for image in np.asarray(setup.prompted.images):
            answer = client.query(url, client.encode_png(image))
            direct = np.asarray(setup.served.logits(image[None])[0])
            assert answer["top_class"] == int(direct.argmax())
            np.testing.assert_allclose(answer["probabilities"], jax.nn.softmax(direct), rtol=1e-5)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            client.query(url, b"not an image")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("vit_tiny8", {"pool": "gap"}, "needs pool='tok', but vit_tiny8 pools with 'gap'"),
        ("vit_tiny4", {}, r"3\*4\*4 = 48 values, fewer than the token width D = 64"),
        ("clip_tiny4", {}, r"3\*4\*4 = 48 values, fewer than the token width D = 64"),
    ],
)
def test_undeployable_backbones_fail_clearly(name, overrides, message):
    backbone = make_backbone(name, **overrides)
    with pytest.raises(ValueError, match=message):
        pgn.PromptGenerationNetwork(backbone=backbone, num_classes=2, deployable=True)
    pgn.PromptGenerationNetwork(backbone=backbone, num_classes=2)  # fine when not deployed


def test_config_arg():
    config = helpers.load_config("pgn.py", "demo,deployable")
    assert config.method.deployable is True
    assert helpers.load_config("pgn.py", "demo").method.deployable is False
    with pytest.raises(ValueError, match="deployable applies to the PGN"):
        helpers.load_config("pgn.py", "demo,baseline,deployable")
