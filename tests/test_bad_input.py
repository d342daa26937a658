"""Bad input at the command line, in a config or as a checkpoint file fails with one line that
names the problem and the fix, before anything is written."""

import subprocess
import sys
import zipfile

import helpers
import numpy as np
import pytest
from etils import epath

from jprompt.errors import InputError, MissingFileError
from jprompt.models import backbones, clip_checkpoint, vit_checkpoint
from jprompt.train import config_lib

NPZ = ".npz (the zip of named arrays numpy.savez writes)"
LR_FIX = "set --config.optim.lr to a finite number >= 0"
DEMO_DATASETS = [
    "jprompt_shapes/shapes",
    "jprompt_shapes/colors",
    "jprompt_shapes/count",
    "jprompt_shapes/textures",
]


def load(spec, **overrides):
    """The config the command line builds and checks for ``--config=SPEC --config.K=V ...``."""
    config = config_lib.load(str(helpers.ROOT / "configs" / spec), overrides)
    config_lib.validate(config)
    return config


def one_line_error(error) -> str:
    message = str(error.value)
    assert isinstance(error.value, InputError) and "\n" not in message
    return message


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"num_epochs": "-1"},
            "num_epochs=-1 is negative; set --config.num_epochs to 0 (evaluate only) or more",
        ),
        ({"batch_size": "0"}, "batch_size=0 is not positive; set --config.batch_size >= 1"),
        ({"optim.lr": "nan"}, f"optim.lr=nan is not a learning rate; {LR_FIX}"),
        ({"optim.lr": "-0.5"}, f"optim.lr=-0.5 is not a learning rate; {LR_FIX}"),
        (
            {"optim.lr_by_path": "(('head/.*', -1.0),)"},
            "optim.lr_by_path gives 'head/.*' lr=-1.0, not a learning rate; each must be a "
            "finite number >= 0",
        ),
        ({"optim.lrr": "0.5"}, "unknown config field 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"optimm.lr": "0.5"}, "unknown config field 'optimm.lr'; did you mean 'optim.lr'?"),
        ({"num_epochs": "1.5"}, "config field 'num_epochs' expects an integer, got '1.5'"),
        (
            {"optim.schedule": "linear"},
            "unknown optim.schedule 'linear'; valid choices: ('cosine', 'constant')",
        ),
    ],
)
def test_bad_field_fails_in_one_line_naming_the_fix(overrides, message):
    with pytest.raises(InputError) as error:
        load("vp.py:demo", **overrides)
    assert one_line_error(error) == message


def test_demo_honours_an_offline_dataset_and_the_backbone_family():
    config = load("vp.py:demo,dataset=jprompt_shapes/count,backbone=clip_b16")
    assert (config.dataset.name, config.dataset.num_classes) == ("jprompt_shapes/count", 6)
    assert config.backbone.name == "clip_tiny4"
    assert load("pgn.py:demo,backbone=vit_b32").backbone.name == "vit_tiny4"
    # Without dataset=, the demo's own task.
    assert load("vpt.py:demo").dataset.name == "jprompt_shapes/colors"


@pytest.mark.parametrize(
    "spec,dataset",
    [
        ("vp.py:demo,dataset=cifar10", "cifar10"),
        ("vpt.py:demo,dataset=cifar100", "cifar100"),  # the file's default, given on purpose
        ("pgn.py:demo,dataset=mix/jprompt_shapes/colors+cifar10", "cifar10"),
    ],
)
def test_demo_rejects_a_dataset_it_cannot_use(spec, dataset):
    with pytest.raises(InputError) as error:
        load(spec)
    assert one_line_error(error) == (
        "demo trains a shipped tiny backbone at 32px on an offline jprompt_shapes task, not on "
        f"dataset={dataset!r}: choose one of {DEMO_DATASETS}, or drop demo to train on "
        f"{dataset} (its download and a full-size backbone)"
    )


@pytest.mark.parametrize("spec", ["vp.py:demo,backbone=nonexistent", "vpt.py:backbone=vit_b61"])
def test_unknown_backbone_fails_listing_the_choices(spec):
    with pytest.raises(InputError) as error:
        load(spec)
    name = spec.rpartition("=")[2]
    choices = list(backbones.NAMES)
    assert "vit_b16" in choices and "clip_b32" in choices
    assert one_line_error(error) == f"unknown backbone {name!r}; valid choices: {choices}"


def test_missing_config_file_lists_the_files_there(tmp_path):
    (tmp_path / "mine.py").write_text("")
    with pytest.raises(MissingFileError) as error:
        config_lib.load(f"{tmp_path}/mien.py:demo")
    assert one_line_error(error) == (
        f"config file '{tmp_path}/mien.py' does not exist; config files there: "
        f"['{tmp_path}/mine.py']"
    )


def test_file_that_is_no_npz_is_named_with_what_was_expected(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(bytes(range(256)) * 4)
    single = tmp_path / "single.npz"
    with single.open("wb") as f:
        np.save(f, np.zeros(3))  # one .npy array, no archive
    torch_zip = tmp_path / "model.npz"
    with zipfile.ZipFile(torch_zip, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, w=np.zeros(1000))
    truncated.write_bytes(truncated.read_bytes()[:100])
    expected = {
        garbage: f"{garbage} is not a {NPZ}: it is another format or a truncated download",
        single: f"{single} is not a {NPZ}: it is another format or a truncated download",
        torch_zip: f"{torch_zip} is a zip archive but not a {NPZ}: its entries "
        "['archive/data.pkl'] are no arrays",
        truncated: f"cannot read {truncated} as a {NPZ}: File is not a zip file",
    }
    for path, message in expected.items():
        for read in (vit_checkpoint.load_npz, clip_checkpoint.read_state_dict):
            with pytest.raises(InputError) as error:
                read(path)
            assert one_line_error(error) == message


def test_missing_checkpoint_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(MissingFileError) as error:
        vit_checkpoint.load_npz(tmp_path / "absent.npz")
    assert one_line_error(error) == (
        f"there is no ViT checkpoint {tmp_path}/absent.npz: set --config.backbone.checkpoint to "
        f"an existing {NPZ} in vit_jax or big_vision naming"
    )

    # Offline, the storage backend fails on any gs:// path; the error names the file, how to
    # fetch it and where the config should point.
    def unreachable(self):
        raise ConnectionError("Could not resolve host: www.googleapis.com\nmore details")

    monkeypatch.setattr(type(epath.Path("gs://bucket/x")), "exists", unreachable)
    file = "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz"
    assert config_lib.CHECKPOINTS["vit_s16"] == f"gs://vit_models/augreg/{file}"
    with pytest.raises(MissingFileError) as error:
        vit_checkpoint.load_npz(config_lib.CHECKPOINTS["vit_s16"])
    assert one_line_error(error) == (
        f"cannot reach the ViT checkpoint gs://vit_models/augreg/{file} (ConnectionError: Could "
        f"not resolve host: www.googleapis.com): fetch it once with gsutil cp "
        f"gs://vit_models/augreg/{file} ~/jprompt_models/{file} (or download "
        f"https://storage.googleapis.com/vit_models/augreg/{file}) and set "
        f"--config.backbone.checkpoint=~/jprompt_models/{file}"
    )


def test_a_method_option_the_method_refuses_fails_in_one_line(shapes_data_dir):
    from jprompt.train import trainer

    config = load("vpt.py:demo", **{"method.spt_sample": "max_pooling"})
    with pytest.raises(InputError) as error:
        trainer.create_experiment(helpers.shrink(config, shapes_data_dir))
    assert one_line_error(error) == (
        "config.method: spt_sample='max_pooling' pools deep layers' tokens; shallow SPT samples "
        "patch embeddings at random (spt_sample='random'), as the official code"
    )


def main(*args, timeout=300):
    """``python -m jprompt.main ARGS``, as a user runs it."""
    command = [sys.executable, "-m", "jprompt.main", *map(str, args)]
    return subprocess.run(
        command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_cli_prints_a_config_error_as_one_line_and_creates_nothing(tmp_path):
    result = main(
        "--config=configs/vp.py:demo", "--config.optim.lrr=0.5", f"--workdir={tmp_path}/w"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "unknown config field 'optim.lrr'; did you mean 'optim.lr'?"
    )
    assert not (tmp_path / "w").exists()


def test_cli_prints_a_bad_checkpoint_as_one_line_and_writes_nothing(tmp_path, shapes_data_dir):
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not weights")
    workdir = tmp_path / "w"
    result = main(
        "--config=configs/vp.py:demo",
        f"--config.backbone.checkpoint={garbage}",
        f"--config.dataset.data_dir={shapes_data_dir}",
        f"--workdir={workdir}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{garbage} is not a {NPZ}: it is another format or a truncated download"
    )
    assert not workdir.exists() or not any(workdir.iterdir())


def test_cli_help_exits_0_and_says_where_the_config_args_are():
    result = main("--help")
    assert result.returncode == 0
    assert "each file\nlists its args in its docstring (configs/*.py)" in result.stdout
    assert "--config.FIELD=VALUE" in result.stdout and "--workdir" in result.stdout
