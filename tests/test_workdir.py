"""A workdir remembers its config: a rerun with another one stops before any work, naming the
differences, and leaves every file as it was; operational fields may change; a finished run's
results are returned marked as stored."""

import json
import shutil

import helpers
import pytest

from jprompt.errors import InputError
from jprompt.train import config_lib, trainer, workdir


@pytest.fixture(scope="module")
def finished(shapes_data_dir, tmp_path_factory):
    """``(config, workdir, results)`` of a finished 4-step run."""
    config = helpers.shrink(helpers.load_config("vp.py"), shapes_data_dir)
    config.log_every_steps = 2
    path = tmp_path_factory.mktemp("finished")
    return config, path, trainer.train_and_evaluate(config, str(path))


def with_fields(config, **fields):
    """A copy of ``config`` with dotted ``fields`` set."""
    config = config.copy_and_resolve_references()
    config.unlock()
    for dotted, value in fields.items():
        config_lib.set_field(config, dotted.replace("__", "."), value)
    return config


def files(path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def unfinished_copy(path, tmp_path):
    """The finished run's workdir without its results: a run stopped after its last step."""
    copy = tmp_path / "unfinished"
    shutil.copytree(path, copy)
    (copy / "results.json").unlink()
    return copy


def test_first_run_saves_its_config(finished):
    config, path, _ = finished
    assert json.loads((path / "config.json").read_text()) == json.loads(config_lib.to_json(config))


def test_changed_config_on_a_finished_workdir_stops_and_touches_nothing(finished):
    config, path, _ = finished
    before = files(path)
    with pytest.raises(InputError) as error:
        trainer.train_and_evaluate(with_fields(config, optim__lr=5.0, num_epochs=2), str(path))
    assert str(error.value) == (
        f"{path} holds a finished run of another config (saved in {path}/config.json): "
        f"num_epochs: 1 -> 2; optim.lr: 10.0 -> 5.0. Its results stay in {path}/results.json; "
        "run this config with a fresh --workdir"
    )
    assert files(path) == before


def test_changed_config_on_an_unfinished_workdir_stops_and_touches_nothing(finished, tmp_path):
    config, path, _ = finished
    copy = unfinished_copy(path, tmp_path)
    before = files(copy)
    with pytest.raises(InputError) as error:
        trainer.train_and_evaluate(with_fields(config, dataset__name="x"), str(copy))
    assert str(error.value) == (
        f"{copy} holds an unfinished run of another config (saved in {copy}/config.json): "
        'dataset.name: "jprompt_shapes/colors" -> "x". Run this config with a fresh --workdir, '
        "or continue that run with these changes on purpose with "
        "--config.resume_with_changes=True"
    )
    assert files(copy) == before


def test_operational_change_returns_the_stored_results_marked(finished, caplog):
    config, path, results = finished
    before = files(path)
    rerun = with_fields(config, eval_batch_size=128, log_every_steps=1, model_axis_size=2)
    with caplog.at_level("INFO"):
        assert trainer.train_and_evaluate(rerun, str(path)) == results | {"stored": True}
    assert f"{path} holds the finished run of this config: these are its stored results" in (
        caplog.text
    )
    assert files(path) == before


def test_resume_with_changes_continues_and_keeps_the_replaced_config(finished, tmp_path):
    config, path, _ = finished
    copy = unfinished_copy(path, tmp_path)
    old = (copy / "config.json").read_text()
    rerun = with_fields(config, optim__lr=5.0)
    rerun.resume_with_changes = True
    results = trainer.train_and_evaluate(rerun, str(copy))  # step 4 of 4: evaluates the test
    assert results["total_steps"] == 4 and "stored" not in results
    assert (copy / "config.until_step_4.json").read_text() == old
    assert json.loads((copy / "config.json").read_text())["optim"]["lr"] == 5.0


def test_many_differences_are_counted_after_ten(tmp_path):
    saved = {"a": {f"f{i:02d}": i for i in range(13)}, "log_every_steps": 1}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    current = {"a": {f"f{i:02d}": -i for i in range(1, 13)}, "log_every_steps": 2, "new": ""}
    with pytest.raises(InputError, match=r"a\.f09: 9 -> -9; and 4 more\. Run this") as error:
        workdir.check_config(
            tmp_path, json.dumps(current), finished=False, resume_with_changes=False
        )
    assert "a.f00: 0 -> (absent); a.f01: 1 -> -1;" in str(error.value)
    assert "log_every_steps" not in str(error.value)  # operational
