"""Read PyTorch ``.pt`` state dicts as numpy arrays, without torch.

Since PyTorch 1.6, ``torch.save`` writes a zip archive (stored, not compressed) whose entries
share one top-level folder, ``<name>/``:

    <name>/data.pkl        a pickle (protocol 2) of the object, e.g. an OrderedDict of tensors
    <name>/data/<key>      the raw bytes of each storage, in the byte order of <name>/byteorder
                           (absent in old files, which are little-endian)
    <name>/version, ...    format bookkeeping, ignored here

Inside ``data.pkl`` every tensor is the call ``torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])``, and every storage is a
*persistent id* ``("storage", torch.<Type>Storage, key, location, numel)`` that names the entry
``data/<key>``. This module unpickles ``data.pkl`` with a restricted ``pickle.Unpickler``: its
``find_class`` resolves only those rebuild functions, the typed storage classes below and
``collections.OrderedDict`` (to small local stand-ins that build numpy arrays), and refuses every
other global with an error naming it, so loading a file never runs code from the file.

TorchScript archives (``torch.jit.save``, the format of OpenAI's released CLIP ``.pt`` files) use
the same layout, plus ``code/`` (the compiled Python, never read here) and ``constants.pkl``. Their
``data.pkl`` pickles each module as an object of a ``__torch__.*`` class, built from a dict of its
attributes (parameters, buffers, submodules, flags). Every ``__torch__.*`` global resolves to
``ScriptObject``, an inert stand-in that only records that dict; ``ScriptObject.state_dict()``
walks it into the flat ``{"visual.conv1.weight": array, ...}`` naming of ``Module.state_dict()``.

Supported storage types: float32, float64, float16, bfloat16 (returned as float32, exactly: a
bfloat16 is the top half of a float32), int64, int32, int16, int8, uint8 and bool. The legacy
(pre-1.6, non-zip) format is rejected with a message saying how to convert it.
"""

import collections
import io
import pickle
import zipfile
from collections.abc import Mapping

import numpy as np
from etils import epath

from jprompt.errors import InputError

# torch storage class name -> numpy dtype (little-endian); bfloat16 is decoded by hand.
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class TorchCheckpointError(InputError):
    """The file is not a PyTorch zip checkpoint this reader can load."""


class _StorageType:
    """Stand-in for ``torch.<Name>Storage``: only carries the element type."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 with the same value."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """numpy counterpart of ``torch._utils._rebuild_tensor_v2``: a strided view, copied."""
    del requires_grad, backward_hooks, metadata
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
        raise TorchCheckpointError(f"bad tensor layout: size {size}, stride {stride}")
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.size:
            raise TorchCheckpointError(
                f"tensor of size {size}, stride {stride}, offset {storage_offset} reads past the "
                f"end of its storage ({storage.size} elements): the file is corrupt or truncated"
            )
        view = np.lib.stride_tricks.as_strided(
            storage[storage_offset:],
            shape=size,
            strides=tuple(s * storage.itemsize for s in stride),
            writeable=False,
        )
        return np.array(view, order="C")  # a contiguous copy, independent of the storage
    return np.zeros(size, storage.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is just its tensor here."""
    del requires_grad, backward_hooks
    return data


class ScriptObject:
    """Stand-in for any TorchScript class ``__torch__.*``: records its pickled state, nothing else.

    The pickle creates it with ``cls.__new__(cls)`` and hands it the attribute dict through
    ``__setstate__``; no method of the file's class exists here, so none can run.
    """

    state: object = None

    def __setstate__(self, state):
        self.state = state

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The tensors among the attributes, recursing into submodules, with dotted names.

        For a module this is what ``Module.state_dict()`` returns (e.g. ``Sequential`` children
        are attributes "0", "1", ...), plus any plain tensor attributes; other values are skipped.
        """
        flat = {}
        if isinstance(self.state, Mapping):
            for name, value in self.state.items():
                if isinstance(value, np.ndarray):
                    flat[f"{prefix}{name}"] = value
                elif isinstance(value, ScriptObject):
                    flat.update(value.state_dict(f"{prefix}{name}."))
        return flat


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchCheckpointError(
                f"refusing to load global {module}.{name} from the checkpoint: only tensors "
                f"(torch._utils._rebuild_tensor_v2 with {sorted(STORAGE_DTYPES)}), "
                "collections.OrderedDict and TorchScript objects (__torch__.*) are supported"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchCheckpointError(f"unsupported persistent id in the checkpoint: {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(storage_type, str(key), int(numel))
        return self._storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        entry = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(entry)
        except KeyError:
            raise TorchCheckpointError(f"storage {entry!r} is missing from the archive") from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise TorchCheckpointError(f"cannot read storage {entry!r}: {error}") from error
        if storage_type.dtype == "bf16":
            dtype = np.dtype(self._byteorder + "u2")
        else:
            dtype = np.dtype(storage_type.dtype).newbyteorder(self._byteorder)
        if len(raw) < numel * dtype.itemsize:
            raise TorchCheckpointError(
                f"storage {entry!r} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}: "
                "the file is truncated or corrupt"
            )
        array = np.frombuffer(raw, dtype, count=numel)
        if storage_type.dtype == "bf16":
            return _bfloat16_to_float32(array.astype(np.uint16))
        return array.astype(dtype.newbyteorder("="))


def _open_archive(path) -> tuple[zipfile.ZipFile, str]:
    data = epath.Path(path).read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        # A bare pickle: torch < 1.6, or torch.save(..., _use_new_zipfile_serialization=False).
        if data[:1] == b"\x80":
            raise TorchCheckpointError(
                f"{path} is in PyTorch's legacy (pre-1.6) format, which is not supported: "
                "re-save it with torch.save(torch.load(f), g) using torch >= 1.6"
            )
        raise TorchCheckpointError(
            f"{path} is not a PyTorch checkpoint (expected the zip archive torch.save writes); "
            "the file may be truncated"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise TorchCheckpointError(f"{path} is a corrupt zip archive: {error}") from error
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchCheckpointError(
            f"{path} is a zip archive but not a PyTorch checkpoint: expected exactly one "
            f"'<name>/data.pkl', found {pickles or 'none'}"
        )
    return archive, pickles[0][: -len("data.pkl")]


def load(path) -> object:
    """Unpickle a ``torch.save`` or ``torch.jit.save`` zip archive; tensors become numpy arrays.

    A TorchScript archive gives its top module as a ``ScriptObject``.
    """
    archive, prefix = _open_archive(path)
    with archive:
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise TorchCheckpointError(f"{path}: unknown byte order {byteorder!r}")
        try:
            pickled = archive.read(f"{prefix}data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise TorchCheckpointError(f"{path}: cannot read data.pkl: {error}") from error
        unpickler = _Unpickler(io.BytesIO(pickled), archive, prefix, byteorder)
        try:
            return unpickler.load()
        except TorchCheckpointError as error:
            raise TorchCheckpointError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
            raise TorchCheckpointError(f"{path}: cannot unpickle data.pkl: {error}") from error


def load_state_dict(path) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict saved at ``path`` (local or ``gs://``), in file order.

    For a TorchScript archive, the state dict of its top module (``ScriptObject.state_dict``).
    """
    obj = load(path)
    if isinstance(obj, ScriptObject):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TorchCheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of tensors)"
        )
    not_arrays = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise TorchCheckpointError(f"{path}: entries that are not tensors: {not_arrays}")
    return {str(k): v for k, v in obj.items()}
