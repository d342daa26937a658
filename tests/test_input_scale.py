"""VP's input_scale (AutoVP's learned input scale): the official forward and scale gradient, the
parameter count, the gradient through the method (clipped, straight through the clamp), and the
combinations it refuses.

``fixtures/official_autovp.npz`` comes from AutoVP's own modules (IBM/AutoVP @ defe0d97,
auto_vp/programs.py ``Trainable_Resize`` and ``InputPadding``, after wrapper.py's
``transforms.Resize([b, b])``), run at S = 12, b = 6 (p = 3) by
``tests/fixtures/make_official_autovp.py`` (its docstring has the command).
"""

import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprompt import methods
from jprompt.data import normalization
from jprompt.errors import InputError
from jprompt.methods import input_scaling
from jprompt.models import vit
from jprompt.models.backbone import Backbone

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_autovp.npz"
S, P = 12, 3


def make_method(image_size=S, prompt_size=P, name="vit_tiny4", normalization_name="clip", **kw):
    module = vit.create(name, num_classes=0)
    backbone = Backbone(name, module, image_size, normalization_name)
    options = {"input_scale": True, "prompt_size": prompt_size, "head_init": "vpt"} | kw
    return methods.build("vp", backbone=backbone, num_classes=3, **options)


@pytest.mark.parametrize("path", ["clip", "imagenet"])
def test_matches_autovp_official_forward_and_scale_gradient(path):
    data = np.load(FIXTURE)
    nhwc = (0, 2, 3, 1)
    mean, std = (np.asarray(v, np.float32) for v in normalization.MEAN_STD[path])
    images = jnp.asarray((data["image01"].transpose(nhwc) - mean) / std)
    delta = data["delta"].transpose(1, 2, 0)
    # CLIP: x + delta * mask; other models: Normalize(x + sigmoid(delta) * mask), which is the
    # normalised x plus sigmoid(delta) / std: jprompt's canvas in the normalised space.
    canvas = delta if path == "clip" else 1 / (1 + np.exp(-delta)) / std
    method = make_method(normalization_name=path, scale_grad_clip=1e6)  # not clipped here
    weights = data["weights"].transpose(nhwc)

    @jax.jit
    def prompted_and_grads(params):
        def prompted(params):
            images_seen, prompt = method.inputs(params, images, None)
            return images_seen + prompt

        return prompted(params), jax.grad(lambda p: jnp.sum(prompted(p) * weights))(params)

    for scale in (1.3, 0.7):  # int(6 * scale): 7 (an odd window, [2, 9)) and 4 ([4, 8))
        key = f"{path}/{scale}"
        params = {"canvas": jnp.asarray(canvas), "scale": jnp.float32(scale)}
        got, grads = prompted_and_grads(params)
        np.testing.assert_allclose(got, data[f"{key}/prompted"].transpose(nhwc), atol=1e-5)
        np.testing.assert_allclose(grads["scale"], data[f"{key}/grad_scale"], rtol=1e-5)
        # The prompt's gradient: the weights summed over the batch, on the border only.
        expected = data[f"{key}/grad_delta"].transpose(1, 2, 0)
        if path == "imagenet":  # through sigmoid(delta) / std there, not here
            expected = weights.sum(0) * data[f"{key}/mask"][0][..., None]
        np.testing.assert_allclose(grads["canvas"], expected, atol=1e-5)


def test_parameter_count_and_mask_at_autovp_settings():
    # AutoVP: InputPadding.delta (3, 224, 224) and Trainable_Resize.scale, set to 1.5.
    method = make_method(image_size=224, prompt_size=48, name="vit_b16")
    trained, _ = jax.eval_shape(method.init, jax.random.PRNGKey(0), {})
    prompter = trained["params"]["prompter"]
    assert sum(x.size for x in jax.tree.leaves(prompter)) == 150_529 == 3 * 224**2 + 1
    # At 1.5 the 6 px image fills int(9.0) = 9 px: the frame is rows/columns 0 and 10, 11.
    mask = np.asarray(input_scaling.border_mask(jnp.float32(1.5), S - 2 * P, S))[..., 0]
    np.testing.assert_array_equal(np.nonzero(mask.min(axis=1))[0], [0, 10, 11])


def test_scale_gradient_through_the_method_is_clipped_and_passes_the_clamp():
    method = make_method()
    # Random weights of the tiny ViT's shapes (quicker than compiling its init).
    shapes = jax.eval_shape(
        method.backbone.module.init, jax.random.PRNGKey(0), jnp.zeros((1, S, S, 3))
    )
    rng = np.random.default_rng(0)
    backbone_params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype), shapes)
    trained, frozen = method.init(jax.random.PRNGKey(2), backbone_params["params"])
    assert float(trained["params"]["prompter"]["scale"]) == 1.5  # AutoVP's demo.py default
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, S, S, 3), minval=-1, maxval=1)

    def loss(params):
        return jnp.sum(method.apply({"params": params}, frozen, x)[0][:, 0])

    grads = jax.jit(jax.grad(loss))(trained["params"])["prompter"]
    # Through the backbone, clipped to AutoVP's bound 0.001 / 2^16, which binds.
    assert abs(float(grads["scale"])) == pytest.approx(0.001 / 2**16)
    inside = np.asarray(input_scaling.border_mask(jnp.float32(1.5), S - 2 * P, S)) == 0
    assert np.all(np.asarray(grads["canvas"])[inside[..., 0]] == 0)
    assert np.abs(np.asarray(grads["canvas"])).max() > 0

    # Beyond the clamp [0.1, 5] the forward is the bound's, and the gradient still arrives.
    @jax.jit
    def value_and_grad(scale):
        def prompted_sum(scale):
            images_seen, prompt = method.inputs(
                {"canvas": jnp.ones((S, S, 3)), "scale": scale}, x, None
            )
            return jnp.sum((images_seen + prompt) * x)

        return jax.value_and_grad(prompted_sum)(scale)

    (value_over, grad_over), (value_at, grad_at) = value_and_grad(7.0), value_and_grad(5.0)
    assert float(value_over) == float(value_at)
    assert float(grad_over) == float(grad_at) != 0


def test_bad_combinations_fail_in_one_line():
    with pytest.raises(
        InputError,
        match=r"^vp: input_scale scales the image inside the padding prompter's frame, as "
        r"AutoVP does, and has no fixed_patch form: use prompter=padding or drop input_scale$",
    ):
        helpers.load_config("vp.py", "demo,input_scale,prompter=fixed_patch")
    with pytest.raises(InputError, match=r"^vp: init_scale 6.0 is outside AutoVP's clamp"):
        helpers.load_config("vp.py", "demo,input_scale,init_scale=6")
    with pytest.raises(InputError, match=r"prompt_size 16 leaves empty at 32px: choose a "):
        helpers.load_config("vp.py", "demo,input_scale,prompt_size=16")
    with pytest.raises(InputError, match=r"^init_scale=1.0 needs input_scale: add input_scale$"):
        helpers.load_config("vp.py", "demo,init_scale=1")
    with pytest.raises(InputError, match="has no random_patch form"):
        make_method(prompter="random_patch")


def test_config_defaults_to_autovp_proportions():
    demo = helpers.load_config("vp.py", "demo,input_scale")
    assert (demo.method.input_scale, demo.method.prompt_size, demo.method.init_scale) == (
        True,
        7,  # (32 - round(32 * 128 / 224)) // 2
        1.5,
    )
    full = helpers.load_config("vp.py", "input_scale,init_scale=1.0")
    assert (full.method.prompt_size, full.method.init_scale) == (48, 1.0)  # 128 px of 224
    assert "input_scale" not in helpers.load_config("vp.py", "demo").method
