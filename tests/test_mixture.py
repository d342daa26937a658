"""Mixtures of datasets (``jprompt.data.mixture``): one PGN trained on several presets at once,
in the union of their labels, scored per dataset, with its division of the token library."""

import collections
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import load_config
from test_data import AUGMENT, example_keys, read_split, take, to_uint8

from jprompt.data import mixture, synthetic
from jprompt.data.preprocess import PreprocessSpec
from jprompt.train import trainer, visualize

TASKS = ("colors", "count", "textures")
MIX = "mix/" + "+".join(f"jprompt_shapes/{task}" for task in TASKS)
# train / validation / test sizes: unequal, so that proportional and uniform sampling differ.
SIZES = {"colors": (20, 10, 10), "count": (12, 6, 6), "textures": (8, 4, 4)}
OFFSETS = (0, 8, 14)  # 8 colours, then 6 counts, then 8 textures: 22 classes
PLAIN = PreprocessSpec(32)  # the images' own size: pixels unchanged


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory):
    """The three target tasks of ``jprompt_shapes``, prepared tiny (about a second each)."""
    data_dir = str(tmp_path_factory.mktemp("tiny_shapes"))
    with pytest.MonkeyPatch.context() as patch:
        for task, sizes in SIZES.items():
            splits = dict(zip(("train", "validation", "test"), sizes, strict=True))
            patch.setattr(synthetic, "SPLIT_SIZES", splits)
            tfds.builder(f"jprompt_shapes/{task}", data_dir=data_dir).download_and_prepare()
    return data_dir


def reference(data_dir, split):
    """Every example of the three tasks' ``split`` as (source, union label, image hash)."""
    keys = []
    for source, (task, offset) in enumerate(zip(TASKS, OFFSETS, strict=True)):
        images, labels = read_split(data_dir, split, f"jprompt_shapes/{task}")
        keys += [(source, *key) for key in example_keys(images, labels + offset)]
    return collections.Counter(keys)


def keys_of(batches):
    keys = []
    for batch in batches:
        real = batch.get("mask", np.ones(len(batch["label"]))) > 0
        for source, key in zip(
            batch["source"][real],
            example_keys(to_uint8(batch["image"][real]), batch["label"][real]),
            strict=True,
        ):
            keys.append((int(source), *key))
    return collections.Counter(keys)


def batches(data_dir, **kwargs):
    kwargs = {"global_batch_size": 8, "spec": PLAIN, "seed": 0, "process_count": 1, **kwargs}
    kwargs.setdefault("process_index", 0)
    return mixture.train_iterator(MIX, "train", data_dir=data_dir, **kwargs)


def test_union_of_labels_and_class_names(mix_dir):
    info = mixture.dataset_info(MIX, "train", data_dir=mix_dir)
    names = tuple(name for task in TASKS for name in synthetic.TASKS[task][0])
    assert (info.num_classes, info.num_examples, info.class_names) == (22, 40, names)
    parts = mixture.components(MIX, "val", data_dir=mix_dir)
    assert [p.offset for p in parts] == list(OFFSETS)
    assert [p.split for p in parts] == ["validation"] * 3  # the presets' own val split


@pytest.mark.parametrize(("drop_last", "process_count", "batch"), [(True, 1, 8), (False, 2, 16)])
def test_proportional_pass_holds_every_example_once(mix_dir, drop_last, process_count, batch):
    # 40 examples: 5 batches of 8 per pass; or per process 20 in 3 batches of 8 (4 padding).
    steps = 5 if drop_last else 3
    passes = [collections.Counter(), collections.Counter()]
    for index in range(process_count):
        stream = batches(
            mix_dir,
            global_batch_size=batch,
            drop_last=drop_last,
            process_index=index,
            process_count=process_count,
        )
        for epoch in passes:
            epoch.update(keys_of(take(stream, steps)))
    expected = reference(mix_dir, "train")
    assert passes[0] == expected and passes[1] == expected


def test_uniform_sampling_draws_each_component_a_third_of_the_time(mix_dir):
    stream = batches(mix_dir, global_batch_size=40, sampling="uniform")
    drawn = collections.Counter(np.concatenate([b["source"] for b in take(stream, 15)]))
    # 600 draws: about 200 each (binomial sd 11.5), where proportional gives 300 : 180 : 120.
    assert all(abs(drawn[source] - 200) < 40 for source in range(3)), drawn


@pytest.mark.parametrize(("sampling", "drop_last"), [("proportional", True), ("uniform", False)])
def test_resuming_equals_never_stopping(mix_dir, sampling, drop_last):
    # Steps 3..8 cross a pass boundary; augmentation is random per example.
    options = dict(spec=AUGMENT, sampling=sampling, drop_last=drop_last)
    fresh = take(batches(mix_dir, **options), 9)
    resumed = take(batches(mix_dir, start_step=3, **options), 6)
    for expected, got in zip(fresh[3:], resumed, strict=True):
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_a_component_is_evaluated_alone_with_union_labels(mix_dir):
    options = dict(global_batch_size=8, spec=PLAIN, data_dir=mix_dir, process_count=1)
    count = list(mixture.eval_iterator(MIX, "test", component=1, process_index=0, **options))
    images, labels = read_split(mix_dir, "test", "jprompt_shapes/count")
    real = count[0]["mask"] > 0
    assert len(count) == 1 and real.sum() == 6 and (count[0]["source"] == 1).all()
    np.testing.assert_array_equal(count[0]["label"][real], labels + 8)
    np.testing.assert_array_equal(to_uint8(count[0]["image"][real]), images)
    whole = list(mixture.eval_iterator(MIX, "test", process_index=0, **options))
    assert keys_of(whole) == reference(mix_dir, "test")
    del options["spec"]
    assert len(whole) == mixture.num_eval_batches(MIX, "test", **options) == 2 + 1 + 1


def test_tally_scores_over_all_and_own_classes():
    tally = mixture.Tally(offset=2, num_classes=2)  # classes 2 and 3 of 5
    logits = np.array(
        [
            [0, 0, 1, 0, 0],  # right
            [9, 0, 0, 1, 0],  # wrong over all classes, right over its own (3)
            [0, 0, 1, 0, 0],  # wrong both ways (label 3)
            [0, 0, 0, 9, 0],  # padding
        ],
        np.float32,
    )
    weights = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]], [[9.0, 9.0]]])
    tally.add(logits, np.array([2, 3, 3, 3]), np.array([1, 1, 1, 0]), weights)
    assert tally.result() == {
        "accuracy": 1 / 3,
        "accuracy_own_classes": 2 / 3,
        "num_examples": 3,
    }
    np.testing.assert_allclose(tally.mean_usage(), [[0.5, 0.5]])


def test_division_of_labour_is_a_jensen_shannon_divergence():
    both = np.array([[1.0, 0.0], [0.0, 1.0]])  # (K=2, N=2): rows used half and half
    first = np.array([[1.0, 0.0], [1.0, 0.0]])  # only row 0
    second = np.array([[0.0, 1.0], [0.0, 1.0]])  # only row 1
    assert mixture.division_of_labour([both, both, both]) == 0.0
    assert mixture.division_of_labour([first, second]) == pytest.approx(1.0)  # disjoint: 1 bit
    # (1/2, 1/2) against (1, 0): their middle is (3/4, 1/4).
    by_hand = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    by_hand += 0.5 * math.log2(1 / 0.75)
    assert mixture.division_of_labour([both, first]) == pytest.approx(by_hand)
    assert mixture.division_of_labour([both, first, second]) == pytest.approx((2 * by_hand + 1) / 3)


def test_heatmaps_share_one_scale():
    class Library:  # a method whose images are their own (B, K=1, N=2) token weights
        def token_weights(self, trained, images):
            return images

    by_source = [np.array([[[0.0, 1.0]], [[0.0, 1.0]]]), np.array([[[1.0, 0.0]], [[0.0, 0.0]]])]
    picture = visualize.token_usage_picture(Library(), None, by_source)["token_usage_by_source"]
    np.testing.assert_array_equal(
        picture, visualize.heatmaps([np.array([[0.0, 1.0]]), np.array([[0.5, 0.0]])])
    )
    picture = visualize.heatmaps([np.array([[0.0, 1.0]]), np.array([[0.5, 0.0]])], pad=1)
    cell = 256  # 512 pixels over N = 2 rows of the library
    assert picture.shape == (3 + 2 * cell, 2 + 2 * cell, 3)
    first, second = 1 + cell // 2, 2 + cell + cell // 2  # centres of the two maps' rows
    left, right = 1 + cell // 2, 1 + cell + cell // 2
    assert picture[first, left, 0] == 0 and picture[first, right, 0] == 255
    assert picture[second, left, 0] == 128 and picture[second, right, 0] == 0
    assert picture[0, 0, 0] == 255  # the white gap


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mix/", "empty component"),
        ("mix/colors+nope", "unknown preset 'colors'.*did you mean \\['jprompt_shapes/colors'\\]"),
        ("mix/jprompt_shapes/colors", "has one component; .*dataset=jprompt_shapes/colors"),
        ("mix/jprompt_shapes/count+jprompt_shapes/count", "names a preset twice"),
    ],
)
def test_bad_mixture_fails_with_one_clear_line(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        load_config("pgn.py", f"demo,dataset={spec}")
    assert "\n" not in str(error.value)


def test_each_component_is_scored_alone(mix_dir):
    def predict(batch, index):
        """Right on colours; on counts right only among its own classes (a colour scores
        higher); ties on textures, so only label 14 is right among its own (its first class);
        a token usage per source."""
        source = batch["source"][0]
        logits = np.eye(22, dtype=np.float32)[batch["label"]] * (source != 2)
        logits[:, 0] += 2.0 * (source == 1)
        weights = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])[batch["source"]][:, None]
        return {**batch, "logits": logits, "token_weights": weights}

    options = dict(global_batch_size=8, spec=PLAIN, data_dir=mix_dir, process_count=1)
    scores, usages = mixture.score(predict, MIX, "test", process_index=0, **options)
    assert scores == {
        "jprompt_shapes/colors": {"accuracy": 1.0, "accuracy_own_classes": 1.0, "num_examples": 10},
        "jprompt_shapes/count": {"accuracy": 0.0, "accuracy_own_classes": 1.0, "num_examples": 6},
        # test labels are index % 8: 0, 1, 2, 3; the tie picks class 0 of all, 14 of its own
        "jprompt_shapes/textures": {
            "accuracy": 0.0,
            "accuracy_own_classes": 0.25,
            "num_examples": 4,
        },
    }
    np.testing.assert_array_equal(np.stack(usages), [[[1, 0]], [[0, 1]], [[0.5, 0.5]]])


def test_a_mixture_experiment_has_the_union_head_and_tagged_batches(mix_dir):
    config = load_config("pgn.py", f"demo,dataset={MIX}")
    assert config.dataset.num_classes == 22 and config.dataset.sampling == "proportional"
    config.dataset.data_dir = mix_dir
    config.batch_size = config.eval_batch_size = 8
    experiment = trainer.create_experiment(config)
    assert experiment.method.zeroshot.num_classes == experiment.method.num_classes == 22
    assert experiment.steps_per_epoch == 5  # 40 examples, batches of 8
    batch = next(experiment.train_batches())
    assert batch["source"].dtype == np.int32 and set(batch["source"]) <= {0, 1, 2}
    for source, label in zip(batch["source"], batch["label"], strict=True):
        assert OFFSETS[source] <= label < (OFFSETS[1:] + (22,))[source]
