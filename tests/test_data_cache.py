"""trainkit.data.cache: a folder's images decoded once into one uint8 file, read back by row. Built
from PNGs written here, read back with the pixels decode_image gives; stale, cut and killed builds
are never used."""

import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from trainkit.data.cache import ImageCache, build_cache, cache_file, images, open_cache, read_header
from trainkit.data.images import decode_image
from trainkit.errors import TrainkitError

SIZE = (16, 16)


@pytest.fixture
def pngs(tmp_path):
    """50 small PNGs: greys of a non-square size (cropped by fit), colour ones, 16-bit ones."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(50):
        if i % 5 == 3:
            image = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        elif i % 5 == 4:
            image = Image.fromarray(rng.integers(0, 65536, (18, 18), dtype=np.uint16))
        else:
            image = Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8))
        paths.append(folder / f"{i:03d}.png")
        image.save(paths[-1])
    return paths


def fork_servers() -> set[int] | None:
    """This process's children that are multiprocessing fork servers (None: not Linux)."""
    if not os.path.isdir("/proc/self/task"):
        return None
    children = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            children.update(int(pid) for pid in f.read().split())
    servers = set()
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing.forkserver" in f.read():
                    servers.add(pid)
        except OSError:
            pass
    return servers


def decoded(paths, channels=3, resize="fit") -> torch.Tensor:
    return torch.stack([decode_image(p, channels, SIZE, resize) for p in paths])


def test_a_built_cache_holds_decode_images_pixels(tmp_path, pngs):
    seen = []
    path = build_cache(pngs, 3, SIZE, "fit", "files-v1", tmp_path / "cache", workers=1, progress=seen.append)
    assert path == cache_file(tmp_path / "cache") and path.is_file()
    assert seen[-1] == 50 and seen == sorted(seen)
    header = read_header(path)
    assert header["fingerprint"] == "files-v1" and header["shape"] == [50, 3, *SIZE]
    assert header["dtype"] == "uint8" and header["resize"] == "fit"
    assert path.stat().st_size == header["data_offset"] + 50 * 3 * 16 * 16 + 4 * 50      # and a CRC-32 a row
    expected = decoded(pngs)
    for where in (tmp_path / "cache", path):             # the folder or the file
        pixels = open_cache(where, "files-v1", (50, 3, *SIZE), resize="fit")
        assert isinstance(pixels, ImageCache) and pixels.shape == (50, 3, *SIZE)
        assert images(pixels, range(50)).equal(expected)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:17]
    batch = images(pixels, order)
    assert batch.dtype == torch.uint8 and batch.shape == (17, 3, *SIZE)
    assert batch.equal(expected[order])
    assert images(pixels, [7, 7, 2]).equal(expected[[7, 7, 2]])
    # into an array given, reused: its first rows, rows next to each other and repeated, in the order asked
    out = np.full((20, 3, *SIZE), 1, np.uint8)
    for rows in ([4, 5, 6, 7, 0, 1, 49, 48, 3, 3], [9], list(range(50))[:20], []):
        got = pixels.read(rows, out=out)
        assert got.ctypes.data == out.ctypes.data and torch.from_numpy(got).equal(expected[rows])
    with pytest.raises(ValueError, match="cannot read 21 images"):
        pixels.read(range(21), out=out)
    with pytest.raises(IndexError, match="row 50 of an image cache of 50"):
        pixels.read([3, 50])
    copy = pickle.loads(pickle.dumps(pixels))             # as a worker process would get it: opened again
    assert torch.from_numpy(copy.read([49, 0])).equal(expected[[49, 0]])
    # another cache name in the same folder: one channel, stretched
    grey = build_cache(pngs, 1, SIZE, "stretch", "files-v1", tmp_path / "cache", workers=1, name="grey")
    assert grey != path
    assert images(open_cache(grey, "files-v1", (50, 1, *SIZE)), range(50)).equal(decoded(pngs, 1, "stretch"))


@pytest.mark.slow                      # starts pools of processes (each imports torch): ~10 s on 2 busy cores
def test_a_pool_of_workers_writes_the_same_file(tmp_path, pngs):
    servers = fork_servers()
    one = build_cache(pngs, 3, SIZE, "fit", "fp", tmp_path / "one", workers=1)
    two = build_cache(pngs, 3, SIZE, "fit", "fp", tmp_path / "two", workers=2)
    assert one.read_bytes() == two.read_bytes()
    if servers is not None:
        # the pool's fork server (torch imported: about 0.35 GB) does not outlive the build
        assert fork_servers() == servers
    # a file that fails in a worker: its one line comes back, and nothing is left
    pngs[31].write_bytes(pngs[31].read_bytes()[:60])
    with pytest.raises(TrainkitError) as error:
        build_cache(pngs, 3, SIZE, "fit", "fp2", tmp_path / "three", workers=2)
    assert f"{pngs[31]} is not a readable image" in str(error.value) and "\n" not in str(error.value)
    assert list((tmp_path / "three").iterdir()) == []


def test_another_fingerprint_or_setting_is_stale(tmp_path, pngs):
    shape = (50, 3, *SIZE)
    path = build_cache(pngs, 3, SIZE, "fit", "old files", tmp_path, workers=1)
    assert open_cache(tmp_path, "old files", shape) is not None
    assert open_cache(tmp_path, "new files", shape) is None                   # the files changed
    assert open_cache(tmp_path, "old files", (50, 1, *SIZE)) is None          # other settings
    assert open_cache(tmp_path, "old files", (49, 3, *SIZE)) is None
    assert open_cache(tmp_path, "old files", shape, resize="stretch") is None
    assert open_cache(tmp_path, "old files", shape, name="other") is None     # absent
    assert open_cache(tmp_path / "nowhere", "old files", shape) is None
    # rebuilt for the new files: the same name, replaced
    pngs[0].unlink()
    assert build_cache(pngs[1:], 3, SIZE, "fit", "new files", tmp_path, workers=1) == path
    assert open_cache(tmp_path, "old files", shape) is None
    assert images(open_cache(tmp_path, "new files", (49, 3, *SIZE)), range(49)).equal(decoded(pngs[1:]))


def test_a_cut_or_foreign_file_is_not_used(tmp_path, pngs):
    path = build_cache(pngs, 3, SIZE, "fit", "fp", tmp_path, workers=1)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    assert open_cache(tmp_path, "fp", (50, 3, *SIZE)) is None
    path.write_bytes(os.urandom(5000))
    assert read_header(path) is None and open_cache(tmp_path, "fp", (50, 3, *SIZE)) is None


def _build_and_die(pngs, cache_dir):
    def die_after_the_first_block(written):
        if written >= 10:
            os._exit(9)                      # killed mid-build: no cleanup runs
    build_cache(pngs, 3, SIZE, "fit", "fp", cache_dir, workers=1, progress=die_after_the_first_block)


def test_a_killed_build_is_never_used_and_its_temporary_is_cleared(tmp_path, pngs):
    cache_dir = tmp_path / "cache"
    killed = multiprocessing.get_context("fork").Process(target=_build_and_die, args=(pngs, cache_dir))
    killed.start()
    killed.join(60)
    assert killed.exitcode == 9
    left = list(cache_dir.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".images.tkcache.tmp-")     # partial, under a temporary name
    assert 0 < left[0].stat().st_size < read_header(left[0])["data_offset"] + 50 * 3 * 16 * 16
    assert open_cache(cache_dir, "fp", (50, 3, *SIZE)) is None
    assert open_cache(left[0], "fp", (50, 3, *SIZE)) is None
    # another machine's temporary in a shared folder is not touched (its process may be alive there)
    foreign = cache_dir / ".images.tkcache.tmp-1-0000-another_machine"
    foreign.write_bytes(b"x")
    # the next build clears the dead one's temporary and makes a whole cache
    path = build_cache(pngs, 3, SIZE, "fit", "fp", cache_dir, workers=1)
    assert sorted(cache_dir.iterdir()) == sorted([path, foreign])
    assert images(open_cache(cache_dir, "fp", (50, 3, *SIZE)), range(50)).equal(decoded(pngs))


def test_a_failed_build_keeps_the_cache_it_would_have_replaced(tmp_path, pngs):
    build_cache(pngs, 3, SIZE, "fit", "fp", tmp_path / "cache", workers=1)
    pngs[7].write_text("not an image")
    with pytest.raises(TrainkitError, match=f"{pngs[7]} is not a readable image"):
        build_cache(pngs, 3, SIZE, "fit", "fp2", tmp_path / "cache", workers=1)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["images.tkcache"]
    assert open_cache(tmp_path / "cache", "fp", (50, 3, *SIZE)) is not None
    with pytest.raises(TrainkitError, match="resize must be one of"):
        build_cache(pngs, 3, SIZE, "squash", "fp3", tmp_path / "cache", workers=1)
    with pytest.raises(TrainkitError, match="fingerprint"):
        build_cache(pngs, 3, SIZE, "fit", "", tmp_path / "cache", workers=1)


def test_an_empty_list_is_an_empty_cache(tmp_path):
    build_cache([], 1, SIZE, "fit", "none", tmp_path, workers=2)
    pixels = open_cache(tmp_path, "none", (0, 1, *SIZE))
    assert pixels is not None and images(pixels, []).shape == (0, 1, *SIZE)
