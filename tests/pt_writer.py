"""Write `torch.save`-format files from numpy, without torch (test helper).

The zip layout and pickle stream mirror what `torch.save(state_dict, path)` produces:
`<name>/data.pkl` (protocol 2; an OrderedDict of `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, backward_hooks)` calls whose storages are persistent ids
`('storage', torch.<X>Storage, key, 'cpu', numel)`), `<name>/data/<key>` raw little-endian
storages, `<name>/version`, `<name>/byteorder`. `write_legacy` writes the pre-1.6 stream format.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class View:
    """A tensor that is a strided view of a shared 1-D `base` (offset/size/stride in elements)."""

    def __init__(self, base: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        assert base.ndim == 1
        self.base, self.offset, self.size, self.stride = base, offset, tuple(size), tuple(stride)

    def numpy(self) -> np.ndarray:
        item = self.base.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            self.base[self.offset:], self.size, tuple(s * item for s in self.stride)
        ).copy()


class Global:
    """Pickled as the bare global `module.name` (torch needs not exist)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # only so that pickle's save_reduce accepts it; never called
        raise TypeError(f"{self.module}.{self.name} is a stand-in")


class _Storage:
    def __init__(self, key: str, base: np.ndarray):
        self.key, self.base = key, base


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", Global("torch", _STORAGE_NAMES[obj.base.dtype]), obj.key, "cpu", obj.base.size)
        return None

    def save_global_obj(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_tensor(self, obj):
        args = (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
        self.save_reduce(Global("torch._utils", "_rebuild_tensor_v2"), args, obj=obj)

    dispatch[Global] = save_global_obj
    dispatch[_Tensor] = save_tensor


def _tensors(state: Mapping[str, np.ndarray | View]) -> tuple[collections.OrderedDict, list[_Storage]]:
    storages: dict[int, _Storage] = {}
    sd = collections.OrderedDict()
    for name, value in state.items():
        if isinstance(value, View):
            base, offset, size, stride = value.base, value.offset, value.size, value.stride
        else:
            base = np.ascontiguousarray(value).reshape(-1)
            offset, size = 0, value.shape
            stride = tuple(int(np.prod(value.shape[i + 1:])) for i in range(value.ndim))
        if id(base) not in storages:
            storages[id(base)] = _Storage(str(len(storages)), base)
        sd[name] = _Tensor(storages[id(base)], offset, size, stride)
    sd._metadata = collections.OrderedDict([("", {"version": 1})])  # as torch's state_dict() has
    return sd, list(storages.values())


def _dumps(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_pt(path: str | os.PathLike, state: Mapping[str, np.ndarray | View], name: str = "archive") -> None:
    """torch.save(state_dict) equivalent: values are arrays (own storage) or `View`s (shared storage)."""
    sd, storages = _tensors(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", _dumps(sd))
        zf.writestr(f"{name}/byteorder", "little")
        for s in storages:
            zf.writestr(f"{name}/data/{s.key}", s.base.astype(s.base.dtype.newbyteorder("<")).tobytes())
        zf.writestr(f"{name}/version", "3\n")
        zf.writestr(f"{name}/.data/serialization_id", "0" * 40)


def write_raw_pt(path: str | os.PathLike, data_pkl: bytes, name: str = "archive", records=None) -> None:
    """A torch-layout zip with an arbitrary data.pkl (for hostile / malformed files)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", data_pkl)
        zf.writestr(f"{name}/byteorder", "little")
        for key, raw in (records or {}).items():
            zf.writestr(f"{name}/data/{key}", raw)
        zf.writestr(f"{name}/version", "3\n")


def write_legacy(path: str | os.PathLike, state: Mapping[str, np.ndarray | View]) -> None:
    """The pre-1.6 (`_use_new_zipfile_serialization=False`) stream format."""
    sd, storages = _tensors(state)

    class LegacyPickler(_Pickler):
        def persistent_id(self, obj):
            pid = super().persistent_id(obj)
            return None if pid is None else pid + (None,)

    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    LegacyPickler(buf, protocol=2).dump(sd)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        buf.write(struct.pack("<q", s.base.size))
        buf.write(s.base.astype(s.base.dtype.newbyteorder("<")).tobytes())
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
