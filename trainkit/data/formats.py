"""Reading data formats from bytes: IDX (MNIST's) and the CIFAR pickle (through an unpickler that
builds only numpy arrays); image files are images.py's. Knows no URL, no download, no dataset's
checksums: each reader checks the structure of what it is given, and can be tested on bytes alone.
"""
from __future__ import annotations

import codecs
import io
import math
import pickle

import numpy as np
import torch

from ..errors import TrainkitError

# ---------------------------------------------------------------------------------------------
# IDX

_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode an IDX byte string; a wrong header or size raises TrainkitError."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise TrainkitError(f"{name} is not an IDX file (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TrainkitError(f"{name} is truncated (header cut short)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long"
        raise TrainkitError(f"{name} is {what}: {len(raw)} bytes, its header says {expected}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(dims)


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array (what parse_idx reads back)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def idx_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of a uint8 IDX file of `shape`: its header (4 + 4 per dimension) and one byte per value."""
    return 4 + 4 * len(shape) + math.prod(shape)


# ---------------------------------------------------------------------------------------------
# The CIFAR pickle ("python version")

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]   # numpy's own array rebuilder, under any numpy version


def _from_buffer(buffer, dtype, shape, order) -> np.ndarray:
    """What numpy names for an array pickled with protocol 5 (numpy.core.numeric._frombuffer),
    written here so that nothing but this is done: the bytes read as an array of a plain dtype
    (no Python objects) and reshaped."""
    if not isinstance(buffer, (bytes, bytearray, memoryview, pickle.PickleBuffer)) \
            or not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError("an array in the pickle is not plain numbers")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays (as pickled by protocols 2 to 5); any
    other class is refused, so a hostile pickle cannot run code. A protocol-5 pickle whose arrays
    were written out of band (a PickleBuffer kept apart) cannot be read from one file: refused."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _RECONSTRUCT
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _from_buffer
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":   # how Python 3's protocol 2 writes bytes
            return codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")


def unpickle_cifar(raw: bytes, name: str, what: str, hint: str) -> dict:
    """One CIFAR pickle as a dict with str keys; anything else (`what`: "a cifar10 file") is one
    line ending in `hint`."""
    try:
        # The published files were pickled by Python 2: their strings are bytes.
        content = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}
    except Exception as exc:  # unpickling fails in many ways; none may become a traceback
        detail = " ".join(str(exc).split())[:100] if isinstance(exc, pickle.UnpicklingError) else ""
        raise TrainkitError(f"{name} is not {what} ({type(exc).__name__}{': ' + detail if detail else ''}); "
                            + hint) from None


def cifar_arrays(content: dict, label_key: str, count: int | None, name: str,
                 hint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one unpickled batch, its structure
    checked: `data` uint8 of (N, 3072) and `label_key` a list of N ints (N = `count` when given)."""
    data, labels = content.get("data"), content.get(label_key)
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072 \
        and (count is None or len(data) == count) and isinstance(labels, list) and len(labels) == len(data) \
        and all(isinstance(v, int) for v in labels)
    if not ok:
        many = "" if count is None else f"{count} "
        raise TrainkitError(f"{name} does not hold {many}images of 3x32x32 with their {label_key}; " + hint)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.int64)


def cifar_class_names(content: dict, names_key: str, name: str, hint: str) -> list[str]:
    names = content.get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise TrainkitError(f"{name} holds no list {names_key}; " + hint)
    return [n.decode() if isinstance(n, bytes) else n for n in names]
