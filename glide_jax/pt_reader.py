"""Read PyTorch `.pt` state dicts into numpy, without torch and without running pickled code.

`torch.save` writes a zip archive `<name>/data.pkl` (a pickle that names tensors through
persistent ids) plus one raw little-endian record `<name>/data/<key>` per storage. The pickle is
read by a restricted unpickler: `find_class` admits only the handful of globals a state dict
needs (an allow-list, not a deny-list), each mapped to a local stand-in; torch itself is never
imported and nothing named by the file is ever called. Everything else raises
`UnsafePickleError` naming the refused global.

The pre-1.6 "legacy" single-pickle-stream format is read too; the even older tar format is
refused with a clear message.

    sd = load_state_dict("base.pt")           # {name: np.ndarray}, dtypes as stored
    sd = to_float32(sd)                       # float16 / bfloat16 -> float32
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

__all__ = ["PtError", "PtFormatError", "UnsafePickleError", "load_state_dict", "to_float32"]


class PtError(Exception):
    """Base class of the errors this module raises."""


class PtFormatError(PtError, ValueError):
    """The file is not a readable torch checkpoint (not a zip, truncated, missing records, ...)."""


class UnsafePickleError(PtError, pickle.UnpicklingError):
    """The pickle asks for something outside the allow-list; nothing was executed."""


# Storage class name (as pickled: `torch.<Name>Storage`) -> numpy dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype objects (pickled as `torch.<name>`) -> numpy dtype.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stand-in for `torch.<X>Storage`: only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDtype:
    """Stand-in for a `torch.<dtype>` object."""

    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, np.dtype(dtype)


class _StorageRef:
    """A storage named by the pickle; its bytes are read after unpickling."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor as (storage, offset, size, stride), all in elements; materialised later."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None):
        if not isinstance(storage, _StorageRef):
            raise PtFormatError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
        try:
            self.offset = int(offset)
            self.size = tuple(int(s) for s in size)
            self.stride = tuple(int(s) for s in stride)
        except (TypeError, ValueError) as e:
            raise PtFormatError(f"malformed tensor metadata: offset={offset!r} size={size!r} stride={stride!r}") from e
        if len(self.size) != len(self.stride):
            raise PtFormatError(f"tensor size {self.size} and stride {self.stride} differ in rank")
        self.storage = storage
        self.dtype = storage.dtype if dtype is None else dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_unused):
    if not isinstance(dtype, _TorchDtype):
        raise PtFormatError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _TensorRef(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, *_unused):
    return data


def _codecs_encode(text, encoding="utf-8", *_unused):
    # Protocol-2 pickles of `bytes` go through `_codecs.encode(str, 'latin1')`; allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        table[("torch", name)] = _TorchDtype(name, dtype)
    return table


_ALLOWED = _allowed_globals()
_BUILDABLE = (collections.OrderedDict, dict)


class _RestrictedUnpickler(pickle._Unpickler):  # pure-Python unpickler: its dispatch table is ours to edit
    """Unpickler with an allow-listed `find_class` and a `BUILD` limited to dicts.

    The pure-Python implementation is used so that `BUILD` (which would call `__setstate__` on
    whatever object is on the stack) can be restricted too.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BytesIO, persistent_load: Callable[[Any], Any]):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and isinstance(module, str) and isinstance(name, str):  # Python 2 names
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"refused to load global '{module}.{name}': only tensors, storages and plain "
                "containers are allowed in a weights file (nothing was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in _BUILDABLE or not isinstance(state, dict):
            raise UnsafePickleError(f"refused BUILD on {type(inst).__name__}")
        # torch stores `state_dict._metadata` this way; it is not needed, so it is dropped.

    dispatch[pickle.BUILD[0]] = load_build


def _unpickle(data: bytes, persistent_load: Callable[[Any], Any]) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), persistent_load).load()
    except PtError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError) as e:
        raise PtFormatError(f"corrupt pickle: {type(e).__name__}: {e}") from e


def _as_str(x: Any) -> str:
    return x.decode("ascii") if isinstance(x, bytes) else str(x)


def _storage_pid(pid: Any, n_fields: int) -> _StorageRef:
    if not isinstance(pid, tuple) or len(pid) < 1 or _as_str(pid[0]) != "storage":
        raise PtFormatError(f"unsupported persistent id {pid!r:.80}")
    if len(pid) != 1 + n_fields:
        raise PtFormatError(f"storage persistent id has {len(pid) - 1} fields, expected {n_fields}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
        raise PtFormatError(f"storage of type {storage_type!r}, expected a torch storage class")
    return _StorageRef(_as_str(key), storage_type.dtype, int(numel))


def _materialise(t: _TensorRef, flat: np.ndarray, key: str) -> np.ndarray:
    """Copy the strided view out of a storage's flat element array (bounds-checked)."""
    if t.dtype != flat.dtype:
        if flat.dtype != np.uint8:
            raise PtFormatError(f"{key}: tensor dtype {t.dtype} over a {flat.dtype} storage")
        usable = flat.size - flat.size % t.dtype.itemsize
        flat = flat[:usable].view(t.dtype)
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or t.offset < 0:
        raise PtFormatError(f"{key}: negative size/stride/offset {t.size} {t.stride} {t.offset}")
    if 0 in t.size:
        return np.zeros(t.size, t.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= flat.size:
        raise PtFormatError(
            f"{key}: view (offset {t.offset}, size {t.size}, stride {t.stride}) runs past its "
            f"storage of {flat.size} elements"
        )
    base = flat[t.offset:]
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base, shape=t.size, strides=tuple(s * item for s in t.stride), writeable=False
    )
    return view.copy(order="C")  # (np.ascontiguousarray would turn 0-d tensors into 1-d)


def _collect(obj: Any, read_storage: Callable[[_StorageRef], np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise PtFormatError(f"the file holds a {type(obj).__name__}, expected a state_dict mapping")
    cache: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    bad = []
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            bad.append(f"{name!r} ({type(value).__name__})")
            continue
        skey = value.storage.key
        if skey not in cache:
            cache[skey] = read_storage(value.storage)
        out[str(name)] = _materialise(value, cache[skey], str(name))
    if bad:
        raise PtFormatError(
            "expected a flat state_dict of tensors; these entries are not tensors: " + ", ".join(bad[:10])
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        )
    return out


def _load_zip(path: str, zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    pkl = [n for n in pkl if n.count("/") <= 1]
    if not pkl:
        if any(n.endswith("constants.pkl") for n in names):
            raise PtFormatError(f"{path} is a TorchScript archive, not a state_dict")
        raise PtFormatError(f"{path} is a zip file without data.pkl: not a torch.save checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
        order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise PtFormatError(f"{path}: unknown byteorder record {order!r}")

    def read_storage(ref: _StorageRef) -> np.ndarray:
        record = f"{prefix}data/{ref.key}"
        try:
            raw = zf.read(record)
        except KeyError:
            raise PtFormatError(f"{path}: storage record {record} is missing") from None
        dtype = ref.dtype.newbyteorder("<" if order == "little" else ">")
        if len(raw) % dtype.itemsize:
            raise PtFormatError(f"{path}: {record} has {len(raw)} bytes, not a multiple of {dtype.itemsize}")
        return np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)

    obj = _unpickle(zf.read(pkl[0]), lambda pid: _storage_pid(pid, 4))
    return _collect(obj, read_storage)


def _load_legacy(path: str, data: bytes) -> dict[str, np.ndarray]:
    """Pre-1.6 format: pickles of magic, protocol, sys info, the object, the storage keys; then raw storages."""
    f = io.BytesIO(data)

    def load_one(what: str, persistent_load: Callable[[Any], Any] = lambda pid: _refuse_pid(pid)) -> Any:
        try:
            return _RestrictedUnpickler(f, persistent_load).load()  # the stream advances exactly
        except PtError:
            raise
        except Exception as e:
            raise PtFormatError(f"{path}: cannot read the legacy {what}: {type(e).__name__}: {e}") from e

    if load_one("magic number") != _LEGACY_MAGIC:
        raise PtFormatError(f"{path}: not a torch checkpoint (bad legacy magic number)")
    if load_one("protocol version") != _LEGACY_PROTOCOL:
        raise PtFormatError(f"{path}: unsupported legacy protocol version")
    load_one("system info")
    refs: dict[str, _StorageRef] = {}

    def pid_legacy(pid: Any) -> _StorageRef:
        if isinstance(pid, tuple) and len(pid) == 6 and pid[5] is not None:
            raise PtFormatError(f"{path}: legacy storage views are not supported")
        ref = _storage_pid(pid[:5] if isinstance(pid, tuple) else pid, 4)
        return refs.setdefault(ref.key, ref)

    obj = load_one("state dict", pid_legacy)
    keys = load_one("storage key list")
    if not isinstance(keys, list):
        raise PtFormatError(f"{path}: legacy storage key list is a {type(keys).__name__}")
    blobs: dict[str, np.ndarray] = {}
    for key in keys:
        key = _as_str(key)
        if key not in refs:
            raise PtFormatError(f"{path}: storage {key} listed but never used")
        head = f.read(8)
        if len(head) < 8:
            raise PtFormatError(f"{path}: truncated (storage {key} header)")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * refs[key].dtype.itemsize
        raw = f.read(nbytes)
        if numel < 0 or len(raw) < nbytes:
            raise PtFormatError(f"{path}: truncated (storage {key} needs {nbytes} bytes, has {len(raw)})")
        blobs[key] = np.frombuffer(raw, refs[key].dtype.newbyteorder("<")).astype(refs[key].dtype, copy=False)

    def read_storage(ref: _StorageRef) -> np.ndarray:
        if ref.key not in blobs:
            raise PtFormatError(f"{path}: storage {ref.key} has no data")
        return blobs[ref.key]

    return _collect(obj, read_storage)


def _refuse_pid(pid: Any) -> Any:
    raise PtFormatError(f"unexpected persistent id {pid!r:.80}")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `torch.save`d state dict as {name: np.ndarray} (dtype as stored, C-contiguous).

    Raises:
      FileNotFoundError: `path` does not exist.
      UnsafePickleError: the pickle names a global outside the allow-list (nothing executed).
      PtFormatError: the file is not a torch checkpoint, is truncated or corrupt, or holds
        something other than a flat mapping of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                return _load_zip(path, zf)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as e:
            raise PtFormatError(f"{path}: truncated or corrupt zip archive ({e})") from e
    if tarfile.is_tarfile(path):
        raise PtFormatError(f"{path}: the pre-0.4 tar checkpoint format is not supported; re-save it with torch.save")
    if head[:1] == b"\x80":
        with open(path, "rb") as fh:
            return _load_legacy(path, fh.read())
    raise PtFormatError(f"{path}: not a torch checkpoint (neither a zip archive nor a legacy pickle)")


def to_float32(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast every floating-point tensor (float16, bfloat16, float64, ...) to float32; others unchanged."""
    out = {}
    for k, v in state_dict.items():
        floating = np.issubdtype(v.dtype, np.floating) or v.dtype in (
            np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
        out[k] = v.astype(np.float32) if floating and v.dtype != np.float32 else v
    return out
