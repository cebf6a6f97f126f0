"""Reading and checking IDX files, finding and downloading MNIST."""
import gzip
import shutil

import numpy as np
import pytest

from trainkit.data.formats import parse_idx
from trainkit.data.idx import FASHION_MNIST, MNIST, load_idx_dataset
from trainkit.errors import TrainkitError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)


def test_parse_idx_rejects_truncated_and_bad_header():
    raw = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(TrainkitError, match="truncated"):
        parse_idx(raw[:-10], "f")
    with pytest.raises(TrainkitError, match="too long"):
        parse_idx(raw + b"\0", "f")
    with pytest.raises(TrainkitError, match="bad header"):
        parse_idx(b"\x01" + raw[1:], "f")
    with pytest.raises(TrainkitError, match="header cut short"):
        parse_idx(raw[:9], "f")


def copy_mnist(src, dst, extract=False):
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for item in MNIST.files.values():
        gz = src / "MNIST" / "raw" / (item.stem + ".gz")
        if extract:
            (raw / item.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        else:
            shutil.copy(gz, raw)
    return raw


def test_reads_the_published_files_from_a_read_only_folder(mnist_dir, tmp_path):
    raw = copy_mnist(mnist_dir, tmp_path)
    raw.chmod(0o555)
    try:
        data = load_idx_dataset(MNIST, tmp_path, download=False)
    finally:
        raw.chmod(0o755)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_labels.bincount().tolist()[:3] == [5923, 6742, 5958]  # the known class counts
    assert sorted(p.name for p in raw.iterdir()) == sorted(i.stem + ".gz" for i in MNIST.files.values())


def test_reads_extracted_files(mnist_dir, tmp_path):
    copy_mnist(mnist_dir, tmp_path, extract=True)
    data = load_idx_dataset(MNIST, tmp_path, download=False)
    assert len(data.test_labels) == 10000


def test_truncated_gz_names_the_file(mnist_dir, tmp_path):
    raw = copy_mnist(mnist_dir, tmp_path)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(TrainkitError, match=r"t10k-labels-idx1-ubyte.gz is truncated or corrupt.*delete it"):
        load_idx_dataset(MNIST, tmp_path, download=False)


def test_wrong_md5_names_the_file(mnist_dir, tmp_path):
    raw = copy_mnist(mnist_dir, tmp_path)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress(path.read_bytes()))
    labels[100] = (labels[100] + 1) % 10          # a valid file with one wrong label
    path.write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(TrainkitError, match="t10k-labels-idx1-ubyte.gz has the wrong MD5"):
        load_idx_dataset(MNIST, tmp_path, download=False)


def test_corrupted_extracted_file(mnist_dir, tmp_path):
    raw = copy_mnist(mnist_dir, tmp_path, extract=True)
    path = raw / "t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrainkitError, match="t10k-images-idx3-ubyte is corrupt"):
        load_idx_dataset(MNIST, tmp_path, download=False)
    path.write_bytes(bytes(data[:-784]))
    with pytest.raises(TrainkitError, match="t10k-images-idx3-ubyte is truncated"):
        load_idx_dataset(MNIST, tmp_path, download=False)


def test_downloads_missing_files(tmp_path, local_mirror, monkeypatch):
    monkeypatch.setenv("TRAINKIT_MIRROR", local_mirror)
    data = load_idx_dataset(MNIST, tmp_path / "fresh", progress=False)
    assert len(data.train_labels) == 60000
    files = sorted(p.name for p in (tmp_path / "fresh" / "MNIST" / "raw").iterdir())
    assert files == sorted(i.stem + ".gz" for i in MNIST.files.values())   # no temporary files left


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINKIT_MIRROR", "http://127.0.0.1:9/")   # nothing listens there
    with pytest.raises(TrainkitError, match="could not be downloaded.*--data-dir"):
        load_idx_dataset(MNIST, tmp_path, progress=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_fashion_mnist_from_the_debian_package(tmp_path, fashion_mnist_package):
    # Debian's dataset-fashion-mnist (.ci/run installs it; skipped without it): its gz files differ from
    # the published ones (no file name in the gzip header), so what they decompress to is what gets checked.
    data = load_idx_dataset(FASHION_MNIST, tmp_path, download=False)
    assert data.train_images.shape == (60000, 1, 28, 28)
    assert data.classes[9] == "Ankle boot"
    assert data.test_labels.bincount().tolist() == [1000] * 10
