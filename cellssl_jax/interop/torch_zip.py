"""Read PyTorch's zip checkpoints (``torch.save`` since 1.6) with numpy only, executing no pickled code.

A ``.pt``/``.torch`` file is a zip holding ``<prefix>/data.pkl`` (a pickle of the saved object) and one raw
little-endian byte record per storage under ``<prefix>/data/<key>``. ``pickle.load`` on ``data.pkl`` would import and
call any global the file names: a checkpoint from the internet could run ``os.system``. This reader unpickles with a
``find_class`` that knows only the few globals a state_dict needs, each mapped to a small numpy stand-in, and refuses
every other one with :class:`UnsafeCheckpointError` *before* anything is called. ``persistent_load`` turns each storage
reference into a numpy array read from the zip; tensors are rebuilt with their size, stride and offset checked against
the storage, so a crafted stride cannot read memory outside it.

Returned tensors are numpy arrays (bfloat16 through ``ml_dtypes``); storages on ``cuda:*`` load like ``map_location=
'cpu'``. The object tree otherwise mirrors ``torch.load(weights_only=True)``: an ``OrderedDict`` keeps its
``_metadata`` attribute (the per-module version dict ``load_state_dict`` reads).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle names a global outside the allow-list: refused before anything runs."""


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch zip checkpoint, or its records are inconsistent."""


# Everything the pickle can reach is a frozen, slotted object: the BUILD opcode (``inst.__dict__.update`` or
# ``setattr``) cannot alter the shared allow-listed stand-ins and poison later loads in the same process.


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only carries the element dtype."""

    torch_name: str
    dtype: np.dtype

    def __repr__(self) -> str:
        return f"torch.{self.torch_name}"


_STORAGE_TYPES = {
    name: _StorageType(name, np.dtype(dtype))
    for name, dtype in {
        "FloatStorage": np.float32,
        "DoubleStorage": np.float64,
        "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }.items()
}


@dataclass(frozen=True, slots=True)
class _Storage:
    """A storage read from the zip: a flat numpy array of its element type."""

    array: np.ndarray
    key: str


@dataclass(frozen=True, slots=True)
class _Callable:
    """An allow-listed function, wrapped so the pickle gets an inert handle rather than the function object."""

    fn: Callable[..., Any]

    def __call__(self, *args):
        return self.fn(*args)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """numpy twin of ``torch._utils._rebuild_tensor_v2``: a bounds-checked strided view of the storage, copied."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not from a storage record")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)) or len(size) != len(stride):
        raise CheckpointFormatError(
            f"storage {storage.key}: bad tensor geometry offset={storage_offset} size={size} stride={stride}")
    flat = storage.array
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"storage {storage.key}: tensor size={size} stride={stride} offset={storage_offset} reaches element "
            f"{last}, but the storage holds {flat.size}")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[storage_offset:], size, tuple(s * item for s in stride),
                                           writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """``nn.Parameter`` in a state_dict saved with ``keep_vars=True``: the data is all we need."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._byteorder, self._source = zf, prefix, byteorder, source
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load: the pickle references the global '{module}.{name}', which a "
                f"weights-only checkpoint never needs (nothing was executed)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeCheckpointError(f"{self._source}: malformed storage reference {pid!r}")
        if key not in self._storages:
            record = f"{self._prefix}/data/{key}"
            try:
                raw = self._zf.read(record)
            except KeyError:
                raise CheckpointFormatError(f"{self._source}: storage record '{record}' is missing") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) != numel * dtype.itemsize:
                raise CheckpointFormatError(
                    f"{self._source}: record '{record}' has {len(raw)} bytes, expected {numel} × {dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype.newbyteorder("="), copy=False)
            self._storages[key] = _Storage(array, key)
        return self._storages[key]


def _archive_prefix(zf: zipfile.ZipFile, source: str) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{source}: expected exactly one '<name>/data.pkl' record, found {pickles}")
    return pickles[0].split("/", 1)[0]


def load_torch_zip(path: str | Path) -> Any:
    """Load any weights-only object (tensors as numpy arrays) from a PyTorch zip checkpoint, without torch."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path}: not a PyTorch zip checkpoint (legacy pre-1.6 torch.save format or another file type); "
            "re-save it with torch.save from torch>=1.6")
    with zipfile.ZipFile(path) as zf:
        prefix = _archive_prefix(zf, str(path))
        byteorder = "little"
        if f"{prefix}/byteorder" in zf.namelist():
            byteorder = zf.read(f"{prefix}/byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{path}: unknown byteorder record {byteorder!r}")
        unpickler = _RestrictedUnpickler(zf.read(f"{prefix}/data.pkl"), zf, prefix, byteorder, str(path))
        return unpickler.load()


def load_state_dict(path: str | Path) -> "collections.OrderedDict[str, np.ndarray]":
    """A flat ``{name: array}`` state_dict from a PyTorch zip checkpoint (nothing executed, torch not needed)."""
    obj = load_torch_zip(path)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointFormatError(
            f"{path}: not a flat state_dict of tensors; offending entries: {bad[:5]} (a wrapped checkpoint such as "
            "{'state_dict': ...} must be unwrapped first)")
    return obj if isinstance(obj, collections.OrderedDict) else collections.OrderedDict(obj)
