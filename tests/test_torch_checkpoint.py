"""The torch-free reader of PyTorch ``.pt`` state dicts.

Reference values were produced once with torch 2.13.0 (CPU) in a throwaway virtualenv, never a
dependency of this project: ``torch.load`` of the released fixtures, and ``torch.save`` of the small
state dict described at ``TORCH_DATA_PKL`` (whose pickle bytes are stored below verbatim). The
archives this file assembles were also checked to load in torch 2.13 with ``torch.load`` to
exactly ``EXPECTED``, in both byte orders.
"""

import collections
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from jprompt.models import torch_checkpoint
from jprompt.models.torch_checkpoint import TorchCheckpointError, load_state_dict

# CI clones the repository with shared/ beside it.
FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"released PGN weights not found: {FIXTURES} is absent"
)

# ``small/data.pkl`` written by torch 2.13.0's ``torch.save`` for this OrderedDict:
#   base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
#   f32 = base; f32_t = base.t() (stride (1, 6)); f32_off = base[1:, 2:4] (offset 8, one storage)
#   f16 = tensor([1.5, -2.25, 65504.]) half;  bf16 = tensor([[1, -0.5], [3, 1e30]]) bfloat16
#   i64 = tensor([-3, 2**40]);  scalar = tensor(7)  (int64, 0-d)
# Storages: data/0 float32[24], data/1 float16[3], data/2 bfloat16[4], data/3 int64[2],
# data/4 int64[1].
TORCH_DATA_PKL = bytes.fromhex(
    "800263636f6c6c656374696f6e730a4f726465726564446963740a7100295271012858030000006633327102"
    "63746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a7103282858070000007374"
    "6f72616765710463746f7263680a466c6f617453746f726167650a7105580100000030710658030000006370"
    "7571074b18747108514b004b044b068671094b064b0186710a8968002952710b74710c52710d580500000066"
    "33325f74710e6803282868046805680668074b1874710f514b004b064b048671104b014b0686711189680029"
    "52711274711352711458070000006633325f6f666671156803282868046805680668074b18747116514b084b"
    "034b028671174b064b018671188968002952711974711a52711b5803000000663136711c6803282868046374"
    "6f7263680a48616c6653746f726167650a711d580100000031711e68074b0374711f514b004b038571204b01"
    "85712189680029527122747123527124580400000062663136712568032828680463746f7263680a42466c6f"
    "6174313653746f726167650a7126580100000032712768074b04747128514b004b024b028671294b024b0186"
    "712a8968002952712b74712c52712d5803000000693634712e68032828680463746f7263680a4c6f6e675374"
    "6f726167650a712f580100000033713068074b02747131514b004b028571324b018571338968002952713474"
    "713552713658060000007363616c61727137680328286804682f580100000034713868074b01747139514b00"
    "29298968002952713a74713b52713c752e"
)
BASE = np.arange(24, dtype=np.float32).reshape(4, 6)
BF16_1E30_BITS = 29002  # torch.tensor(1e30, dtype=torch.bfloat16).view(torch.int16)
EXPECTED = {  # what torch.load returns, as numpy
    "f32": BASE,
    "f32_t": BASE.T,
    "f32_off": BASE[1:, 2:4],
    "f16": np.array([1.5, -2.25, 65504.0], np.float16),
    "bf16": np.array([[1.0, -0.5], [3.0, 1.0002555517425873e30]], np.float32),
    "i64": np.array([-3, 2**40], np.int64),
    "scalar": np.array(7, np.int64),
}


def storages(byteorder="little"):
    """The raw storage bytes torch writes for EXPECTED's tensors."""
    order = "<" if byteorder == "little" else ">"
    bf16_bits = np.array([0x3F80, 0xBF00, 0x4040, BF16_1E30_BITS], np.uint16)
    arrays = [
        BASE.ravel(),
        EXPECTED["f16"],
        bf16_bits,
        EXPECTED["i64"],
        np.array([7], np.int64),
    ]
    return {str(i): a.astype(a.dtype.newbyteorder(order)).tobytes() for i, a in enumerate(arrays)}


def write_archive(path, data_pkl, storage_bytes, *, prefix="small", byteorder="little"):
    """A zip laid out as ``torch.save`` lays it out (entries stored, not compressed)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", data_pkl)
        archive.writestr(f"{prefix}/.format_version", "1")
        archive.writestr(f"{prefix}/.storage_alignment", "64")
        if byteorder is not None:
            archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storage_bytes.items():
            archive.writestr(f"{prefix}/data/{key}", raw)
        archive.writestr(f"{prefix}/version", "3\n")
    return path


def assert_expected(loaded):
    assert list(loaded) == list(EXPECTED)
    for name, want in EXPECTED.items():
        assert loaded[name].dtype == want.dtype, name
        assert loaded[name].shape == want.shape, name
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_reads_what_torch_save_writes(tmp_path, byteorder):
    # None: files from torch < 1.10 have no byteorder entry and are little-endian.
    path = write_archive(
        tmp_path / "small.pt", TORCH_DATA_PKL, storages(byteorder or "little"), byteorder=byteorder
    )
    loaded = load_state_dict(path)
    assert_expected(loaded)
    # Views of one storage come back as independent contiguous arrays.
    assert loaded["f32_t"].flags.c_contiguous and not np.shares_memory(
        loaded["f32_t"], loaded["f32"]
    )


def test_archive_folder_name_is_not_fixed(tmp_path):
    path = write_archive(tmp_path / "x.pt", TORCH_DATA_PKL, storages(), prefix="archive")
    assert_expected(load_state_dict(path))


@needs_fixtures
@pytest.mark.parametrize(
    "name,library,outputs,tl_first,out_bias,running_var,tl_sum,steps",
    [
        # torch.load(...)["tl_vectors"][0, :3], ["model.output_net.2.bias"][:2],
        # ["model.blocks.3.net.4.running_var"][:2], tl_vectors.double().sum(),
        # ["model.input_net.1.num_batches_tracked"]
        (
            "pgn_clip_cifar10.pt",
            (256, 768),
            4096,
            [-0.010670416988432407, -0.3068627715110779, -0.05908437445759773],
            [-0.06380075961351395, -0.0910247191786766],
            [12.772849082946777, 12.865943908691406],
            22.32460923589582,
            163438,
        ),
        (
            "pgn_vit_cifar100.pt",
            (128, 768),
            2048,
            [0.009230632334947586, -0.007134599145501852, -0.06365635991096497],
            [-0.010786542668938637, -0.052964504808187485],
            [155.79701232910156, 105.07644653320312],
            -3.731560315735692,
            195500,
        ),
    ],
)
def test_released_pgn_fixtures(
    name, library, outputs, tl_first, out_bias, running_var, tl_sum, steps
):
    state = load_state_dict(FIXTURES / name)
    assert len(state) == 63
    assert list(state)[:3] == ["tl_vectors", "model.input_net.0.weight", "model.input_net.1.weight"]
    assert state["tl_vectors"].shape == library
    assert state["model.input_net.0.weight"].shape == (16, 3, 3, 3)
    assert state["model.blocks.3.net.3.weight"].shape == (128, 128, 3, 3)
    assert state["model.blocks.1.downsample.weight"].shape == (32, 16, 1, 1)
    assert state["model.blocks.1.downsample.bias"].shape == (32,)
    assert "model.blocks.0.downsample.weight" not in state
    assert state["model.output_net.2.weight"].shape == (outputs, 128)
    assert state["model.output_net.2.weight"].dtype == np.float32
    nbt = state["model.input_net.1.num_batches_tracked"]
    assert nbt.dtype == np.int64 and nbt.shape == () and int(nbt) == steps
    np.testing.assert_array_equal(state["tl_vectors"][0, :3], np.float32(tl_first))
    np.testing.assert_array_equal(state["model.output_net.2.bias"][:2], np.float32(out_bias))
    np.testing.assert_array_equal(
        state["model.blocks.3.net.4.running_var"][:2], np.float32(running_var)
    )
    np.testing.assert_allclose(state["tl_vectors"].astype(np.float64).sum(), tl_sum, rtol=1e-12)


def test_not_a_checkpoint_fails_clearly(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(TorchCheckpointError, match="not a PyTorch checkpoint"):
        load_state_dict(text)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "x")
    with pytest.raises(TorchCheckpointError, match=r"expected exactly one '<name>/data.pkl'"):
        load_state_dict(other_zip)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # torch's old magic
    with pytest.raises(TorchCheckpointError, match="legacy"):
        load_state_dict(legacy)


def test_truncated_file_fails_clearly(tmp_path):
    whole = write_archive(tmp_path / "whole.pt", TORCH_DATA_PKL, storages()).read_bytes()
    for cut in (len(whole) // 2, len(whole) - 10):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(whole[:cut])
        with pytest.raises(TorchCheckpointError, match="truncated"):
            load_state_dict(path)


def test_short_or_missing_storage_fails_clearly(tmp_path):
    short = storages()
    short["0"] = short["0"][:40]
    with pytest.raises(TorchCheckpointError, match=r"small/data/0.*has 40 bytes, expected 24 x 4"):
        load_state_dict(write_archive(tmp_path / "short.pt", TORCH_DATA_PKL, short))
    missing = storages()
    del missing["3"]
    with pytest.raises(TorchCheckpointError, match=r"'small/data/3' is missing"):
        load_state_dict(write_archive(tmp_path / "missing.pt", TORCH_DATA_PKL, missing))


def test_other_globals_are_refused_and_never_run(tmp_path):
    data_pkl = pickle.dumps(collections.OrderedDict(run=os.system), protocol=2)
    path = write_archive(tmp_path / "evil.pt", data_pkl, {})
    with pytest.raises(TorchCheckpointError, match=r"refusing to load global (posix|nt)\.system"):
        load_state_dict(path)


def test_non_state_dict_contents_fail_clearly(tmp_path):
    path = write_archive(tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2), {})
    with pytest.raises(TorchCheckpointError, match="holds a list, not a state dict"):
        load_state_dict(path)
    assert torch_checkpoint.load(path) == [1, 2]
    path = write_archive(tmp_path / "int.pt", pickle.dumps({"epoch": 3}, protocol=2), {})
    with pytest.raises(TorchCheckpointError, match=r"not tensors: \['epoch'\]"):
        load_state_dict(path)


# ``tiny_script/data.pkl`` written by torch 2.13.0's ``torch.jit.save(torch.jit.script(m))`` for
#   class Tiny(nn.Module):  # scripted, so saved as the TorchScript class __torch__.Tiny
#       proj = Parameter(arange(6.).reshape(2, 3).t())          (3, 2), stride (1, 3)
#       blocks = nn.Sequential(nn.LayerNorm(2))                 weight [0.5, -1], bias [0.25, 3]
#       input_resolution = buffer tensor(224);  scale = 2.0 (a float attribute)
# Storages: data/0 float32[6], data/1 int64[1], data/2 float32[2], data/3 float32[2].
SCRIPT_DATA_PKL = bytes.fromhex(
    "8002635f5f746f7263685f5f0a54696e790a710029817d28580400000070726f6a710163746f7263682e5f7574"
    "696c730a5f72656275696c645f74656e736f725f76320a71022828580700000073746f72616765710363746f72"
    "63680a466c6f617453746f726167650a71045801000000307105580300000063707571064b06745171074b0028"
    "4b034b0274284b014b03748863636f6c6c656374696f6e730a4f726465726564446963740a7108295274527109"
    "5810000000696e7075745f7265736f6c7574696f6e710a68022828680363746f7263680a4c6f6e6753746f7261"
    "67650a710b580100000031710c68064b017451710d4b002874287489680829527452710e5808000000747261696e"
    "696e67710f8858160000005f69735f66756c6c5f6261636b776172645f686f6f6b71104e58050000007363616c"
    "6571114740000000000000005806000000626c6f636b737112635f5f746f7263685f5f2e746f7263682e6e6e2e"
    "6d6f64756c65732e636f6e7461696e65720a53657175656e7469616c0a711329817d28680f8868104e6805635f"
    "5f746f7263685f5f2e746f7263682e6e6e2e6d6f64756c65732e6e6f726d616c697a6174696f6e0a4c61796572"
    "4e6f726d0a711429817d28580600000077656967687471156802282868036804580100000032711668064b0274"
    "5171174b00284b0274284b017488680829527452711858040000006269617371196802282868036804580100000"
    "033711a68064b027451711b4b00284b0274284b017488680829527452711c680f8868104e7562711d7562711e75"
    "62711f2e"
)


def test_reads_torchscript_archives_without_running_their_code(tmp_path):
    """``torch.jit.load(...).state_dict()`` of the archive above, from data.pkl alone."""
    storage_bytes = {
        "0": np.arange(6, dtype="<f4").tobytes(),
        "1": np.array([224], "<i8").tobytes(),
        "2": np.array([0.5, -1.0], "<f4").tobytes(),
        "3": np.array([0.25, 3.0], "<f4").tobytes(),
    }
    path = write_archive(tmp_path / "tiny.pt", SCRIPT_DATA_PKL, storage_bytes, prefix="tiny_script")
    with zipfile.ZipFile(path, "a") as archive:  # the compiled code torch would run; never read
        archive.writestr("tiny_script/code/__torch__.py", "raise SystemExit('code was run')\n")
        archive.writestr("tiny_script/constants.pkl", pickle.dumps((), protocol=2))

    module = torch_checkpoint.load(path)
    assert isinstance(module, torch_checkpoint.ScriptObject)
    assert module.state["scale"] == 2.0 and module.state["training"] is True
    loaded = load_state_dict(path)
    assert list(loaded) == ["proj", "input_resolution", "blocks.0.weight", "blocks.0.bias"]
    np.testing.assert_array_equal(loaded["proj"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert loaded["input_resolution"].dtype == np.int64 and int(loaded["input_resolution"]) == 224
    np.testing.assert_array_equal(loaded["blocks.0.weight"], np.float32([0.5, -1.0]))
    np.testing.assert_array_equal(loaded["blocks.0.bias"], np.float32([0.25, 3.0]))
