"""ViT ``.npz`` checkpoints: the published namings round-trip to identical logits.

The files are written here from a tiny model's parameters, with key renamings written
independently of the loader: vit_jax Linen, vit_jax pre-Linen, big_vision unrolled and scanned.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import traverse_util

from jprompt.models import vit, vit_checkpoint

IMAGE = 16
D = 64


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _write(path, flat):
    np.savez(path, **flat)
    return path


def _randomize_zeros(params, seed):
    """The real init has zero cls and head; make them random so that logits depend on them."""
    rng = np.random.default_rng(seed)
    flat = {
        k: v if np.any(v) else 0.3 * rng.normal(size=v.shape).astype(np.float32)
        for k, v in _flat(params).items()
    }
    return traverse_util.unflatten_dict(flat, sep="/")


def _random_params(model, seed, image_size):
    """Random float32 parameters of ``model``'s tree, drawn with numpy (no XLA compilation)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    rng = np.random.default_rng(seed)
    flat = {
        k: (0.1 * rng.normal(size=v.shape) + k.endswith("scale")).astype(np.float32)
        for k, v in traverse_util.flatten_dict(abstract, sep="/").items()
    }
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def tiny():
    model = vit.create("vit_tiny4", num_classes=10)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
    return model, _randomize_zeros(params, seed=1)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, IMAGE, IMAGE, 3)), jnp.float32)


def _logits(model, params, images):
    return np.asarray(model.apply({"params": params}, images)[0])


# ---------------------------------------------------------------------------------------------
# Renamings from vit_jax Linen naming to the other published layouts.


def to_pre_linen(flat):
    """One counter for all submodules of a block, as the original ViT checkpoints have."""
    renames = {
        "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
        "LayerNorm_1": "LayerNorm_2",
        "MlpBlock_0": "MlpBlock_3",
    }
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
        out["/".join(parts)] = value
    return out


def to_big_vision(flat, *, scanned=False):
    """Top-level posemb without CLS slot (its entry folded into cls); optionally scanned blocks."""
    out = dict(flat)
    posemb = out.pop("Transformer/posembed_input/pos_embedding")
    if "cls" in out:
        out["cls"] = out["cls"] + posemb[:, :1]
        posemb = posemb[:, 1:]
    out["pos_embedding"] = posemb
    if scanned:
        per_leaf = {}
        for key in [k for k in out if re.match(r"Transformer/encoderblock_\d+/", k)]:
            _, block, rest = key.split("/", 2)
            per_leaf.setdefault(rest, {})[int(block.split("_")[1])] = out.pop(key)
        for rest, layers in per_leaf.items():
            stacked = np.stack([layers[i] for i in range(len(layers))])
            out[f"Transformer/encoderblock/{rest}"] = stacked
    return out


def test_renamings_produce_the_published_key_sets(tiny):
    _, params = tiny
    pre_linen = to_pre_linen(_flat(params))
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel" in pre_linen
    assert "Transformer/encoderblock_0/LayerNorm_2/scale" in pre_linen
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel" in pre_linen
    scanned = to_big_vision(_flat(params), scanned=True)
    assert scanned["pos_embedding"].shape == (1, 16, D)
    assert scanned["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, D, 128)
    assert not any("encoderblock_" in k for k in scanned)


# ---------------------------------------------------------------------------------------------
# Round trips.

FORMATS = {
    "vit_jax_linen": lambda flat: flat,
    "vit_jax_pre_linen": to_pre_linen,
    "big_vision": to_big_vision,
    "big_vision_scanned": lambda flat: to_big_vision(flat, scanned=True),
    # a whole big_vision train state: parameters under params/, plus optimizer state to ignore
    "big_vision_train_state": lambda flat: {
        **{f"params/{k}": v for k, v in to_big_vision(flat, scanned=True).items()},
        "opt/mu/embedding/kernel": np.zeros(3, np.float32),
    },
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_gives_identical_logits(tmp_path, tiny, images, fmt):
    model, params = tiny
    path = _write(tmp_path / f"{fmt}.npz", FORMATS[fmt](_flat(params)))
    loaded = vit_checkpoint.load_pretrained(path, model, image_size=IMAGE)
    assert {v.dtype for v in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}
    expected = _logits(model, params, images)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(_logits(model, loaded, images), expected, rtol=1e-6, atol=1e-6)

    flat, original = _flat(loaded), _flat(params)
    assert flat.keys() == original.keys()
    posemb_key = "Transformer/posembed_input/pos_embedding"
    if fmt.startswith("vit_jax"):
        for key in original:
            np.testing.assert_array_equal(flat[key], original[key])
    else:  # big_vision: the CLS slot of the posemb is zero and its value lives in cls
        np.testing.assert_array_equal(flat[posemb_key][:, 0], np.zeros((1, D)))
        np.testing.assert_array_equal(flat[posemb_key][:, 1:], original[posemb_key][:, 1:])
        np.testing.assert_allclose(flat["cls"], original["cls"] + original[posemb_key][:, :1])


def test_big_vision_gap_model_keeps_posemb_as_is(tmp_path, images):
    model = vit.create("vit_tiny4", num_classes=10, pool="gap")
    params = _random_params(model, 3, IMAGE)
    path = _write(tmp_path / "gap.npz", to_big_vision(_flat(params)))
    loaded = vit_checkpoint.load_pretrained(path, model, image_size=IMAGE)
    np.testing.assert_array_equal(
        loaded["Transformer"]["posembed_input"]["pos_embedding"],
        params["Transformer"]["posembed_input"]["pos_embedding"],
    )
    np.testing.assert_allclose(
        _logits(model, loaded, images), _logits(model, params, images), atol=1e-6
    )


def test_save_npz_writes_flat_linen_names_and_loads_back(tmp_path, tiny):
    _, params = tiny
    path = tmp_path / "saved.npz"
    vit_checkpoint.save_npz(path, params)
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    expected = _flat(params)
    assert stored.keys() == expected.keys()
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel" in stored
    for key, value in expected.items():
        np.testing.assert_array_equal(stored[key], value)
    reloaded = _flat(vit_checkpoint.load_npz(str(path)))
    for key, value in expected.items():
        np.testing.assert_array_equal(reloaded[key], value)


def test_count_params(tiny):
    _, params = tiny
    block = 2 * 2 * D + 4 * (D * D + D) + (D * 128 + 128) + (128 * D + D)
    expected = (4 * 4 * 3 * D + D) + D + 17 * D + 2 * block + 2 * D + (D * 10 + 10)
    assert vit_checkpoint.count_params(params) == expected


# ---------------------------------------------------------------------------------------------
# Position embedding resampling.


def test_posemb_is_resampled_bilinearly_for_a_larger_image(tmp_path):
    model = vit.create("vit_tiny4", num_classes=10)
    params = _random_params(model, 4, 32)  # 8x8 grid
    flat = _flat(params)
    path = _write(tmp_path / "small.npz", flat)
    loaded = vit_checkpoint.load_pretrained(path, model, image_size=64)  # 16x16 grid
    posemb = flat["Transformer/posembed_input/pos_embedding"]
    new = loaded["Transformer"]["posembed_input"]["pos_embedding"]
    assert new.shape == (1, 1 + 256, D)
    np.testing.assert_array_equal(new[:, 0], posemb[:, 0])  # CLS slot kept
    grid = scipy.ndimage.zoom(posemb[0, 1:].reshape(8, 8, D), (2, 2, 1), order=1)
    np.testing.assert_allclose(new[0, 1:], grid.reshape(256, D), rtol=1e-6)
    # the resampled embedding is a real interpolation, not a copy of the old rows
    assert np.abs(new[0, 1:65] - posemb[0, 1:]).max() > 1e-2
    logits = _logits(model, loaded, jnp.zeros((1, 64, 64, 3)))
    assert logits.shape == (1, 10)

    flat["Transformer/posembed_input/pos_embedding"][:, 1:] = 0.25  # a constant grid stays so
    path = _write(tmp_path / "constant.npz", flat)
    loaded = vit_checkpoint.load_pretrained(path, model, image_size=64)
    np.testing.assert_allclose(
        loaded["Transformer"]["posembed_input"]["pos_embedding"][:, 1:], 0.25
    )


def test_resample_posemb_direct():
    posemb = np.random.default_rng(5).normal(size=(1, 1 + 16, 8)).astype(np.float32)
    same = vit_checkpoint.resample_posemb(posemb, (4, 4), has_cls=True)
    np.testing.assert_allclose(same, posemb, rtol=1e-6)
    wide = vit_checkpoint.resample_posemb(posemb[:, 1:], (2, 6), has_cls=False)
    assert wide.shape == (1, 12, 8)
    expected = scipy.ndimage.zoom(posemb[0, 1:].reshape(4, 4, 8), (2 / 4, 6 / 4, 1), order=1)
    np.testing.assert_allclose(wide[0], expected.reshape(12, 8), rtol=1e-6)
    with pytest.raises(ValueError, match="not square"):
        vit_checkpoint.resample_posemb(posemb[:, :15], (4, 4), has_cls=False)


# ---------------------------------------------------------------------------------------------
# Heads.


def test_headless_model_drops_the_head(tmp_path, tiny, images):
    model, params = tiny
    path = _write(tmp_path / "with_head.npz", _flat(params))
    headless = vit.create("vit_tiny4")
    loaded = vit_checkpoint.load_pretrained(path, headless, image_size=IMAGE)
    assert "head" not in loaded
    features, _ = headless.apply({"params": loaded}, images)
    _, out = model.apply({"params": params}, images)
    np.testing.assert_allclose(features, out["features"], atol=1e-6)


def test_head_of_another_size_is_replaced_by_a_fresh_one(tmp_path, tiny):
    _, params = tiny
    path = _write(tmp_path / "ten.npz", _flat(params))
    other = vit.create("vit_tiny4", num_classes=3, head_bias_init=-4.6)
    loaded = vit_checkpoint.load_pretrained(path, other, image_size=IMAGE)
    np.testing.assert_array_equal(loaded["head"]["kernel"], np.zeros((D, 3)))
    np.testing.assert_allclose(loaded["head"]["bias"], np.full(3, -4.6), rtol=1e-6)
    np.testing.assert_array_equal(loaded["embedding"]["kernel"], params["embedding"]["kernel"])

    same = vit.create("vit_tiny4", num_classes=10)  # same size: the file's head is kept
    loaded = vit_checkpoint.load_pretrained(path, same, image_size=IMAGE)
    np.testing.assert_array_equal(loaded["head"]["kernel"], params["head"]["kernel"])


def test_pre_logits_kept_with_representation_size_and_dropped_without(tmp_path):
    model = vit.create("vit_tiny4", num_classes=21, representation_size=12)
    params = _random_params(model, 6, IMAGE)
    path = _write(tmp_path / "i21k_like.npz", _flat(params))
    keep = vit_checkpoint.load_pretrained(
        path, vit.create("vit_tiny4", representation_size=12), image_size=IMAGE
    )
    np.testing.assert_array_equal(keep["pre_logits"]["kernel"], params["pre_logits"]["kernel"])
    assert "head" not in keep
    drop = vit_checkpoint.load_pretrained(path, vit.create("vit_tiny4"), image_size=IMAGE)
    assert "pre_logits" not in drop and "head" not in drop


# ---------------------------------------------------------------------------------------------
# Files that do not fit.


def test_hidden_size_mismatch_lists_every_shape(tmp_path, tiny):
    _, params = tiny
    path = _write(tmp_path / "d64.npz", _flat(params))
    narrow = vit.create("vit_tiny4", num_classes=10, hidden_size=32, mlp_dim=64)
    with pytest.raises(ValueError, match="does not fit the model") as err:
        vit_checkpoint.load_pretrained(path, narrow, image_size=IMAGE)
    message = str(err.value)
    assert "embedding/kernel: file (4, 4, 3, 64) vs model (4, 4, 3, 32)" in message
    assert "Transformer/posembed_input/pos_embedding: file (1, 17, 64) vs model (1, 17, 32)" in (
        message
    )
    kernel = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"
    assert f"{kernel}: file (64, 2, 32) vs model (32, 2, 16)" in message
    assert "missing keys: []" in message and "unexpected keys: []" in message


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    model, params = tiny
    flat = _flat(params)
    del flat["Transformer/encoder_norm/scale"]
    flat["extra/kernel"] = np.zeros(2, np.float32)
    path = _write(tmp_path / "broken.npz", flat)
    with pytest.raises(ValueError) as err:
        vit_checkpoint.load_pretrained(path, model, image_size=IMAGE)
    assert "missing keys: ['Transformer/encoder_norm/scale']" in str(err.value)
    assert "unexpected keys: ['extra/kernel']" in str(err.value)


def test_deeper_model_reports_missing_blocks(tmp_path, tiny):
    _, params = tiny
    path = _write(tmp_path / "two_layers.npz", _flat(params))
    deeper = vit.create("vit_tiny4", num_classes=10, depth=3)
    with pytest.raises(ValueError, match="Transformer/encoderblock_2/LayerNorm_0/scale"):
        vit_checkpoint.load_pretrained(path, deeper, image_size=IMAGE)


def test_map_head_is_rejected(tmp_path, tiny):
    _, params = tiny
    flat = to_big_vision(_flat(params))
    flat["MAPHead_0/probe"] = np.zeros((1, 1, D), np.float32)
    path = _write(tmp_path / "map.npz", flat)
    with pytest.raises(ValueError, match="attention pooling"):
        vit_checkpoint.load_npz(path)


def test_scanned_blocks_must_agree_on_depth(tmp_path, tiny):
    _, params = tiny
    flat = to_big_vision(_flat(params), scanned=True)
    key = "Transformer/encoderblock/LayerNorm_0/scale"
    flat[key] = flat[key][:1]
    path = _write(tmp_path / "ragged.npz", flat)
    with pytest.raises(ValueError, match=r"depth axis: \[1, 2\]"):
        vit_checkpoint.load_npz(path)


def test_count_params_works_on_abstract_trees():
    model = vit.create("vit_b16", num_classes=1000)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)
    assert vit_checkpoint.count_params(abstract) == 86_567_656
