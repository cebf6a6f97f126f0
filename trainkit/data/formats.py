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
# The other element types the IDX format defines: named in the refusal, not read.
_IDX_OTHER_TYPES = {0x09: "signed bytes", 0x0B: "16-bit integers", 0x0C: "32-bit integers",
                    0x0D: "32-bit floats", 0x0E: "64-bit floats"}


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode an IDX byte string; a wrong header or size raises TrainkitError."""
    if len(raw) >= 4 and raw[0] == raw[1] == 0 and raw[2] in _IDX_OTHER_TYPES and 1 <= raw[3] <= 4:
        raise TrainkitError(f"{name} holds {_IDX_OTHER_TYPES[raw[2]]} (IDX type 0x{raw[2]:02X}); trainkit reads IDX "
                            f"files of unsigned bytes (0x08), as MNIST's are: save the images as 0-255 bytes")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise TrainkitError(f"{name} is not an IDX file (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TrainkitError(f"{name} is truncated (header cut short)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)             # Python integers: a product of large sizes cannot wrap
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
_SCALAR = np.int64(0).__reduce__()[0]                   # and its scalar rebuilder


class _ArrayType:
    """What the unpickler hands out for numpy.ndarray: only as _reconstruct's first argument. Called
    itself, ndarray(shape) would allocate whatever a few bytes of a pickle declare."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray called directly")


def _reconstruct(subtype, shape, dtype_code) -> np.ndarray:
    """numpy's _reconstruct as numpy pickles an array: an empty one, filled by its state (whose
    bytes numpy checks against the shape it declares). Any other shape would be allocated, as
    large as the pickle says, before anything could check it against the file's bytes."""
    if subtype is not _ArrayType or tuple(shape) != (0,):
        raise pickle.UnpicklingError("an array in the pickle is not built as numpy pickles one")
    return _RECONSTRUCT(np.ndarray, (0,), dtype_code)


def _plain_dtype(*args) -> np.dtype:
    """numpy.dtype, of numbers only (no Python objects): an array of those would be built of the
    pickle's objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an array in the pickle is not plain numbers (Python objects)")
    return dtype


def _scalar(dtype, data=None):
    """numpy's scalar rebuilder (a label pickled as np.int64), for plain numbers only."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("a number in the pickle is not a plain numpy number")
    return _SCALAR(dtype, data)


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
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return _reconstruct if name == "_reconstruct" else _scalar
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _from_buffer
        if module == "numpy" and name in ("ndarray", "dtype"):
            return _ArrayType if name == "ndarray" else _plain_dtype
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
    checked: `data` uint8 of (N, 3072) or (N, 3, 32, 32), and `label_key` N integers (a list of
    ints or numpy integers, or a 1-D integer array, as torchvision reads them; N = `count` when given)."""
    data, labels = content.get("data"), _int_labels(content.get(label_key))
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] in ((3072,), (3, 32, 32)) \
        and (count is None or len(data) == count) and labels is not None and len(labels) == len(data)
    if not ok:
        many = "" if count is None else f"{count} "
        raise TrainkitError(f"{name} does not hold {many}images of 3x32x32 with their {label_key} (integers); " + hint)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


_INT64 = (-2**63, 2**63)


def _int_labels(labels) -> np.ndarray | None:
    """`labels` as an int64 array: a list of ints (or numpy integers) or a 1-D integer array;
    None for anything else, or a value outside int64 (no class has such a number)."""
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and labels.dtype.kind in "iu" and (labels.dtype != np.uint64 or not len(labels)
                                                                 or int(labels.max()) < _INT64[1])
        return labels.astype(np.int64) if ok else None
    if not isinstance(labels, list) or not all(isinstance(v, (int, np.integer)) and _INT64[0] <= v < _INT64[1]
                                               for v in labels):
        return None
    return np.array([int(v) for v in labels], dtype=np.int64)


def cifar_class_names(content: dict, names_key: str, name: str, hint: str) -> list[str]:
    names = content.get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise TrainkitError(f"{name} holds no list {names_key}; " + hint)
    return [n.decode() if isinstance(n, bytes) else n for n in names]
