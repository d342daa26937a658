"""Output label mappings: assignments worked out by hand, ILM-VP's own outputs, head, loader.

``fixtures/ilm_vp_frequency.json`` holds what ILM-VP's ``generate_label_mapping_by_frequency``
and ``predictive_distribution_based_multi_label_mapping`` returned on made-up logits (the script
and the command that made it are stored in the file).
"""

import itertools
import json
import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jprompt.errors import InputError
from jprompt.methods import heads, label_mapping
from jprompt.methods.vp import VisualPrompt
from jprompt.models import vit, vit_checkpoint
from jprompt.models.backbone import Backbone
from jprompt.train import trainer

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures/ilm_vp_frequency.json").read_text())

# (S=6, T=4). Greedy: the 3 at (1, 0) before the 3 at (1, 2) (row-major order); then the first
# 2, (0, 1); then (3, 3); target 2's best source 1 is taken and sources 2, 4, 5 all counted 0 for
# it, so it gets the first of them, 2.
COUNTS = np.array([[0, 2, 0, 1], [3, 0, 3, 0], [0, 2, 0, 0], [1, 0, 0, 2], [0, 0, 0, 2], [0] * 4])


def test_greedy_assignment_by_hand():
    np.testing.assert_array_equal(label_mapping.greedy_assignment(COUNTS), [[1], [0], [2], [3]])
    # Two per target on the first three columns: (1,0) (0,1) (2,1), target 1 full; (3,0), target
    # 0 full; target 2 then takes the free sources in order, 4 and 5.
    pairs = label_mapping.greedy_assignment(COUNTS[:, :3], per_class=2)
    np.testing.assert_array_equal(pairs, [[1, 3], [0, 2], [4, 5]])
    with pytest.raises(InputError, match="needs 8 source classes; the source head has 6"):
        label_mapping.greedy_assignment(COUNTS, per_class=2)


@pytest.mark.parametrize("case", ["hand", "random"])
def test_frequency_equals_ilm_vp(case):
    data = FIXTURE[case]
    logits, labels = np.array(data["source_logits"]), np.array(data["labels"])
    counts = label_mapping.count_matrix(logits, labels, num_target=int(labels.max()) + 1)
    index = label_mapping.greedy_assignment(counts)
    np.testing.assert_array_equal(index[:, 0], data["mapping_sequence"])
    if case == "hand":  # its pairs were written to give COUNTS (argmax ties to the first)
        np.testing.assert_array_equal(counts, COUNTS)


def test_multi_label_frequency_equals_ilm_vp():
    data = FIXTURE["multi"]
    index = label_mapping.greedy_assignment(data["counts"], per_class=data["mlm_num"])
    matrix = np.zeros(np.shape(data["counts"]), int)
    for target, sources in enumerate(index):
        matrix[sources, target] = 1
    np.testing.assert_array_equal(matrix, data["mapping_matrix"])


def test_count_matrix_leaves_out_padding():
    logits = np.array([[0.0, 2, 2], [1, 0, 0], [0, 0, 5]])
    counts = label_mapping.count_matrix(logits, np.array([1, 0, 0]), 2, weights=[1, 1, 0])
    np.testing.assert_array_equal(counts, [[1, 0], [0, 1], [0, 0]])


def test_first_c_random_and_semantic():
    np.testing.assert_array_equal(label_mapping.first_c(10, 3), [[0], [1], [2]])
    np.testing.assert_array_equal(label_mapping.first_c(10, 2, per_class=2), [[0, 1], [2, 3]])
    drawn = label_mapping.random(jax.random.key(3), 10, 3, per_class=2)
    assert drawn.shape == (3, 2) and len(set(drawn.ravel())) == 6 and drawn.max() < 10
    np.testing.assert_array_equal(drawn, label_mapping.random(jax.random.key(3), 10, 3, 2))

    # Sources 1 and 2 are the same name (ImageNet has such pairs): the tie goes to source 1.
    source = np.array([[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1]])
    target = np.array([[0, 2.0, 0], [0, 3.0, 0.1], [1, 0, 0]])
    # Target 0 takes 1; target 1's best two (1, 2) tie and 1 is taken: 2; target 2 takes 0. With
    # two per target (first two targets), round 2: target 0's next is 3 (cosine 0.8), target 1's 4.
    np.testing.assert_array_equal(label_mapping.semantic(source, target), [[1], [2], [0]])
    with pytest.raises(InputError, match="needs 6 source classes"):
        label_mapping.semantic(source, target, per_class=2)
    np.testing.assert_array_equal(label_mapping.semantic(source, target[:2], 2), [[1, 3], [2, 4]])


def test_fully_connected_init_is_pytorch_linear():
    params = label_mapping.init_fully_connected(jax.random.key(0), 400, 7)
    assert params["kernel"].shape == (400, 7) and params["bias"].shape == (7,)
    for value in params.values():  # uniform in +-1/20: max near the bound, mean near 0
        assert 0.045 < float(jnp.abs(value).max()) <= 0.05
    assert abs(float(params["kernel"].mean())) < 0.003


def _frozen_tree(index):
    head = {"kernel": np.arange(12.0).reshape(2, 6) / 10, "bias": np.arange(6.0)}
    frozen = label_mapping.LabelMapping("x", np.array(index)).variables(None, head, len(index))[1]
    return {"backbone": {}, **frozen}


def test_mapping_head_is_remapped_without_recompiling():
    features = jnp.array([[1.0, 2.0]])
    source = np.array([[1.2, 2.5, 3.8, 5.1, 6.4, 7.7]])  # features @ kernel + bias, by hand
    logits = jax.jit(lambda frozen: heads.head_logits({}, frozen, features))
    frozen = _frozen_tree([[4], [0]])
    np.testing.assert_allclose(logits(frozen), source[:, [4, 0]], rtol=1e-6)
    remapped = label_mapping.remap(frozen, np.array([[5], [2]]))
    np.testing.assert_allclose(logits(remapped), source[:, [5, 2]], rtol=1e-6)
    assert logits._cache_size() == 1
    np.testing.assert_allclose(  # two sources per target: their mean
        heads.head_logits({}, _frozen_tree([[0, 1], [2, 5]]), features), [[1.85, 5.75]], rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"shape \(3, 1\); expected \(2, 1\)"):
        label_mapping.remap(frozen, np.zeros((3, 1)))


def test_method_takes_the_source_head_from_the_backbone():
    module = vit.create("vit_tiny4")
    source = {"kernel": np.ones((64, 10), np.float32), "bias": np.zeros(10, np.float32)}
    backbone = Backbone("vit_tiny4", module, 16, "minus_one_to_one", source_head=source)
    mapping = label_mapping.build("random", num_source=10, num_classes=3, rng=jax.random.key(1))
    method = VisualPrompt(backbone, 3, prompt_size=2, label_mapping=mapping)
    trained, frozen = method.init_head(jax.random.key(0))
    assert trained == {} and frozen["label_mapping"]["index"].shape == (3, 1)
    np.testing.assert_array_equal(frozen["source_head"]["kernel"], source["kernel"])
    fully = label_mapping.build("fully_connected", num_source=10, num_classes=3)
    trained, frozen = VisualPrompt(backbone, 3, label_mapping=fully).init_head(jax.random.key(0))
    assert trained["label_mapping"]["kernel"].shape == (10, 3) and "label_mapping" not in frozen
    bare = Backbone("vit_tiny4", module, 16, "minus_one_to_one")
    with pytest.raises(ValueError, match="needs the source head of vit_tiny4's checkpoint"):
        VisualPrompt(bare, 3, label_mapping=mapping).init_head(jax.random.key(0))


def _write_vit_jax(path, model, **extra):
    """A vit_jax Linen ``.npz`` of ``model``'s shapes (no compilation), plus ``extra`` keys."""
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    rng = np.random.default_rng(0)
    flat = {
        key: rng.normal(size=value.shape).astype(np.float32)
        for key, value in traverse_util.flatten_dict(abstract, sep="/").items()
    }
    np.savez(path, **flat, **extra)
    return flat


def test_loader_keeps_the_source_head(tmp_path):
    path = tmp_path / "in1k.npz"
    flat = _write_vit_jax(path, vit.create("vit_tiny4", num_classes=5))
    model = vit.create("vit_tiny4")  # num_classes=0, as backbones are built
    params, head = vit_checkpoint.load_pretrained_with_head(path, model, image_size=16)
    np.testing.assert_array_equal(head["kernel"], flat["head/kernel"])
    np.testing.assert_array_equal(head["bias"], flat["head/bias"])
    assert "head" not in params
    assert "head" not in vit_checkpoint.load_pretrained(path, model, image_size=16)

    headless = tmp_path / "headless.npz"
    _write_vit_jax(headless, model)
    with pytest.raises(InputError, match="has no classification head"):
        vit_checkpoint.load_pretrained_with_head(headless, model, image_size=16)
    prelogits = tmp_path / "in21k.npz"
    _write_vit_jax(
        prelogits,
        vit.create("vit_tiny4", num_classes=5),
        **{"pre_logits/kernel": np.zeros((64, 64)), "pre_logits/bias": np.zeros(64)},
    )
    with pytest.raises(InputError, match="set backbone.representation_size=64"):
        vit_checkpoint.load_pretrained_with_head(prelogits, model, image_size=16)


def demo_config(head, data_dir, **shrink):
    """VP's offline demo on the tiny ViT, whose checkpoint keeps its 10-class head (the shapes
    it was pretrained on), mapped onto the 8 colours."""
    config = helpers.load_config("vp.py", f"demo,backbone=vit_b16,head={head}")
    return helpers.shrink(config, data_dir, **shrink)


def demo_experiment(head, data_dir):
    config = demo_config(head, data_dir)
    experiment = trainer.create_experiment(config)
    stored = np.load(config.backbone.checkpoint)
    return experiment, stored["head/kernel"], stored["head/bias"]


def test_the_trainer_reads_vps_first_c_off_the_checkpoints_head(shapes_data_dir):
    experiment, kernel, bias = demo_experiment("first_c", shapes_data_dir)
    trained, frozen = experiment.state["trained"], experiment.frozen
    np.testing.assert_array_equal(frozen["source_head"]["kernel"], kernel)
    np.testing.assert_array_equal(frozen["label_mapping"]["index"], np.arange(8)[:, None])
    assert "head" not in trained["params"]  # only the prompt trains
    images = next(experiment.train_batches())["image"]
    logits, aux = experiment.method.apply(trained, frozen, images)
    source = np.asarray(aux["features"]) @ kernel + bias
    np.testing.assert_allclose(logits, source[:, :8], rtol=1e-5, atol=1e-5)


def counted_by_hand(experiment, trained, epoch, kernel, bias):
    """(predicted source, label) pairs over ``epoch``'s training batches, and their greedy
    assignment."""
    counts = np.zeros((10, 8), np.int64)
    start = epoch * experiment.steps_per_epoch
    batches = experiment.train_batches(start_step=start)
    for batch in itertools.islice(batches, experiment.steps_per_epoch):
        _, aux = experiment.method.apply(trained, experiment.frozen, batch["image"])
        predicted = np.argmax(np.asarray(aux["features"]) @ kernel + bias, axis=-1)
        np.add.at(counts, (predicted, batch["label"]), 1)
    assert counts.sum() == 256
    return label_mapping.greedy_assignment(counts)


def test_the_trainer_counts_the_frequency_mapping_before_step_0(shapes_data_dir, tmp_path):
    experiment, kernel, bias = demo_experiment("frequency", shapes_data_dir)
    expected = counted_by_hand(experiment, experiment.state["trained"], 0, kernel, bias)
    assert len(set(expected[:, 0])) == 8
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(experiment.config, str(workdir), max_steps=1)
    recorded = json.loads((workdir / "label_mapping.json").read_text())
    assert recorded == {"0": expected.tolist()}


def test_the_iterative_mapping_recounts_every_epoch_and_resumes_on_it(shapes_data_dir, tmp_path):
    config = demo_config("iterative", shapes_data_dir, num_epochs=2)
    config.optim.lr = 10.0  # so that epoch 0's training changes what the model predicts
    stored = np.load(config.backbone.checkpoint)
    kernel, bias = stored["head/kernel"], stored["head/bias"]
    uninterrupted = trainer.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

    workdir = tmp_path / "resumed"
    trainer.train_and_evaluate(config, str(workdir), max_steps=4)  # the end of epoch 0
    experiment = trainer.create_experiment(config)
    checkpoints = trainer.checkpoint.Checkpoints(workdir)
    try:
        epoch_0 = checkpoints.restore_latest(experiment.state)["trained"]
    finally:
        checkpoints.close()
    trainer.train_and_evaluate(config, str(workdir), max_steps=2)  # stopped in epoch 1
    resumed = trainer.train_and_evaluate(config, str(workdir))

    recorded = json.loads((workdir / "label_mapping.json").read_text())
    first = counted_by_hand(experiment, experiment.state["trained"], 0, kernel, bias)
    second = counted_by_hand(experiment, epoch_0, 1, kernel, bias)  # by the trained prompt
    assert recorded == {"0": first.tolist(), "1": second.tolist()}
    assert second.tolist() != first.tolist()  # so the recount is seen to use the trained prompt
    assert (tmp_path / "uninterrupted" / "label_mapping.json").read_text() == json.dumps(
        recorded, indent=2
    )
    for key in ("val", "test", "test_last", "best_step"):
        assert resumed[key] == uninterrupted[key]
    # The best state is served with the mapping it was validated with.
    restored, _ = trainer.restore_best(config, workdir)
    best_epoch = (resumed["best_step"] - 1) // restored.steps_per_epoch
    np.testing.assert_array_equal(
        restored.frozen["label_mapping"]["index"], recorded[str(best_epoch)]
    )
    # Without the record the mapping is unknown: refused, never served as first_c.
    (workdir / "label_mapping.json").unlink()
    with pytest.raises(InputError, match="holds no label_mapping.json with the head=iterative"):
        trainer.restore_best(config, workdir)


def test_the_trainer_maps_by_the_text_similarity_of_the_class_names(shapes_data_dir, tmp_path):
    """AutoVP's semantic mapping: the source head's names (the tiny ViT's: the 10 shapes it was
    pretrained on) and the 8 colours, bare, through the tiny CLIP's text tower."""
    import tensorflow_datasets as tfds

    from jprompt.models import backbones, clip_tokenizer
    from jprompt.train import config_lib

    def names(dataset):
        info = tfds.builder(dataset, data_dir=str(shapes_data_dir)).info
        return info.features["label"].names

    shapes = names("jprompt_shapes/shapes")
    names_file = tmp_path / "shapes.txt"
    names_file.write_text("\n".join(shapes) + "\n")
    config = demo_config("semantic", shapes_data_dir)
    config.head.source_class_names = str(names_file)
    experiment = trainer.create_experiment(config)

    clip_config = backbones.default_config(
        "clip_tiny4", checkpoint=config_lib.DEMO_CHECKPOINTS["clip_tiny4"]
    )
    clip, _ = backbones.build(clip_config, image_size=32, rng=jax.random.key(0))
    tokenize = clip_tokenizer.load_default()
    colours = [name.lower() for name in names(config.dataset.name)]
    expected = label_mapping.semantic(
        clip.text.encode(tokenize(shapes)), clip.text.encode(tokenize(colours))
    )
    np.testing.assert_array_equal(experiment.frozen["label_mapping"]["index"], expected)

    names_file.write_text("circle\nsquare\n")
    with pytest.raises(InputError) as error:
        trainer.create_experiment(config)
    assert str(error.value) == (
        f"head.source_class_names: {names_file} names 2 classes but the source head has 10; "
        "give one name per line for each of its outputs"
    )


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "demo,head=first_c",
            "a label mapping reads the classifier of a ViT checkpoint file; clip_tiny4 has none: "
            "use head=linear (or head=zeroshot on CLIP)",
        ),
        (
            "demo,backbone=vit_b16,head=semantic",
            "head=semantic needs the names of the source head's 10 classes: set "
            "head.source_class_names to a text file with one per line, in the head's order "
            "(for an ImageNet-1k head, the names AutoVP's IMGNET_CLASSNAME lists)",
        ),
    ],
)
def test_the_trainer_refuses_a_mapping_it_cannot_run_in_one_line(spec, message, shapes_data_dir):
    config = helpers.shrink(helpers.load_config("vp.py", spec), shapes_data_dir)
    with pytest.raises(InputError) as error:
        trainer.create_experiment(config)
    assert str(error.value) == message


def test_the_served_model_keeps_the_label_mapping():
    from jprompt.deploy.server import ServedModel
    from jprompt.methods import inversion

    module = vit.create("vit_tiny4")
    rng = np.random.default_rng(5)
    source = {
        "kernel": rng.normal(size=(64, 10)).astype(np.float32),
        "bias": rng.normal(size=10).astype(np.float32),
    }
    backbone = Backbone("vit_tiny4", module, 16, "minus_one_to_one", source_head=source)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    mapping = label_mapping.build("random", num_source=10, num_classes=3, rng=jax.random.key(1))
    method = VisualPrompt(backbone, 3, prompt_size=2, label_mapping=mapping)
    trained, frozen = method.init(jax.random.key(2), params)
    served = ServedModel.from_trained(backbone, trained, frozen)
    images = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    features, _ = backbone.features(params, inversion.normalize(images, "minus_one_to_one"))
    expected = (np.asarray(features) @ source["kernel"] + source["bias"])[:, mapping.index[:, 0]]
    np.testing.assert_allclose(served.logits(images), expected, rtol=1e-4, atol=1e-4)
