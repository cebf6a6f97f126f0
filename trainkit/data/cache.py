"""A folder's images decoded once into one uint8 file, its rows read back by offset (FFCV's .beton idea).

A streamed folder decodes every file again each epoch; with the cache, the first build decodes each
file once (in a pool of processes, with the one decoder, `images.decode_image`) and every later
epoch and run reads raw bytes: an (N, C, H, W) uint8 array behind a small header.

The rows are read with preadv into the caller's array (`ImageCache.read`), not through a memory map:
a mapped page counts in the process's memory (PSS) as long as it stays mapped, and a page fault maps
its neighbours too (fault-around), so a memory map of a cache larger than memory made a streamed run
as large as the part of the file it had read. Read this way, the file's pages sit in the page cache,
which the kernel gives back under pressure, and the process holds only the batch it asked for.

The file is `<cache_dir>/<name>.tkcache`: a header (a magic line and one JSON line saying the
fingerprint of the files it was made from, the shape, dtype, resize mode and decoder version,
and the files that could not be decoded when the caller leaves those out, padded to 4 KiB), then
the pixels, then a CRC-32 of each row (little-endian uint32s). The header is checked against a
schema, every row against its CRC when the cache is opened (a damaged cache is stale: built
again) and again whenever it is read, and the files the header calls undecodable are decoded
again when opened: the cache is checked, never trusted. It is written under a temporary name and renamed into place
only when complete, so a build that is killed leaves no file that `open_cache` would take; a
cache made from other files (another fingerprint) or with other settings is stale: `open_cache`
says None and the caller builds again, over it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import zlib
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import TrainkitError
from .images import decode_image

MAGIC = b"TRAINKIT IMAGE CACHE\n"
FORMAT = 2                    # 2: a CRC-32 per row after the pixels
# Raised whenever decode_image's pixels change, so caches made by an older decoder are stale.
DECODER_VERSION = 2           # 2: 32-bit integer TIFFs scaled by their values' range
_ALIGN = 4096                   # the pixels start on a page boundary
_CHUNK = 64                     # images per task at most: enough to amortise a task, few to hold
_SUFFIX = ".tkcache"
_TEMPORARY = ".tmp-"
_READ_BYTES = 64 * 2**20        # bytes one preadv call reads at most (Linux stops a read at 2 GB)
_IOV_MAX = 1024                 # buffers one preadv call fills at most (Linux's and macOS's IOV_MAX)


def cache_file(cache_dir: str | os.PathLike, name: str = "images") -> Path:
    """Where `build_cache` puts the cache called `name` in `cache_dir`."""
    return Path(cache_dir) / f"{name}{_SUFFIX}"


def build_cache(paths: Sequence[str | os.PathLike], channels: int, size: tuple[int, int], resize: str,
                fingerprint: str, cache_dir: str | os.PathLike, workers: int, name: str = "images",
                progress: Callable[[int], None] | None = None,
                unreadable: list[tuple[int, str]] | None = None) -> Path:
    """Decode every file of `paths` once, in order, into `cache_file(cache_dir, name)` and return
    its path. `workers` processes decode (1: this process); `progress(n)` is called with the number
    of images written so far. A file that cannot be decoded stops the build with its one line, and
    nothing is left behind; an existing cache of that name is replaced only by a complete one.
    Given an `unreadable` list, such a file does not stop it: its row is zeros, and (row, message)
    is appended to the list and kept in the header (`read_header(path)["unreadable"]`), so that a
    later run that opens the cache leaves the same files out without decoding them."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise TrainkitError("an image cache needs the fingerprint of the files it is made from")
    decode_image(_PROBE_PNG, channels, size, resize)           # bad settings: one line before any work
    size = (int(size[0]), int(size[1]))
    target = cache_file(cache_dir, name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainkitError(f"cannot make the image cache folder {target.parent}: {exc.strerror or exc}") from None
    _remove_dead_temporaries(target)
    shape = (len(paths), channels, *size)
    header = _header(fingerprint, shape, resize)
    temporary, bad_rows, checksums = _temporary(target), [], []
    try:
        blocks = _decoded_blocks([os.fspath(p) for p in paths], channels, size, resize, workers,
                                 skip=unreadable is not None)
        with open(temporary, "wb") as f, contextlib.closing(blocks):     # closing: the pool ends here
            f.write(header)
            written = 0
            for block, bad in blocks:
                bad_rows += [(written + i, message) for i, message in bad]
                f.write(block)
                checksums += _row_checksums(block, math.prod(shape[1:]))
                written += len(block) // math.prod(shape[1:])
                if progress is not None:
                    progress(written)
            f.write(np.asarray(checksums, "<u4").tobytes())
            f.flush()
            os.fsync(f.fileno())                # the rename below must not publish unwritten pages
        if bad_rows:
            temporary = _with_header(temporary, _header(fingerprint, shape, resize, bad_rows), len(header), target)
        os.replace(temporary, target)
        if unreadable is not None:
            unreadable += bad_rows
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TrainkitError(f"cannot write the image cache {target}: {exc.strerror or exc}") from None
        raise
    return target


def open_cache(path_or_dir: str | os.PathLike, fingerprint: str, shape: Sequence[int], resize: str | None = None,
               name: str = "images", paths: Sequence[str | os.PathLike] | None = None) -> ImageCache | None:
    """The cache's pixels, an (N, C, H, W) uint8 `ImageCache`, or None when there is no sound
    cache there for these files: absent, not a regular file, made from files of another
    fingerprint, of another shape (or resize mode, when given), by another decoder version, cut
    short, a header that fails its schema, or a row that fails its checksum. Given the files'
    `paths` (the cache's rows), the files its header calls undecodable are decoded again: one that
    decodes now makes the cache stale too (the list is the files', not the header's)."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = cache_file(path, name)
    meta = read_header(path)
    shape = tuple(int(s) for s in shape)
    if (meta is None or meta["fingerprint"] != fingerprint or tuple(meta["shape"]) != shape
            or meta["decoder"] != DECODER_VERSION or (resize is not None and meta["resize"] != resize)):
        return None
    cache = None
    try:
        cache = ImageCache(path, meta["data_offset"], shape, [(row, message) for row, message in meta["unreadable"]])
        sound = cache.file_size == cache.checksums_offset + 4 * len(cache) and cache.damaged_row() is None \
            and (paths is None or not _decodable(paths, cache.unreadable, shape, meta["resize"]))
    except (OSError, TrainkitError):
        sound = False
    if not sound:
        if cache is not None:
            cache.close()
        return None
    return cache


class ImageCache:
    """An open cache file: (N, C, H, W) uint8 images, `read` by row, each row checked against its
    CRC-32. It holds the file open, so a cache built again over it (a rename) leaves this one
    reading the pixels it was opened with. `unreadable`: (row, message) of the files that could
    not be decoded when it was built (their rows are zeros)."""

    def __init__(self, path: str | os.PathLike, offset: int, shape: Sequence[int],
                 unreadable: list[tuple[int, str]] = ()):
        self.path, self.offset, self.shape = Path(path), int(offset), tuple(int(s) for s in shape)
        self.row_bytes = math.prod(self.shape[1:])
        self.checksums_offset = self.offset + len(self) * self.row_bytes
        self.unreadable = list(unreadable)
        self._open()

    def _open(self) -> None:
        self._file = _open_regular(self.path)
        self.file_size = os.fstat(self._file.fileno()).st_size
        raw = os.pread(self._file.fileno(), 4 * len(self), self.checksums_offset)
        self.checksums = np.frombuffer(raw, "<u4") if len(raw) == 4 * len(self) else None

    def damaged_row(self) -> int | None:
        """The first row whose pixels do not match their checksum (None: all do), read in
        blocks of about _READ_BYTES: one pass over the file."""
        if self.checksums is None:
            return 0
        per_block = max(1, _READ_BYTES // max(self.row_bytes, 1))
        block = np.empty((min(per_block, len(self)), *self.shape[1:]), np.uint8)
        for start in range(0, len(self), per_block):
            rows = np.arange(start, min(start + per_block, len(self)))
            got = _row_checksums(self._read_rows(rows, block), self.row_bytes)
            bad = np.flatnonzero(np.asarray(got, np.uint32) != self.checksums[rows])
            if len(bad):
                return int(rows[bad[0]])
        return None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:          # a worker process opens the file again
        return {k: v for k, v in self.__dict__.items() if k != "_file"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def close(self) -> None:
        self._file.close()

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """The images at `rows` (ints) as a (B, C, H, W) uint8 array: `out[:B]` when given (a C-contiguous
        uint8 array of at least B such images, reused batch after batch), else a new one. Rows next
        to each other in the file are read by one preadv, in file order, straight into their places."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(rows)
        if out is None:
            out = np.empty((n, *self.shape[1:]), np.uint8)
        elif out.dtype != np.uint8 or tuple(out.shape[1:]) != self.shape[1:] or len(out) < n \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"cannot read {n} images of shape {self.shape[1:]} into an array of "
                             f"{out.dtype} {tuple(out.shape)}")
        out = out[:n]
        if n == 0:
            return out
        outside = rows[(rows < 0) | (rows >= len(self))]
        if len(outside):
            raise IndexError(f"row {int(outside[0])} of an image cache of {len(self)} images")
        if self.checksums is None:
            raise TrainkitError(f"the image cache {self.path} is cut short (no checksums); delete it and run again")
        self._read_rows(rows, out)
        # each row checked as it is read: a cache changed after it was opened is never used silently
        bad = np.flatnonzero(np.asarray(_row_checksums(out, self.row_bytes), np.uint32) != self.checksums[rows])
        if len(bad):
            raise TrainkitError(f"the image cache {self.path} changed while it was read (row {int(rows[bad[0]])} "
                                f"fails its checksum); run again: a damaged cache is built again when opened")
        return out

    def _read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows `rows` (in range) into `out[:len(rows)]`, unchecked."""
        n = len(rows)
        flat = out[:n].reshape(n, self.row_bytes)
        order = np.argsort(rows, kind="stable")                  # file order: sequential pages, read ahead
        ordered = rows[order]
        per_call = max(1, min(_IOV_MAX, _READ_BYTES // max(self.row_bytes, 1)))
        # runs of consecutive rows: one contiguous range of the file each, cut to per_call rows
        cuts = np.flatnonzero((np.diff(ordered) != 1) | (np.arange(1, n) % per_call == 0)) + 1
        fd = self._file.fileno()
        for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
            offset = self.offset + int(ordered[start]) * self.row_bytes
            wanted = (end - start) * self.row_bytes
            got = _preadv(fd, [flat[i] for i in order[start:end].tolist()], offset)
            if got != wanted:
                raise TrainkitError(f"the image cache {self.path} ended early (changed while it was read?); "
                                    f"delete it and run again")
        return out[:n]


def images(cache: ImageCache, indices) -> torch.Tensor:
    """The images at `indices` (a sequence, array or tensor of ints) as a new (B, C, H, W) uint8 tensor."""
    return torch.from_numpy(cache.read(indices.cpu() if isinstance(indices, torch.Tensor) else indices))


def _preadv(fd: int, buffers: list[np.ndarray], offset: int) -> int:
    """Read the file's bytes from `offset` on into `buffers`, one after another; the bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, buffers, offset)
    got = 0                                             # no preadv (macOS before 11): one pread each
    for buffer in buffers:
        data = os.pread(fd, buffer.nbytes, offset + got)
        buffer[:len(data)] = np.frombuffer(data, np.uint8)
        got += len(data)
        if len(data) < buffer.nbytes:
            break
    return got


_Count = Annotated[int, Field(ge=0)]


class _Header(BaseModel):
    """What a cache header must hold; a header that does not is stale (built again), never a traceback."""
    model_config = ConfigDict(strict=True, extra="ignore")
    format: Literal[FORMAT]
    decoder: int
    fingerprint: str
    shape: list[_Count] = Field(min_length=4, max_length=4)
    dtype: Literal["uint8"]
    resize: str
    data_offset: int = Field(ge=_ALIGN, multiple_of=_ALIGN)
    unreadable: list[tuple[_Count, str]] = []

    @model_validator(mode="after")
    def _rows_in_range(self):
        rows = [row for row, _ in self.unreadable]
        if any(row >= self.shape[0] for row in rows) or len(set(rows)) != len(rows):
            raise ValueError("unreadable rows outside the cache, or repeated")
        return self


def read_header(path: str | os.PathLike) -> dict | None:
    """A cache file's header as a dict (fingerprint, shape, dtype, resize, decoder, data_offset,
    unreadable), or None when `path` is not a regular file with a sound trainkit image cache header."""
    try:
        with _open_regular(path) as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            return _Header.model_validate_json(f.readline(1 << 20)).model_dump()
    except (OSError, ValidationError):
        return None


def _open_regular(path: str | os.PathLike):
    """`path` opened for reading, unbuffered; OSError unless it is a regular file (a named pipe
    would block an open() for ever: it is opened without waiting, then checked)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return open(fd, "rb", buffering=0)


def _row_checksums(pixels, row_bytes: int) -> list[int]:
    """The CRC-32 of each row of `row_bytes` bytes in `pixels` (bytes or a C-contiguous array)."""
    view = memoryview(pixels).cast("B")
    return [zlib.crc32(view[i:i + row_bytes]) for i in range(0, len(view), row_bytes)]


def _decodable(paths: Sequence, unreadable: list[tuple[int, str]], shape: tuple[int, ...], resize: str) -> bool:
    """Whether a file the header calls undecodable decodes now (or the rows are not these files)."""
    if len(paths) != shape[0]:
        return True
    for row, _ in unreadable:
        try:
            decode_image(paths[row], shape[1], tuple(shape[2:]), resize)
            return True
        except TrainkitError:
            pass
    return False


# ---------------------------------------------------------------------------------------------

def _header(fingerprint: str, shape: tuple[int, ...], resize: str, unreadable=()) -> bytes:
    meta = {"format": FORMAT, "decoder": DECODER_VERSION, "fingerprint": fingerprint, "shape": list(shape),
            "dtype": "uint8", "resize": resize, "data_offset": 0}
    if unreadable:
        meta["unreadable"] = [[row, message] for row, message in unreadable]
    length = len(MAGIC) + len(json.dumps(meta)) + 1
    meta["data_offset"] = -(-(length + 32) // _ALIGN) * _ALIGN           # room for the offset's own digits
    line = json.dumps(meta).encode() + b"\n"
    return MAGIC + line + b" " * (meta["data_offset"] - len(MAGIC) - len(line))


def _decode_block(paths: list[str], channels: int, size: tuple[int, int], resize: str,
                  skip: bool = False) -> tuple[bytes, list[tuple[int, str]]]:
    """(n, C, H, W) uint8 bytes of `paths`, and (index, message) of each file that cannot be
    decoded (`skip`; its pixels zeros; else the first one raises); top level so a pool can run it."""
    pixels, bad = [], []
    for i, path in enumerate(paths):
        try:
            pixels.append(decode_image(path, channels, size, resize).numpy().tobytes())
        except TrainkitError as exc:
            if not skip:
                raise
            pixels.append(bytes(channels * size[0] * size[1]))
            bad.append((i, str(exc)))
    return b"".join(pixels), bad


def _decoded_blocks(paths: list[str], channels: int, size: tuple[int, int], resize: str, workers: int,
                    skip: bool = False):
    chunk = max(1, min(_CHUNK, -(-len(paths) // (max(workers, 1) * 4))))    # >= 4 tasks per worker
    blocks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if workers <= 1 or len(blocks) <= 1:
        for block in blocks:
            yield _decode_block(block, channels, size, resize, skip)
        return
    import functools
    import multiprocessing

    # Not fork: the caller may hold threads (progress bars, a server) or an initialised accelerator.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    decode = functools.partial(_decode_block, channels=channels, size=size, resize=resize, skip=skip)
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # the server imports this module (and torch) once and the workers fork from it, sharing
        # those pages, instead of each importing its own copy (a few hundred MB each)
        context.set_forkserver_preload([__name__])
    server = None
    if method == "forkserver":
        from multiprocessing import forkserver

        server = getattr(forkserver, "_forkserver", None)
    ours = server is not None and getattr(server, "_forkserver_pid", 1) is None     # not started before
    try:
        with context.Pool(min(workers, len(blocks))) as pool:
            yield from pool.imap(decode, blocks)            # in order; a worker's TrainkitError comes back here
    finally:
        if ours and hasattr(server, "_stop"):
            # the fork server lives as long as this process, and with torch imported it holds
            # about 0.35 GB that no one shares once the pool is gone; a later pool starts another
            server._stop()


def _temporary(target: Path) -> Path:
    """A temporary name beside `target`, saying which process on which machine writes it."""
    return target.with_name(f".{target.name}{_TEMPORARY}{os.getpid()}-{secrets.token_hex(4)}-{_host()}")


def _with_header(temporary: Path, header: bytes, old_length: int, target: Path) -> Path:
    """The complete temporary file with `header` in place of its first `old_length` bytes: written
    over them when it is as long (the padding holds the unreadable files' list), else into a new
    temporary that the pixels are copied to (a list of hundreds of files)."""
    if len(header) == old_length:
        with open(temporary, "r+b") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        return temporary
    import shutil

    moved = _temporary(target)
    try:
        with open(temporary, "rb") as source, open(moved, "wb") as f:
            source.seek(old_length)
            f.write(header)
            shutil.copyfileobj(source, f, 1 << 24)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        moved.unlink(missing_ok=True)
        raise
    temporary.unlink()
    return moved


def _remove_dead_temporaries(target: Path) -> None:
    """Temporaries of `target` left by a build that was killed: made on this machine (a shared
    folder may hold another's) by a process that is gone."""
    for leftover in target.parent.glob(f".{target.name}{_TEMPORARY}*"):
        parts = leftover.name[len(f".{target.name}{_TEMPORARY}"):].split("-", 2)     # pid, random, host
        if len(parts) == 3 and parts[0].isdigit() and parts[2] == _host() and not _alive(int(parts[0])):
            leftover.unlink(missing_ok=True)


def _host() -> str:
    """This machine's name, as a file name may hold it."""
    import socket

    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True                             # someone else's process: alive
    return True


def _probe_png() -> bytes:
    """A 1 x 1 PNG: decoding it checks channels, size and resize before a build starts."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b""))


_PROBE_PNG = _probe_png()
