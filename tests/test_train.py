"""End-to-end training on the offline dataset: results, resume, sharding, frozen backbone."""

import json
import shutil

import helpers
import jax
import numpy as np
import pytest
from helpers import to_numpy

from jprompt.train import events, trainer


@pytest.fixture
def tiny_config(shapes_data_dir):
    """A demo config shrunk to 4 steps per epoch, 2 epochs, on sliced splits."""

    def make(file="vp.py", **overrides):
        config = helpers.shrink(
            helpers.load_config(file),
            shapes_data_dir,
            num_epochs=2,
            val_split="validation[:128]",
            test_split="test[:100]",  # not a multiple of the batch: padding
            warmup_steps=2,
        )
        config.log_every_steps = 2
        config.update_from_flattened_dict(overrides)
        return config

    return make


def test_run_writes_results_events_checkpoints_and_resumes(tiny_config, tmp_path):
    config = tiny_config()
    results = trainer.train_and_evaluate(config, str(tmp_path))

    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results
    assert results["total_steps"] == 8
    assert results["test"]["num_examples"] == 100  # every test example exactly once
    assert results["val"]["num_examples"] == 128
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    assert results["best_step"] in (4, 8)
    scalars = events.read_scalars(tmp_path)
    assert [step for step, _ in scalars["train_loss"]] == [2, 4, 6, 8]  # log_every_steps=2
    assert dict(scalars["val_accuracy"])[results["best_step"]] == results["val"]["accuracy"]
    assert scalars["test_accuracy"] == [(8, results["test"]["accuracy"])]
    # VP draws its prompted validation images after each epoch.
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "prompted_4.png",
        "prompted_8.png",
    ]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
    assert [p.name for p in (tmp_path / "best").iterdir()] == [str(results["best_step"])]

    # A second run with the same workdir returns the stored results, marked as such: nothing is
    # retrained or rewritten.
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    again = trainer.train_and_evaluate(config, str(tmp_path))
    assert again == results | {"stored": True}
    assert (tmp_path / "results.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]


def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path):
    config = tiny_config()
    whole = trainer.train_and_evaluate(config, str(tmp_path / "whole"))
    # Stop mid-epoch, then again after the first epoch's checkpoint, lose that last checkpoint
    # as a SIGKILL before its commit would (step 6's metrics are written, so the resumed run
    # computes them again from step 4), then finish.
    parts = tmp_path / "parts"
    assert trainer.train_and_evaluate(config, str(parts), max_steps=3)["stopped_at_step"] == 3
    assert trainer.train_and_evaluate(config, str(parts), max_steps=3)["stopped_at_step"] == 6
    shutil.rmtree(parts / "checkpoints" / "6")
    resumed = trainer.train_and_evaluate(config, str(parts))

    experiment = trainer.create_experiment(config)
    expected = helpers.latest_trained(tmp_path / "whole", experiment)
    got = helpers.latest_trained(parts, experiment)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert resumed["test"] == whole["test"]
    # TensorBoard holds each step once: the resumed run did not write step 6 again.
    scalars, expected = events.read_scalars(parts), events.read_scalars(tmp_path / "whole")
    assert [step for step, _ in scalars["train_loss"]] == [2, 3, 4, 6, 8]  # 3: the stop
    assert [step for step, _ in scalars["val_accuracy"]] == [4, 8]
    assert dict(scalars["train_loss"])[6] == dict(expected["train_loss"])[6]
    assert scalars["val_accuracy"] == expected["val_accuracy"]


def run_steps(experiment, num_steps):
    """Per-step losses and the final trained tree as numpy."""
    losses, state = helpers.run_steps(experiment, num_steps)
    return losses, to_numpy(state["trained"])


@pytest.mark.parametrize("file", ["vp.py", "finetune.py"])
def test_eight_devices_match_one_device(tiny_config, file):
    config = tiny_config(file)
    assert jax.device_count() == 8
    sharded = trainer.create_experiment(config)
    single = trainer.create_experiment(config, devices=jax.devices()[:1])
    losses_8, params_8 = run_steps(sharded, 4)
    losses_1, params_1 = run_steps(single, 4)
    np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
    assert losses_8[-1] != losses_8[0]  # it trained
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_8, params_1
    )


@pytest.mark.parametrize("file", ["vp.py", "linear_probe.py"])
def test_frozen_backbone_is_bit_identical_after_training(tiny_config, file):
    experiment = trainer.create_experiment(tiny_config(file))
    frozen_before = to_numpy(experiment.frozen)
    trained_before = to_numpy(experiment.state["trained"])
    assert "backbone" not in trained_before["params"]
    _, trained_after = run_steps(experiment, 3)
    jax.tree.map(np.testing.assert_array_equal, to_numpy(experiment.frozen), frozen_before)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), trained_after, trained_before)
    assert all(jax.tree.leaves(changed))  # every trainable leaf moved


def test_finetune_trains_the_backbone(tiny_config):
    experiment = trainer.create_experiment(tiny_config("finetune.py"))
    assert experiment.frozen == {}
    before = to_numpy(experiment.state["trained"]["params"]["backbone"])
    # The zero-initialised head passes no gradient on the first steps (and warmup starts at lr 0).
    _, after = run_steps(experiment, 4)
    embedding_moved = not np.array_equal(
        after["params"]["backbone"]["embedding"]["kernel"], before["embedding"]["kernel"]
    )
    assert embedding_moved


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    config = tiny_config()
    trainer.train_and_evaluate(config, str(tmp_path), max_steps=4)  # one good epoch
    config.unlock()
    config.optim.lr = 1e30
    config.optim.lr_by_path = (("head/.*", 1e30),)
    config.resume_with_changes = True  # the same workdir, on purpose
    # Step 5 still sees the good parameters; its update explodes them, so step 6's loss is the
    # first non-finite one, and the check after step 6 reports exactly that step.
    with pytest.raises(FloatingPointError, match=r"loss became NaN or Inf at step 6") as error:
        trainer.train_and_evaluate(config, str(tmp_path))
    assert "last good checkpoint (step 4) is kept" in str(error.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]


def test_non_finite_input_is_reported_with_its_step(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(log_every_steps=4)
    clean_batches = trainer.Experiment.train_batches

    def batches_with_a_nan_at_step_3(self, start_step=0):
        for step, batch in enumerate(clean_batches(self, start_step), start=start_step + 1):
            if step == 3:
                batch = {**batch, "image": batch["image"].copy()}  # tf.data's arrays are read-only
                batch["image"][1, 2, 3, 0] = np.nan
            yield batch

    monkeypatch.setattr(trainer.Experiment, "train_batches", batches_with_a_nan_at_step_3)
    with pytest.raises(FloatingPointError, match="input images of step 3 contain NaN") as error:
        trainer.train_and_evaluate(config, str(tmp_path))
    assert "no checkpoint was written before it" in str(error.value)
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_unwritable_workdir_fails_before_any_work(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        trainer.train_and_evaluate(tiny_config(), str(blocker / "workdir"))


def test_batch_not_divisible_by_devices_fails_clearly(tiny_config):
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        trainer.create_experiment(tiny_config(batch_size=60))


def test_unknown_backbone_and_dataset_fail_listing_choices(tiny_config):
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_q16'; valid choices: \[.*vit_b16"):
        trainer.create_experiment(tiny_config(**{"backbone.name": "vit_q16"}))
    with pytest.raises(ValueError, match=r"unknown tfds dataset 'cifar1000'.*close matches"):
        trainer.create_experiment(tiny_config(**{"dataset.name": "cifar1000"}))
    with pytest.raises(ValueError, match=r"unknown config 'colours'.*valid configs: \['shapes'"):
        trainer.create_experiment(tiny_config(**{"dataset.name": "jprompt_shapes/colours"}))


def test_test_selected_number_is_reported_apart_and_never_selects(tiny_config, tmp_path):
    results = trainer.train_and_evaluate(tiny_config(report_test_selected=True), str(tmp_path))
    each_epoch = json.loads((tmp_path / trainer.TEST_EACH_EPOCH_FILE).read_text())
    assert sorted(each_epoch) == ["4", "8"]  # after each of the 2 epochs of 4 steps
    # The honest number is the validation-selected state's: one of the per-epoch ones.
    assert each_epoch[str(results["best_step"])] == results["test"]["accuracy"]
    selected = results["test_selected"]
    assert selected["accuracy"] == max(each_epoch.values()) >= results["test"]["accuracy"]
    assert each_epoch[str(selected["step"])] == selected["accuracy"]
    assert "optimistic" in selected["note"]


def test_selection_last_tests_the_final_state(tiny_config, tmp_path):
    config = tiny_config(selection="last")
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["best_step"] == results["total_steps"] == 8
    experiment = trainer.create_experiment(config)
    final = experiment.evaluate(helpers.latest_trained(tmp_path, experiment), "test[:100]")
    assert results["test"] == final
    with pytest.raises(ValueError, match=r"unknown selection 'best'; valid choices: \('val'"):
        trainer.create_experiment(tiny_config(selection="best"))


def test_dataset_that_does_not_fit_its_preset_fails_naming_both(tiny_config):
    config = tiny_config()
    config.dataset.name = "jprompt_shapes/count"  # 6 classes; the colors preset says 8
    with pytest.raises(ValueError) as error:
        trainer.create_experiment(config)
    assert str(error.value).startswith(
        "config.dataset.num_classes=8 (preset 'jprompt_shapes/colors') but jprompt_shapes/count "
        "has 6 classes"
    )
    assert "dataset=NAME" in str(error.value)
