"""The image cache of a streamed folder (trainkit/data/stream.py's cached_images, data/cache.py): built
once from real PNG and JPEG files, the same batches as decoding the files and as holding them in
memory, reused by a later read without a decode, built again when a file is changed, added or
removed, resumed bit for bit, and turned off by TRAINKIT_IMAGE_CACHE or a full disk."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import trainkit.data.cache as cache_module
import trainkit.data.images as images_module
from test_stream import FIXED, batches, write_folder
from trainkit import TrainConfig
from trainkit.data import stream
from trainkit.data.cache import ImageCache, build_cache, images, open_cache, read_header
from trainkit.data.dataset import FileImages
from trainkit.data.images import decode_image
from trainkit.data.loaders import FlipCrop, SeedAugment, TensorLoader
from trainkit.data.stream import StreamLoader, cache_room
from trainkit.errors import TrainkitError
from trainkit.loop.engine import Callback, StopRequested
from trainkit.run.experiment import get_data, held_out
from trainkit.run.training import train


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINKIT_STREAM_WORKERS", "1")
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRAINKIT_IMAGE_CACHE", raising=False)
    monkeypatch.delenv("TRAINKIT_MEMORY_BUDGET", raising=False)


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "images", per_class=20)


def cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "images").glob("*.tkcache"))


@pytest.fixture
def decodes(monkeypatch):
    """How many images decode_image has decoded in this process since the test began."""
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(images_module, "decode_image", counted)   # FileImages.read's
    monkeypatch.setattr(cache_module, "decode_image", counted)    # build_cache's (one worker: this process)
    return count


def test_cached_batches_are_the_files_and_the_memory_batches(folder, tmp_path, monkeypatch):
    # a validation split and a subset: the cache's rows follow the images through both
    cfg = TrainConfig(dataset=f"imagefolder:{folder}", image_size="16", progress=False, val_split=0.2,
                      limit_train=30, seed=3)
    memory = held_out(cfg, get_data(cfg.replace(pipeline="tensor")))
    cached = held_out(cfg, get_data(cfg.replace(pipeline="stream")))
    monkeypatch.setenv("TRAINKIT_IMAGE_CACHE", "off")
    files = held_out(cfg, get_data(cfg.replace(pipeline="stream")))
    assert cached.streamed and cached.train_images.cached and isinstance(cached.train_images.cache, ImageCache)
    assert files.streamed and not files.train_images.cached
    assert len(cache_files(tmp_path)) == 1
    assert cached.mean == files.mean == memory.mean and cached.std == files.std == memory.std
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(cached, f"{split}_images").read(range(len(getattr(cached, f"{split}_labels")))),
                           getattr(memory, f"{split}_images")), split

    stats = dict(mean=memory.mean, std=memory.std)
    for augment in (FlipCrop(), SeedAugment(fill_border=True)):
        common = dict(shuffle=True, augment=augment, seed=5, **stats)
        held = TensorLoader(memory.train_images, memory.train_labels, 8, **common)
        read = StreamLoader(files.train_images, files.train_labels, 8, persistent=True, **common)
        mapped = StreamLoader(cached.train_images, cached.train_labels, 8, **common)
        for _ in range(2):                          # epoch after epoch: the same plan, the same pixels
            for (xa, ya), (xb, yb), (xc, yc) in zip(batches(held), batches(read), batches(mapped), strict=True):
                assert torch.equal(xa, xb) and torch.equal(xa, xc) and torch.equal(ya, yb) and torch.equal(ya, yc)


def test_a_later_read_reuses_the_cache_and_changed_files_rebuild_it(folder, tmp_path, capsys, decodes):
    cfg = TrainConfig(dataset=f"imagefolder:{folder}", image_size="16", channels=3, pipeline="stream",
                      progress=False)
    first = get_data(cfg)
    assert "decoding 60 images once into" in capsys.readouterr().out and decodes[0] >= 60
    [path] = cache_files(tmp_path)
    made = path.stat()

    decodes[0] = 0
    again = get_data(cfg)                           # a second run on the same files
    loader = StreamLoader(again.train_images, again.train_labels, 16, mean=again.mean, std=again.std,
                          shuffle=True, augment=FlipCrop())
    assert len(batches(loader)) == len(loader)
    assert decodes[0] == 0                          # the scan, the stats and a whole epoch: no file decoded
    assert "made from these files before" in capsys.readouterr().out
    now = path.stat()
    assert (now.st_ino, now.st_mtime_ns, now.st_size) == (made.st_ino, made.st_mtime_ns, made.st_size)
    assert torch.equal(again.test_images.read(range(len(again.test_labels))),
                       first.test_images.read(range(len(first.test_labels))))

    # a file changed (same name, other pixels), one added, one removed: a new fingerprint each time
    changed = sorted((folder / "class1").glob("*.png"))[0]
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(changed)
    Image.fromarray(np.full((20, 20, 3), 99, np.uint8)).save(folder / "class2" / "added.png")
    for change, count in (("changed", 61), ("removed", 60)):
        if change == "removed":
            next((folder / "class0").glob("*.png")).unlink()
        decodes[0] = 0
        data = get_data(cfg)
        assert f"decoding {count} images once" in capsys.readouterr().out, change
        assert decodes[0] >= count and cache_files(tmp_path) == [path], change     # rebuilt over the old one
        assert read_header(path)["shape"][0] == count and path.stat().st_ino != made.st_ino
        made = path.stat()
        names = data.test_images.names() + data.train_images.names()
        every = torch.cat([data.test_images.read(range(len(data.test_labels))),
                           data.train_images.read(range(len(data.train_labels)))])
        assert torch.equal(every, torch.stack([decode_image(folder / n, 3, (16, 16), "fit") for n in names]))
    assert "class1/" + changed.name in names and "class2/added.png" in names


@pytest.mark.slow                      # trains three short runs
def test_a_cached_run_resumes_in_the_middle_of_an_epoch_bit_for_bit(folder, tmp_path):
    cfg = TrainConfig(dataset=f"imagefolder:{folder}", image_size="12", pipeline="stream", model="speednet",
                      epochs=2, batch_size=16, lr=0.05, progress=False, device="cpu", **FIXED)
    whole = train(cfg, write=False)
    assert whole.run.data.train_images.cached

    class InterruptAt(Callback):
        def on_batch_end(self, state):
            if state.epoch == 2 and state.batch == 1:
                state.interrupt()

    with pytest.raises(StopRequested):
        train(cfg, out=tmp_path / "cut", callbacks=[InterruptAt()])
    resumed = train(cfg, resume=tmp_path / "cut")
    assert resumed.run.data.train_images.cached
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in whole.history]
    a = whole.run.model.state_dict()
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_can_be_turned_off_and_needs_room(folder, tmp_path, monkeypatch, capsys):
    cfg = TrainConfig(dataset=f"imagefolder:{folder}", image_size="16", pipeline="stream", progress=False)
    monkeypatch.setenv("TRAINKIT_IMAGE_CACHE", "off")
    assert not get_data(cfg).train_images.cached and cache_files(tmp_path) == []
    monkeypatch.setenv("TRAINKIT_IMAGE_CACHE", "perhaps")
    with pytest.raises(TrainkitError, match="TRAINKIT_IMAGE_CACHE must be on or off"):
        get_data(cfg)
    monkeypatch.setenv("TRAINKIT_IMAGE_CACHE", "on")
    assert cache_room(tmp_path / "not" / "yet", 1000) is None
    assert "MB free" in cache_room(tmp_path, 2**62)
    monkeypatch.setattr(stream, "CACHE_RESERVE", 2**62)           # a disk that cannot hold it
    data = get_data(cfg)
    err = capsys.readouterr().err
    assert "no image cache for" in err and "decoded every epoch" in err and len(err.strip().splitlines()) == 1
    assert not data.train_images.cached and cache_files(tmp_path) == []
    loader = StreamLoader(data.test_images, data.test_labels, 5, mean=data.mean, std=data.std)
    assert [len(y) for _, y in batches(loader)] == [5, 5, 2]                 # read from the files
    # a cache folder that cannot be made: the same line, the files read
    monkeypatch.undo()
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "a file" / "cache"))
    monkeypatch.setenv("TRAINKIT_STREAM_WORKERS", "1")
    assert not get_data(cfg).train_images.cached
    err = capsys.readouterr().err
    assert "no image cache for" in err and "cannot write in" in err and len(err.strip().splitlines()) == 1


def mapped_kb(path) -> int:
    """Kilobytes of `path` that this process has mapped (Rss in /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_reading_the_cache_maps_none_of_it(tmp_path):
    # a mapped page of the file would count in the process's memory (PSS) while it stayed mapped
    pngs = []
    for i in range(64):
        pngs.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(pngs[-1])
    path = build_cache(pngs, 3, (64, 64), "fit", "fp", tmp_path / "c", workers=1)
    pixels = open_cache(path, "fp", (64, 3, 64, 64))
    assert torch.equal(images(pixels, range(64))[5], decode_image(pngs[5], 3, (64, 64), "fit"))
    images_ = FileImages.of(pngs, 3, (64, 64), root=tmp_path).with_cache(pixels, range(64))
    loader = StreamLoader(images_, torch.zeros(64, dtype=torch.int64), 16, mean=(0.5,) * 3, std=(0.2,) * 3,
                          shuffle=True, augment=FlipCrop())
    assert len(batches(loader)) == 4
    assert mapped_kb(path) == 0                                  # every row read, none of the file mapped
    assert torch.equal(images(pixels, [63, 5]), torch.stack([decode_image(pngs[i], 3, (64, 64), "fit")
                                                              for i in (63, 5)]))


def test_a_second_process_waits_for_the_build_and_opens_it(folder, tmp_path, capsys):
    import fcntl
    import os
    import threading

    cfg = TrainConfig(dataset=f"imagefolder:{folder}", image_size="16", channels=3, pipeline="stream",
                      progress=False)
    lock = tmp_path / "cache" / "images" / f".{stream.cache_name(folder, 3, (16, 16), 'fit')}.lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)               # another process building this cache
    got = []
    reader = threading.Thread(target=lambda: got.append(get_data(cfg)))
    reader.start()
    reader.join(timeout=1.5)
    assert reader.is_alive() and cache_files(tmp_path) == []      # waits, builds nothing meanwhile
    os.close(fd)
    reader.join(timeout=60)
    assert not reader.is_alive() and got[0].train_images.cached
    assert "decoding 60 images once" in capsys.readouterr().out


def test_an_undecodable_file_is_left_out_of_the_cache_as_in_memory(folder, tmp_path, capsys, decodes):
    # a PNG whose header reads and whose pixels do not: found by the cache's build, not before
    broken = sorted((folder / "class1").glob("*.png"))[2]
    broken.write_bytes(broken.read_bytes()[:60])
    cfg = TrainConfig(dataset=f"imagefolder:{folder}", image_size="16", progress=False, val_split=0.2, seed=2)
    memory = held_out(cfg, get_data(cfg.replace(pipeline="tensor")))
    out, err = capsys.readouterr()
    memory_warning = [line for line in err.splitlines() if line.strip()]
    memory_said = [line for line in out.splitlines() if line.startswith("Image folder")]
    assert len(memory_said) == 1 and "47 training, 12 test images" in memory_said[0]
    for build in ("built", "reopened"):
        decodes[0] = 0
        cached = held_out(cfg, get_data(cfg.replace(pipeline="stream")))
        out, err = capsys.readouterr()
        assert ("decoding 60 images once" in out) == (build == "built"), build
        assert (decodes[0] >= 59) == (build == "built"), build     # reopened: nothing decoded again
        # one line, word for word the in-memory path's: the count and the file's name
        assert [line for line in err.splitlines() if line.strip()] == memory_warning, build
        assert len(memory_warning) == 1 and "1 of 60 files" in memory_warning[0]
        assert f"class1/{broken.name} (is not a readable image" in memory_warning[0]
        assert [line for line in out.splitlines() if line.startswith("Image folder")] == memory_said, build
        for split in ("train", "val", "test"):
            labels = getattr(cached, f"{split}_labels")
            assert torch.equal(labels, getattr(memory, f"{split}_labels")), (build, split)
            assert torch.equal(getattr(cached, f"{split}_images").read(range(len(labels))),
                               getattr(memory, f"{split}_images")), (build, split)
        names = cached.train_images.names() + cached.val_images.names() + cached.test_images.names()
        assert len(names) == 59 and f"class1/{broken.name}" not in names
        assert f"class1/{broken.name}" not in str(cached.manifest())           # nor in data.json
    assert len(read_header(cache_files(tmp_path)[0])["unreadable"]) == 1

    with pytest.raises(TrainkitError) as refused:                 # --bad-files error: one line naming it
        get_data(cfg.replace(pipeline="stream", bad_files="error"))
    assert "1 of 60 files" in str(refused.value) and broken.name in str(refused.value)
    assert "--bad-files skip" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow                      # starts a pool of decoding processes
def test_build_cache_keeps_the_rows_of_undecodable_files_when_asked(tmp_path):
    pngs = []
    for i in range(6):
        pngs.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(pngs[-1])
    pngs[1].write_bytes(pngs[1].read_bytes()[:50])
    with pytest.raises(TrainkitError, match="1.png is not a readable image"):     # by default: stops the build
        build_cache(pngs, 3, (8, 8), "fit", "fp", tmp_path / "c", workers=1)
    assert not list((tmp_path / "c").iterdir())                  # nothing left behind
    for workers, many in ((1, 1), (2, 1), (1, 60)):              # 60: more than the header's padding holds
        paths = pngs + [pngs[1]] * (many - 1)
        bad = []
        path = build_cache(paths, 3, (8, 8), "fit", "fp", tmp_path / f"c{workers}-{many}", workers=workers,
                           unreadable=bad)
        rows = [1] + list(range(6, 6 + many - 1))
        assert [row for row, _ in bad] == rows and "not a readable image" in bad[0][1]
        header = read_header(path)
        assert [row for row, _ in header["unreadable"]] == rows and (header["data_offset"] > 4096) == (many > 1)
        pixels = open_cache(path, "fp", (len(paths), 3, 8, 8))
        assert pixels is not None and not pixels.read(rows).any()
        assert torch.equal(images(pixels, [0, 2, 5]), torch.stack([decode_image(pngs[i], 3, (8, 8)) for i in (0, 2, 5)]))
