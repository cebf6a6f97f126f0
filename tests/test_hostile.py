"""Hostile input: damaged checkpoints, stalling mirrors, gzip and PNG bombs, absurd settings.

Every case ends in one line on stderr and a non-zero exit (or a TrainkitError with a short
message), never a traceback, a hang or lost data. docs/reliability.md lists each with its test.
"""
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import assert_one_line_error, cli_ok, data_dir, mount_namespace, run_cli
from trainkit import TrainConfig
from trainkit import checkpoint as ckpt
from trainkit.commands.cli import main
from trainkit.config import field_specs, from_mapping, load_config_file, show, validate
from trainkit.data import fetch
from trainkit.data.fetch import download_timeout
from trainkit.data.idx import MNIST, idx_size, read_idx_file
from trainkit.data.images import decode_image
from trainkit.errors import TrainkitError


def flip(path: Path, offset: int | None = None, count: int = 16) -> None:
    """Invert `count` bytes in place (the file keeps its length), at `offset` or in the middle."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset % len(data)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj, key=str) for t in tensors(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors(item)]
    return []


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of conftest's finished_run (a real 1-epoch run) to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    from PIL import Image
    path = tmp_path_factory.mktemp("png") / "digit.png"
    Image.new("L", (28, 28), 0).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Checkpoints carry a SHA-256 of their bytes

@pytest.mark.slow
def test_checkpoints_carry_a_checksum_and_stay_plain_torch_files(finished_run):
    for name in ("last.pt", "best.pt", "model.pt"):
        data = (finished_run / name).read_bytes()
        assert data[-80:].startswith(ckpt.CHECKSUM_TAG), name
        assert ckpt.check_checksum(data, finished_run / name) is True
    # torch.load alone still reads them: the checksum is the zip archive's comment
    assert torch.load(finished_run / "model.pt", weights_only=True).keys() == \
        ckpt.load_weights(finished_run / "model.pt").keys()


@pytest.mark.slow
def test_flipped_bytes_in_last_pt_are_refused_and_nothing_changes(run_copy):
    flip(run_copy / "last.pt")
    # what the checksum is for: torch.load alone takes the damaged file and returns other numbers
    damaged = tensors(torch.load(run_copy / "last.pt", weights_only=True))
    good = tensors(ckpt.load_checkpoint(run_copy / "best.pt"))
    assert len(damaged) == len(good) and any(not torch.equal(a, b) for a, b in zip(damaged, good))
    before = snapshot(run_copy)
    proc = run_cli("train", "--resume", run_copy)
    assert_one_line_error(proc, f"{run_copy / 'last.pt'} is truncated or corrupt", "SHA-256 checksum")
    assert snapshot(run_copy) == before                       # nothing rewritten, nothing deleted
    assert ckpt.load_checkpoint(run_copy / "best.pt")["epoch"] == 1   # the other good checkpoint is intact


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "export"])
def test_flipped_bytes_in_model_pt_are_refused(run_copy, digit_png, command):
    flip(run_copy / "model.pt")
    extra = [digit_png] if command == "predict" else ["--format", "safetensors"]
    proc = run_cli(command, run_copy, *extra)
    assert_one_line_error(proc, f"{run_copy / 'model.pt'} is truncated or corrupt", "checksum")
    assert not (run_copy / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["start", "middle", "end", "footer"])
def test_any_flipped_byte_is_caught(run_copy, where):
    path = run_copy / "last.pt"
    offset = {"start": 40, "middle": None, "end": -100, "footer": -5}[where]
    flip(path, offset, count=1)
    with pytest.raises(TrainkitError, match="truncated or corrupt: its contents do not match"):
        ckpt.load_checkpoint(path)


@pytest.mark.slow
def test_checkpoints_from_before_checksums_still_load(run_copy):
    # An old checkpoint: the same torch.save bytes with an empty zip comment.
    path = run_copy / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-82] + b"\0\0")
    assert ckpt.check_checksum(path.read_bytes(), path) is False
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    torch.save(ckpt.load_weights(run_copy / "model.pt"), run_copy / "model.pt")   # plain torch.save
    assert set(ckpt.load_weights(run_copy / "model.pt")) == set(ckpt.load_checkpoint(run_copy / "best.pt")["model"])


# ---------------------------------------------------------------------------------------------
# Downloads: a deadline for each file, and signals that stop them at once

class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """A mirror that stalls: one byte a second, of the body or already of the status line."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.server.requested.set()
        head = b"HTTP/1.0 200 OK\r\nContent-Length: 9912422\r\n\r\n"
        if self.server.mode == "body":
            self.wfile.write(head)
            head = b"\x1f" * 9912422
        try:
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.server.stopping.wait(1.0):
                    return
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def trickle_server(mode: str):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.mode, server.requested, server.stopping = mode, threading.Event(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["body", "headers"])
def trickling_mirror(request):
    with trickle_server(request.param) as server:
        yield server


@pytest.fixture
def stalled_mirror():
    with trickle_server("body") as server:
        yield server


def test_a_stalling_mirror_meets_the_deadline(trickling_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINKIT_MIRROR", trickling_mirror.url)
    monkeypatch.setenv("TRAINKIT_DOWNLOAD_TIMEOUT", "1.5")
    start = time.monotonic()
    with pytest.raises(TrainkitError, match=r"not done within 1.5 s.*TRAINKIT_DOWNLOAD_TIMEOUT") as info:
        item = MNIST.files["train_images"]
        fetch.download(MNIST.name, MNIST.mirrors, item.stem + ".gz", item.gz_md5, tmp_path, progress=False,
                       holds=MNIST.folder + "/raw/")
    assert time.monotonic() - start < 4                     # a byte a second would take 115 days
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []                   # no temporary file left


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", "1e999"])
def test_a_bad_download_timeout_is_one_line(value, monkeypatch):
    monkeypatch.setenv("TRAINKIT_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(TrainkitError, match="TRAINKIT_DOWNLOAD_TIMEOUT must be a number of seconds"):
        download_timeout()


def start_train(tmp_path, mirror, **env):
    """`trainkit train` on an empty data folder, downloading from `mirror`."""
    full_env = {**os.environ, "TRAINKIT_MIRROR": mirror, **env}
    args = [sys.executable, "-m", "trainkit", "train", "--limit-train", "64", "--limit-test", "64", "--epochs", "1",
            "--data-dir", tmp_path / "data", "--out", tmp_path / "run", "--no-progress"]
    return subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def finished(proc, timeout):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_a_stalling_mirror_fails_the_run_in_one_line(stalled_mirror, tmp_path):
    start = time.monotonic()
    proc = finished(start_train(tmp_path, stalled_mirror.url, TRAINKIT_DOWNLOAD_TIMEOUT="2"), timeout=120)
    assert_one_line_error(proc, "train-images-idx3-ubyte.gz is missing", "could not be downloaded",
                          "not done within 2 s", "TRAINKIT_DOWNLOAD_TIMEOUT")
    assert time.monotonic() - start < 60
    assert files_under(tmp_path) == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_download_at_once(stalled_mirror, tmp_path, signum, code):
    proc = start_train(tmp_path, stalled_mirror.url)     # the default deadline: 120 s
    assert stalled_mirror.requested.wait(120), "the download never started"
    time.sleep(0.5)
    proc.send_signal(signum)
    sent = time.monotonic()
    result = finished(proc, timeout=30)
    assert time.monotonic() - sent < 5
    assert_one_line_error(result, f"stopped by {signal.Signals(signum).name} while downloading",
                          "train-images-idx3-ubyte.gz", code=code)
    assert files_under(tmp_path) == []                    # the temporary file is gone


# ---------------------------------------------------------------------------------------------
# Data files: damaged gzip, gzip bombs, oversized files

def raw_dir(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    return raw


@pytest.mark.parametrize("offset", [100, 1000, 2500, 4000, -6])
def test_flipped_bytes_in_a_gz_name_the_file(mnist_dir, tmp_path, offset):
    # Depending on where, zlib reports a bad stream (zlib.error) or gzip a bad CRC or length.
    path = raw_dir(tmp_path) / "t10k-labels-idx1-ubyte.gz"
    shutil.copy(mnist_dir / "MNIST" / "raw" / path.name, path)
    flip(path, offset, count=1)
    with pytest.raises(TrainkitError, match=r"t10k-labels-idx1-ubyte.gz is (truncated or )?corrupt.*delete it") as info:
        read_idx_file(path, MNIST, MNIST.files["test_labels"])
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_flipped_bytes_in_a_gz_are_one_line_from_the_cli(mnist_dir, tmp_path):
    path = raw_dir(tmp_path / "data") / "train-images-idx3-ubyte.gz"
    shutil.copy(mnist_dir / "MNIST" / "raw" / path.name, path)
    flip(path, 5_037_886, count=4)        # "invalid block type": a zlib.error, which used to escape
    proc = run_cli("train", "--data-dir", tmp_path / "data", "--limit-train", "64", "--out", tmp_path / "run")
    assert_one_line_error(proc, f"{path} is truncated or corrupt")


def write_gzip_of_zeros(path: Path, size: int) -> None:
    """A gzip bomb: `size` bytes of zeros, about 1/220 of that on disk (level 1, written in chunks)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)   # 31: a gzip header
    chunk = bytes(1 << 24)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(compressor.compress(chunk))
        f.write(compressor.flush())


PEAK_MEMORY = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)   # kB on Linux
"""


def cli_peak_memory(*args, env) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI in a child of a small Python process; returns the result and its peak RSS in MB."""
    cmd = [sys.executable, "-c", PEAK_MEMORY, sys.executable, "-m", "trainkit", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    code, peak_kb = map(int, proc.stdout.split())
    return subprocess.CompletedProcess(cmd, code, "", proc.stderr), peak_kb // 1024


@pytest.mark.slow
def test_a_gzip_bomb_is_refused_without_allocating_it(tmp_path):
    bomb = raw_dir(tmp_path / "bomb") / "train-images-idx3-ubyte.gz"
    write_gzip_of_zeros(bomb, 512 << 20)
    assert bomb.stat().st_size < 3 << 20                    # 512 MiB in a file of about 2 MB
    args = ["train", "--limit-train", "64", "--out", tmp_path / "run", "--no-progress"]
    env = {"TRAINKIT_MIRROR": "http://127.0.0.1:9/"}       # nothing listens: the baseline fails at once
    baseline, baseline_mb = cli_peak_memory(*args, "--data-dir", tmp_path / "empty", env=env)
    assert_one_line_error(baseline, "could not be downloaded")
    proc, bomb_mb = cli_peak_memory(*args, "--data-dir", tmp_path / "bomb", env=env)
    assert_one_line_error(proc, f"{bomb} is corrupt or not the mnist file: it decompresses to more than "
                                f"the {idx_size(MNIST.files['train_images'])} bytes")
    # Reading stops after the 47 MB the real file holds; decompressing it all would take 512 MiB.
    assert bomb_mb - baseline_mb < 200, (baseline_mb, bomb_mb)


def test_an_oversized_extracted_file_is_refused_before_it_is_read(tmp_path):
    path = raw_dir(tmp_path) / "train-images-idx3-ubyte"
    with open(path, "wb") as f:
        f.truncate(64 << 30)                                # 64 GiB, sparse: nothing is written
    with pytest.raises(TrainkitError, match=r"train-images-idx3-ubyte is too large \(68719476736 bytes"):
        read_idx_file(path, MNIST, MNIST.files["train_images"])


# ---------------------------------------------------------------------------------------------
# Image bombs in `predict` (and in image folders)

def write_png_bomb(path: Path, side: int) -> None:
    """A valid black 1-bit PNG of side x side pixels, a few kB on disk."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)                         # filter byte 0, then the pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 14_000])   # Pillow warns above 89 M pixels, raises above 179 M
def test_a_png_bomb_is_refused(tmp_path, side):
    path = tmp_path / "bomb.png"
    write_png_bomb(path, side)
    assert path.stat().st_size < 100_000
    with pytest.raises(TrainkitError, match=rf"bomb.png was refused: Image size \({side * side} pixels\) "
                                            rf"exceeds limit"):
        decode_image(path, 1, (28, 28))


@pytest.mark.slow
def test_a_png_bomb_in_predict_is_left_out_in_one_line(finished_run, tmp_path, digit_png):
    path = tmp_path / "bomb.png"
    write_png_bomb(path, 14_000)
    proc = run_cli("predict", finished_run, digit_png, path)        # the other file is still predicted
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{digit_png}: ") and len(proc.stdout.splitlines()) == 1
    warning, = [line for line in proc.stderr.splitlines() if line.startswith("trainkit: warning:")]
    assert "bomb.png (was refused" in warning and "decompression bomb" in warning
    assert_one_line_error(run_cli("predict", finished_run, path), "bomb.png was refused", "decompression bomb")


# ---------------------------------------------------------------------------------------------
# Settings: sizes, types and ranges are checked before a value is used or shown

def alias_bomb(levels: int = 9) -> str:
    """A billion laughs in YAML flow style: 9 ** (levels + 1) strings that share 9 * levels lists."""
    text = "&l0 [" + ", ".join(["lol"] * 9) + "]"
    for n in range(1, levels + 1):
        text = f"&l{n} [{text}, " + ", ".join([f"*l{n - 1}"] * 8) + "]"
    return text


@pytest.mark.parametrize("setting, kind", [("model", "a string"), ("lr", "a number"), ("epochs", "an integer"),
                                           ("nesterov", "true or false")])
def test_a_yaml_alias_bomb_under_one_setting_is_named_not_printed(tmp_path, setting, kind):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"epochs: 1\n{setting}: {alias_bomb()}\n")
    assert path.stat().st_size < 1000                      # 3.5 billion strings once expanded
    with pytest.raises(TrainkitError) as info:
        from_mapping(load_config_file(path))
    assert str(info.value) == f"setting {setting!r} must be {kind}, got a list"


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_one_line_from_the_cli(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"model: {alias_bomb()}\n")
    assert_one_line_error(run_cli("train", "--config", path, timeout=120), "setting 'model' must be a string, got a list")


def test_values_in_messages_are_short():
    assert show("x" * 10**7) == repr("x" * 80) + "..."
    assert show(10**5000) == "an integer of 5001 digits"      # str() of it would be refused
    assert show(2**63) == "9223372036854775808"
    assert show([[1] * 10**6] * 10**3) == "a list" and show({"a": 1}) == "a dict"
    assert show(float("nan")) == "nan" and show(None) == "None"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainkit: error: ") and "Traceback" not in err[0], err
    return err[0]


QUICK_ARGS = ["train", "--limit-train", "64", "--limit-test", "64", "--epochs", "1", "--batch-size", "64"]


@pytest.mark.parametrize("argv, fragment", [
    (["--seed", "1e23"], "--seed must be an integer, got '1e23'"),
    (["--seed", str(10**23)], "--seed must be at most 9223372036854775807, got 100000000000000000000000"),
    (["--seed", "-1"], "--seed must not be negative"),
    (["--label-smoothing", "2"], "--label-smoothing must be less than 1, got 2.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be less than 1"),
    (["--pct-start", "1.5"], "--pct-start must be less than 1"),
    (["--target-acc", "101"], "--target-acc must be at most 100"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--lr", "1e300"], "--lr must be at most 3.403e+38 in size (a 32-bit float), got 1e+300"),
    (["--weight-decay", "1e39"], "--weight-decay must be at most 3.403e+38"),
    (["--epochs", str(2**64)], "--epochs must be at most 9223372036854775807"),
    (["--model", "m" * 5000], "--model must be at most 4096 characters"),
    (["--device", "x" * 5000], "must be at most 4096 characters"),
])
def test_out_of_range_flags_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*QUICK_ARGS, *argv]) == 2
    line = one_line(capsys)
    assert fragment in line and len(line) < 300, line
    assert not (tmp_path / "runs").exists()


BAD_CONFIG_FILES = [
    ("run.json", b'{"config": 5}', '"config" must hold a mapping of settings'),
    ("run.json", b'{"config": [1, 2]}', '"config" must hold a mapping of settings (as in a run\'s config.json), not a list'),
    ("s.yaml", b"epochs: 3\n\xff\xfe\x00garbage\n", "is not UTF-8 text (byte 10)"),
    ("s.yaml", b"", "is empty"),
    ("s.json", b"  \n", "is empty"),
    ("s.toml", b"", "is empty"),
    ("s.yaml", b"- epochs\n- 3\n", "must hold a mapping of settings, not a list"),
    ("s.yaml", b"just words\n", "must hold a mapping of settings, not 'just words'"),
    ("s.json", b"[" * 100_000, "could not be parsed"),
    ("s.yaml", b"epochs: !!python/object/apply:os.system ['touch pwned']\n", "could not be parsed"),
    ("s.yaml", b"1: 2\n", "setting names must be strings, got 1"),
    ("s.yaml", b"seed: 100000000000000000000000\n", "--seed must be at most 9223372036854775807"),
    ("s.json", b'{"seed": 1e23}', "--seed must be at most 9223372036854775807, got 99999999999999991611392"),
    ("s.json", b'{"epochs": 1e400}', "setting 'epochs': inf is not a valid int"),
    ("s.yaml", b"lr: .inf\n", "--lr must be a finite number, got inf"),
    ("s.yaml", b"label_smoothing: 2\n", "--label-smoothing must be less than 1"),
    ("s.yaml", b"model: {name: s5net}\n", "setting 'model' must be a string, got a dict"),
    ("s.yaml", b"epochs: 2024-01-01\n", "setting 'epochs' must be an integer, got a date"),
    ("s.yaml", b"epochs: " + b"9" * 5000 + b"\n", "could not be parsed: Exceeds the limit (4300 digits)"),
    ("s.yaml", b"epochs: '" + b"9" * 5000 + b"'\n", "setting 'epochs': '99999"),
    ("s.json", b'{"seed": ' + b"9" * 4000 + b"}", "--seed must be at most 9223372036854775807, got an integer of 4000 digits"),
    ("s.yaml", b"model: '" + b"a" * 100_000 + b"'\n", "--model must be at most 4096 characters"),
    ("s.yaml", b"x" * 100 + b": 1\n", "unknown setting 'xxxxx"),
    ("s.yaml", b"# " + b"x" * (2 << 20) + b"\n", "too large for a file of settings"),
]


@pytest.mark.parametrize("name, content, fragment", BAD_CONFIG_FILES,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_CONFIG_FILES)])
def test_bad_config_files_are_one_line(name, content, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(content)
    assert main([*QUICK_ARGS, "--config", str(tmp_path / name)]) == 2
    line = one_line(capsys)
    assert fragment in line and len(line) < 700, line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# Property: any mapping of settings is a config or one short line

NAMES = [f.name for f in field_specs()]
MAX_MESSAGE = 700     # the longest: an unknown setting, listing every known one

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([2**63 - 1, 2**63, -2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=100), st.sampled_from(["", "x" * 10_000, "1e23", "nan", "-inf", "yes", "s5net", "sgd"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=4), max_leaves=10)
names = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES).map(lambda n: n.replace("_", "-")),
                  st.text(max_size=20))
mappings = st.dictionaries(names, values, max_size=6)


def check_settings(mapping: dict) -> None:
    try:
        validate(from_mapping(mapping))
    except TrainkitError as exc:
        message = str(exc)
        assert "\n" not in message and 0 < len(message) <= MAX_MESSAGE, message


@settings(max_examples=250, deadline=None)
@given(mappings)
def test_any_mapping_of_settings_is_a_config_or_one_short_line(mapping):
    check_settings(mapping)


@settings(max_examples=150, deadline=None)
@given(mappings, st.sampled_from(["yaml", "json"]))
def test_any_config_file_is_a_config_or_one_short_line(mapping, fmt):
    text = yaml.safe_dump(mapping) if fmt == "yaml" else json.dumps(mapping)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"settings.{fmt}"
        path.write_text(text)
        try:
            check_settings(load_config_file(path))
        except TrainkitError as exc:
            assert "\n" not in str(exc) and len(str(exc)) <= MAX_MESSAGE + len(str(path)), str(exc)


# For the CLI: settings that run in seconds on 64 images (no compile, few workers), each with
# good and bad values, so that some examples train and some fail.
CLI_VALUES = {
    "model": st.sampled_from(["s5net", "compact", "speednet", "nonet", "x" * 5000]),
    "optimizer": st.sampled_from(["sgd", "adamw", "rmsprop"]),
    "lr": st.sampled_from([0.01, 0.1, 0.0, -1.0, float("inf"), 1e300, "fast"]),
    "momentum": st.sampled_from([0.0, 0.9, -0.1, float("nan")]),
    "scheduler": st.sampled_from(["step", "onecycle", "constant", "cosine"]),
    "pct_start": st.sampled_from([0.1, 0.3, 1.0, 2]),
    "label_smoothing": st.sampled_from([0.0, 0.1, 0.99, 1, 2]),
    "seed": st.sampled_from([0, 1, 2**63 - 1, 2**63, -1, 1e23, "one"]),
    "augment": st.sampled_from(["seed", "none", "mixup"]),
    "precision": st.sampled_from(["fp32", "bf16", "auto", "fp8"]),
    "evals_per_epoch": st.sampled_from([1, 2, 10**30, 0]),
    "target_acc": st.sampled_from([None, 10.0, 100.0, 101.0]),
    "test_batch_size": st.sampled_from([1, 32, 10**6, 0]),
    "gamma": st.sampled_from([0.1, 1e300, -1]),
    "val_split": st.sampled_from([None, 0.2, 1.5, 16, 64.0]),
}
cli_mappings = st.dictionaries(st.sampled_from(sorted(CLI_VALUES)), st.just(None), min_size=1, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: CLI_VALUES[k] for k in keys}))


@pytest.mark.slow
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cli_mappings, st.sampled_from(["yaml", "json"]))
def test_generated_config_files_through_the_cli(mapping, fmt):
    text = yaml.safe_dump(mapping) if fmt == "yaml" else json.dumps(mapping)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"settings.{fmt}"
        path.write_text(text)
        proc = run_cli("train", "--config", path, "--limit-train", "64", "--limit-test", "64", "--epochs", "1",
                       "--batch-size", "64", "--out", Path(folder) / "run", "--no-progress", timeout=300)
        if proc.returncode != 0:  # 2 for a bad setting, 3 when a setting makes the loss nan
            assert_one_line_error(proc, code=proc.returncode if proc.returncode in (2, 3) else 2)


# ---------------------------------------------------------------------------------------------
# eval / predict / export: outputs written whole or not at all, damaged runs are one line

def run_main(capsys, *argv) -> tuple[int, str]:
    """`trainkit ARGV` in this process: the exit code and stderr (checked to be one line if not 0)."""
    code = main([str(a) for a in argv])
    return code, (one_line(capsys) if code else capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["last.pt", "best.pt", "model.pt", "config.json", "metrics.csv"])
def test_export_never_overwrites_the_run(run_copy, capsys, name):
    before = snapshot(run_copy)
    code, line = run_main(capsys, "export", run_copy, "--format", "torchscript", "--output", run_copy / name)
    assert code == 2 and f"{run_copy / name} is part of the run; it is not overwritten" in line
    assert snapshot(run_copy) == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_never_overwrites_a_checkpoint_elsewhere(run_copy, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    shutil.copy(run_copy / "last.pt", keep / "mine.pt")
    torch.save(ckpt.load_weights(run_copy / "model.pt"), keep / "old-weights.pt")   # no checksum: by content
    for name in ("mine.pt", "old-weights.pt"):
        before = (keep / name).read_bytes()
        code, line = run_main(capsys, "export", run_copy, "--format", "onnx", "--output", keep / name)
        assert code == 2 and "is a trainkit checkpoint or weights file; it is not overwritten" in line
        assert (keep / name).read_bytes() == before
    # a TorchScript file named .pt is not trainkit's: exporting again replaces it
    for _ in range(2):
        assert run_main(capsys, "export", run_copy, "--format", "torchscript", "--output", keep / "ts.pt")[0] == 0
    assert torch.jit.load(keep / "ts.pt")(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert sorted(p.name for p in keep.iterdir()) == ["mine.pt", "old-weights.pt", "ts.pt"]


@pytest.mark.slow
def test_exports_and_checkpoints_get_the_usual_permissions(finished_run, tmp_path, capsys):
    umask = os.umask(0o22)
    os.umask(umask)
    assert run_main(capsys, "export", finished_run, "--format", "safetensors", "--output", tmp_path / "w.safetensors")[0] == 0
    for path in (tmp_path / "w.safetensors", finished_run / "last.pt", finished_run / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path   # as open() makes them, not mkstemp's 0600


@pytest.mark.slow
@pytest.mark.parametrize("where, fragment", [("missing", "the folder {} does not exist"), ("folder", "is a folder")])
def test_export_to_a_missing_folder_or_a_folder(run_copy, tmp_path, capsys, where, fragment):
    output = tmp_path / "no" / "such" / "m.onnx" if where == "missing" else tmp_path
    code, line = run_main(capsys, "export", run_copy, "--format", "onnx", "--output", output)
    assert code == 2 and fragment.format(output.parent) in line


@pytest.mark.slow
@pytest.mark.parametrize("fmt, mount, error", [
    ("onnx", "size=64k", "the disk is full; nothing was written"),
    ("torchscript", "size=64k", "the disk is full; nothing was written"),
    ("onnx", "ro", "is on a read-only file system"),      # found before the model is loaded
])
def test_export_to_a_full_or_read_only_disk_leaves_nothing(finished_run, tmp_path, fmt, mount, error):
    """A real tmpfs of 64 KiB (the model is 2.4 MB) or a read-only one, in a mount namespace."""
    target = tmp_path / "disk"
    target.mkdir()
    script = (f'mount -t tmpfs -o {mount} tmpfs "$1" || exit 99; shift; "$@"; code=$?; '
              f'echo; echo "exit=$code"; ls -A "{target}"')
    cmd = [*mount_namespace(), "sh", "-c", script, "sh", str(target), sys.executable, "-m", "trainkit", "export",
           str(finished_run), "--format", fmt, "--output", str(target / "model.out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert "exit=" in proc.stdout, proc.stdout + proc.stderr
    exit_code, _, listing = proc.stdout.split("exit=", 1)[1].partition("\n")
    assert exit_code == "2", proc.stdout + proc.stderr
    assert_one_line_error(subprocess.CompletedProcess(cmd, 2, "", proc.stderr),
                          f"cannot write --output {target / 'model.out'}", error)
    assert listing.strip() == ""                               # no partial file, no temporary


@pytest.mark.slow
@pytest.mark.parametrize("top", ["-1", "0"])
def test_predict_top_must_be_positive(finished_run, digit_png, capsys, top):
    code, line = run_main(capsys, "predict", finished_run, digit_png, "--top", top)
    assert code == 2 and f"--top must be at least 1, got {top}" in line


BROKEN_CONFIG_JSON = [
    (b"{not json", "could not be parsed"),
    (b"", "is empty"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b'{"config": {"epochs": 1}}', 'is damaged: its "data" section'),
    (b'{"config": {"epochs": 1}, "data": {"classes": ["0", "1"], "image_shape": "abc", "mean": [0.1], "std": [0.3]}}',
     'is damaged: its "data" section'),
    (b'{"config": {"epochs": 1}, "data": {"classes": [], "image_shape": [1, 28, 28], "mean": [0.1], "std": [0.3]}}',
     'is damaged: its "data" section'),
    (b'{"config": {"epochs": 1}, "data": {"classes": ["0"], "image_shape": [1, 28, 28], "mean": [0.1], "std": [0]}}',
     'is damaged: its "data" section'),
    (b'{"config": {"model": ["s5net"]}, "data": {}}', "setting 'model' must be a string, got a list"),
    (b'{"config": 7}', '"config" must hold a mapping of settings'),
]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
@pytest.mark.parametrize("content, fragment", BROKEN_CONFIG_JSON, ids=[f"case{i}" for i in range(len(BROKEN_CONFIG_JSON))])
def test_a_broken_config_json_is_one_line(run_copy, digit_png, capsys, command, content, fragment):
    (run_copy / "config.json").write_bytes(content)
    extra = {"eval": [], "predict": [digit_png], "export": ["--format", "safetensors"]}[command]
    code, line = run_main(capsys, command, run_copy, *extra)
    assert code == 2 and fragment in line and "config.json" in line, line
    assert not (run_copy / "model.safetensors").exists()


@pytest.mark.slow
def test_a_checkpoint_without_model_weights_is_one_line(run_copy, digit_png, capsys):
    (run_copy / "model.pt").unlink()                    # so that predict falls back to last.pt
    state = ckpt.load_checkpoint(run_copy / "last.pt")
    del state["model"]
    ckpt.atomic_torch_save(state, run_copy / "last.pt")
    code, line = run_main(capsys, "predict", run_copy, digit_png)
    assert code == 2 and "last.pt is an incomplete trainkit checkpoint (no model)" in line
    state["model"] = [1, 2, 3]
    ckpt.atomic_torch_save(state, run_copy / "last.pt")
    code, line = run_main(capsys, "predict", run_copy, digit_png)
    assert code == 2 and "last.pt does not hold model weights" in line
    ckpt.atomic_torch_save([torch.zeros(3)], run_copy / "model.pt")
    code, line = run_main(capsys, "predict", run_copy, digit_png)
    assert code == 2 and "model.pt does not hold model weights" in line


# ---------------------------------------------------------------------------------------------
# Reliability III: the last tracebacks (tune's search space, storage and --out, compare of a
# damaged run, a model with nothing to train, --out names too long), each one line

TUNE_QUICK = ["--limit-train", "64", "--limit-test", "64", "--epochs", "1", "--batch-size", "32", "--trials", "1"]


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("space, fragment", [
    ("lr: {low: 0.01, high: 0.1, log: true, step: 0.01}", "cannot have both log: true and a step"),
    ("lr: {low: 0.01, high: 0.1, step: abc}", "lr's step must be a number, got 'abc'"),
    ("batch_size: {low: 32, high: 64, step: 0}", "batch_size's step must be greater than 0"),   # was silently 1
    ("lr: {low: 0.01, high: 0.1, step: 0}", "lr's step must be greater than 0"),
    ("lr: {low: 0.01, high: 0.1, step: -0.01}", "lr's step must be greater than 0"),
    ("lr: {low: 0.01, high: 0.1, step: 5}", "at most high - low"),
    ("batch_size: {low: 32, high: 100, step: 32}", "is not a whole number of steps of 32; make high 96"),
    ("batch_size: {low: 32, high: 64, step: 2.5}", "batch_size's step must be an integer"),
    ("lr: {low: 0.01, high: 0.1, step: .nan}", "lr's step must be greater than 0"),
    ("lr: {low: 0.01, high: 0.1, log: yes please}", "lr's log must be true or false"),
    ("momentum: {low: 0, high: 0.9, log: true}", "with log: true needs low > 0"),
])
def test_tune_search_space_errors_are_one_line(tmp_path, capsys, space, fragment):
    pytest.importorskip("optuna")
    code = main(["tune", str(space_file(tmp_path, space)), "--out", str(tmp_path / "out"), *TUNE_QUICK])
    assert code == 2 and fragment in one_line(capsys)
    assert not (tmp_path / "out").exists()                       # refused before anything was made


@pytest.mark.parametrize("storage, fragment", [
    ("notaurl", "is not a database URL"),
    ("sqlite:///:memory:", "is an in-memory database"),
    ("sqlite://", "is an in-memory database"),
    ("redis://localhost:6379", "Can't load plugin: sqlalchemy.dialects:redis"),
    ("sqlite:///{tmp}/text.db", "file is not a database"),
    ("sqlite:///{tmp}/no/such/folder/s.db", "unable to open database file"),
])
def test_tune_storage_errors_are_one_line(tmp_path, capsys, storage, fragment):
    pytest.importorskip("optuna")
    (tmp_path / "text.db").write_text("plain text, not SQLite " * 10)
    code = main(["tune", str(space_file(tmp_path, "lr: [0.05]")), "--out", str(tmp_path / "out"),
                 "--storage", storage.format(tmp=tmp_path), *TUNE_QUICK])
    assert code == 2 and fragment in one_line(capsys)
    assert (tmp_path / "text.db").read_text().startswith("plain text")


def test_ctrl_c_during_a_storage_write_is_an_interruption_not_a_storage_error():
    # SQLAlchemy and Optuna wrap what stopped a statement; seen once in a loaded run as
    # "the study's storage ... cannot be used: KeyboardInterrupt" and exit 2 instead of 130.
    optuna = pytest.importorskip("optuna")
    from sqlalchemy.exc import OperationalError
    from trainkit.commands.tune import storage_errors

    def wrapped(orig_is_interrupt: bool):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as stop:
                raise OperationalError("INSERT ...", {}, stop if orig_is_interrupt else Exception("x"))
        except OperationalError as error:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error

    for orig_is_interrupt in (True, False):     # behind `orig`, or only behind `__context__`
        with pytest.raises(KeyboardInterrupt):
            with storage_errors("sqlite:///study.db"):
                wrapped(orig_is_interrupt)
    with pytest.raises(TrainkitError, match="cannot be used: database is locked"):     # a real storage error stays one
        with storage_errors("sqlite:///study.db"):
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))


@pytest.mark.parametrize("out, fragment", [
    ("afile", "is a file, not a folder"),
    ("a" * 300, "is 300 bytes long, at most 255"),
    ("/".join(["b" * 200] * 25), "the path is"),
])
@pytest.mark.parametrize("command", ["tune", "train"])
def test_out_that_is_a_file_or_too_long_is_one_line(tmp_path, capsys, monkeypatch, out, fragment, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    args = ["tune", str(space_file(tmp_path, "lr: [0.05]"))] if command == "tune" else ["train"]
    code = main([*args, "--out", out, *TUNE_QUICK[:-2]])
    line = one_line(capsys)
    assert code == 2 and fragment in line and len(line) < 400, line
    assert (tmp_path / "afile").read_text() == "x"


def test_tune_out_where_no_folder_can_be_made_is_one_line(tmp_path, capsys):
    pytest.importorskip("optuna")
    code = main(["tune", str(space_file(tmp_path, "lr: [0.05]")), "--out", "/proc/trainkit-out", *TUNE_QUICK])
    assert code == 2 and "folders cannot be created in /proc" in one_line(capsys)


def test_tune_into_an_out_whose_study_was_deleted(tmp_path, capsys):
    """The trial folders of an earlier study are there, its study.db is gone: a new study would number
    its trials from 0 again and meet trial-000 (Optuna's warning then carried a whole traceback)."""
    pytest.importorskip("optuna")
    (tmp_path / "out" / "trial-000").mkdir(parents=True)
    code = main(["tune", str(space_file(tmp_path, "lr: [0.05]")), "--out", str(tmp_path / "out"), *TUNE_QUICK])
    assert code == 2 and "trial-000 already exists, but study 'space'" in one_line(capsys)


def test_a_trial_that_fails_is_one_line_without_optunas_traceback(tmp_path):
    pytest.importorskip("optuna")
    space = space_file(tmp_path, "lr: [0.05]\nmodel: no-such-model\n")
    proc = run_cli("tune", space, "--out", tmp_path / "out", *TUNE_QUICK, timeout=300)
    assert_one_line_error(proc, "trial 0 (", "unknown model 'no-such-model'")


def mount_tmpfs_and_run(target: Path, options: str, *argv, bind: bool = False) -> subprocess.CompletedProcess:
    """`trainkit ARGV` with a real tmpfs (or, with `bind`, the folder itself read-only) on `target`,
    in a mount namespace of its own."""
    mount = (f'mount --bind "$1" "$1" && mount -o remount,bind,{options} "$1"' if bind
             else f'mount -t tmpfs -o {options} tmpfs "$1"')
    script = f'{mount} || exit 99; shift; exec "$@"'
    cmd = [*mount_namespace(), "sh", "-c", script, "sh", str(target), sys.executable, "-m", "trainkit", *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**os.environ, "TRAINKIT_DATA_DIR": str(data_dir())})
    assert proc.returncode != 99, proc.stderr
    return proc


@pytest.mark.slow
def test_tune_with_a_read_only_study_database_or_out(tmp_path):
    pytest.importorskip("optuna")
    space = space_file(tmp_path, "lr: [0.05]")
    (tmp_path / "db").mkdir()
    sqlite3 = __import__("sqlite3")
    sqlite3.connect(tmp_path / "db" / "study.db").execute("create table t (x)").connection.commit()
    proc = mount_tmpfs_and_run(tmp_path / "db", "ro", "tune", space, "--out", tmp_path / "out",
                               "--storage", f"sqlite:///{tmp_path / 'db' / 'study.db'}", *TUNE_QUICK, bind=True)
    assert_one_line_error(proc, "cannot be used: attempt to write a readonly database")
    (tmp_path / "ro").mkdir()
    proc = mount_tmpfs_and_run(tmp_path / "ro", "ro", "tune", space, "--out", tmp_path / "ro" / "out", *TUNE_QUICK)
    assert_one_line_error(proc, "is on a read-only file system")


def write_run(folder: Path, config: str, metrics: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "metrics.csv").write_text(metrics)
    return folder


GOOD_METRICS = "epoch,lr,train_loss,train_acc,test_loss,test_acc,seconds\n1,0.01,0.5,80,0.4,85,1.5\n"


@pytest.mark.parametrize("config, metrics, fragment", [
    ('{"config": {"lr": 0.01}}', "epoch,lr,train_loss,train_acc,test_loss,seconds\n1,0.01,0.5,80,0.4,1.5\n",
     "row 1 has no test_acc"),
    ('{"config": {"lr": 0.01}}', "epoch,lr,test_loss,test_acc\n1,0.01,0.4,85\n", "row 1 has no seconds"),
    ('{"config": {"lr": 0.01}}', GOOD_METRICS + "2,0.01,0.5,80\n", "row 2 has no seconds, test_acc, test_loss"),
    ('{"config": {"lr": 0.01}}', GOOD_METRICS + "2,0.01,0.5,80,0.4,abc,1\n", "could not convert string"),
    ('{"config": {"lr": 0.01}}', GOOD_METRICS + "2,0.01,0.5,80,0.4,85,1,extra\n", "row 2 has more values than the header"),
    ('{"config": [1, 2]}', GOOD_METRICS, "must hold a mapping of settings"),
    ('{"config": "lr"}', GOOD_METRICS, "must hold a mapping of settings"),
    ('[1, 2]', GOOD_METRICS, "must hold a mapping of settings"),
    ('{"config": {"lr": 0.01}', GOOD_METRICS, "could not be parsed"),
    ('', GOOD_METRICS, "is empty"),
])
def test_compare_of_a_damaged_run_is_one_line(tmp_path, capsys, config, metrics, fragment):
    good = write_run(tmp_path / "good", '{"config": {"lr": 0.02}}', GOOD_METRICS)
    bad = write_run(tmp_path / "bad", config, metrics)
    code = main(["compare", str(good), str(bad), "--png", str(tmp_path / "c.png")])
    assert code == 2 and fragment in one_line(capsys)
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_a_model_with_no_trainable_parameters_is_one_line(tmp_path):
    factory = tmp_path / "fixed.py"
    factory.write_text("import torch.nn as nn\n\nclass Fixed(nn.Module):\n    def forward(self, x):\n"
                       "        return x.flatten(1)[:, :10].log_softmax(1)\n\n\ndef factory(**kwargs):\n"
                       "    return Fixed()\n")
    for extra in ([], ["--optimizer", "adamw", "--precision", "fp32", "--channels-last", "off"]):
        proc = run_cli("train", "--model", f"{factory}:factory", "--out", tmp_path / "run", *TUNE_QUICK[:-2], *extra)
        assert_one_line_error(proc, "the model has no trainable parameters")
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Reliability III: nothing silently accepted, nothing that waits on a network that is not there

@pytest.mark.parametrize("value", ["1.5", "2.25", "100.5"])
def test_a_val_split_that_is_neither_a_fraction_nor_a_count_is_refused(capsys, value):
    """--val-split 1.5 was taken as a count of 1 image."""
    code = main(["train", "--val-split", value, "--epochs", "1"])
    assert code == 2 and f"--val-split must be a fraction between 0 and 1 (0.1) or a whole number of images (5000), got {float(value)}" in one_line(capsys)


def test_whole_counts_and_fractions_are_still_val_splits():
    for value in (0.1, 0.5, 1.0, 5000.0, 5000):
        assert validate(TrainConfig(val_split=value)).val_split == value


def no_network() -> list[str]:
    """`unshare` with a network namespace of its own: no interface but a loopback that is down."""
    cmd = ["unshare", "--map-root-user", "--net"]
    if not shutil.which("unshare") or subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and network namespaces")
    return cmd


@pytest.mark.slow
@pytest.mark.parametrize("model, fragment", [
    ("timm:resnet18", "timm:resnet18 could not be built with pretrained weights"),
    ("torchvision:resnet18", "needs its weights from download.pytorch.org, which cannot be reached"),
])
def test_pretrained_weights_offline_fail_in_seconds(tmp_path, model, fragment):
    """Without a network, timm's weights were retried for 51 s in 22 lines of Hugging Face output."""
    pytest.importorskip(model.partition(":")[0])
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), TRAINKIT_DATA_DIR=str(data_dir()))
    start = time.monotonic()
    proc = subprocess.run([*no_network(), sys.executable, "-m", "trainkit", "train", "--model", model, "--pretrained",
                           "--limit-train", "64", "--limit-test", "64", "--epochs", "1", "--out", tmp_path / "run"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[1])
    assert_one_line_error(proc, fragment)
    assert time.monotonic() - start < 40                        # imports included; the retries took 51 s
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mlflow_on_a_read_only_database_is_one_warning_at_once(tmp_path):
    """MLflow retried a database it could not write for about 100 s in 36 lines."""
    pytest.importorskip("mlflow")
    (tmp_path / "ro").mkdir()
    sqlite3 = __import__("sqlite3")
    sqlite3.connect(tmp_path / "ro" / "mlflow.db").execute("create table t (x)").connection.commit()
    start = time.monotonic()
    proc = mount_tmpfs_and_run(tmp_path / "ro", "ro", "train", "--mlflow", f"sqlite:///{tmp_path / 'ro' / 'mlflow.db'}",
                               "--out", tmp_path / "run", "--limit-train", "64", "--limit-test", "64", "--epochs", "1",
                               "--no-progress", bind=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainkit: warning: MLflow logging failed"), proc.stderr
    assert "cannot write the SQLite database" in lines[0] and "read-only file system" in lines[0]
    assert time.monotonic() - start < 90 and (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.parametrize("content, fragment", [(b"plain text, not a database" * 4, "is not an SQLite database"),
                                               (None, "is not a regular file")])
def test_mlflow_database_that_is_not_one_is_found_at_once(tmp_path, content, fragment):
    from trainkit.run.tracking import sqlite_problem

    path = tmp_path / "mlflow.db"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    assert fragment in sqlite_problem(f"sqlite:///{path}")
    assert sqlite_problem(f"sqlite:///{tmp_path / 'new.db'}") is None
    assert sqlite_problem("http://localhost:5000") is None


# ---------------------------------------------------------------------------------------------
# Reliability III: only regular files are opened (a named pipe blocked `open` for ever)

def special_files(tmp_path: Path) -> dict[str, Path]:
    """A real named pipe, a folder, a character device and a Unix socket."""
    import socket as sockets
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    sock_path = tmp_path / "sock.png"
    server = sockets.socket(sockets.AF_UNIX)
    server.bind(str(sock_path))
    return {"a named pipe": fifo, "a folder": folder, "a character device": Path("/dev/zero"),
            "a socket": sock_path}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["a named pipe", "a character device", "a socket"])    # a folder is walked
def test_predict_on_a_pipe_a_device_or_a_socket_is_one_line(finished_run, digit_png, tmp_path, kind):
    path = special_files(tmp_path)[kind]
    proc = run_cli("predict", finished_run, digit_png, path, timeout=120)     # a hang fails here
    assert_one_line_error(proc, f"image {path} is {kind}, not a file; it is not opened")


@pytest.mark.parametrize("kind", ["a named pipe", "a folder", "a character device", "a socket"])
def test_a_config_file_that_is_a_pipe_a_device_or_a_folder_is_one_line(tmp_path, kind):
    path = special_files(tmp_path)[kind]
    with pytest.raises(TrainkitError, match=f"config file {path} is {kind}, not a file"):
        load_config_file(path)


@pytest.mark.slow
def test_config_and_tune_space_fifos_do_not_block(tmp_path):
    fifo = special_files(tmp_path)["a named pipe"]
    for argv in (["train", "--config", fifo], ["tune", fifo], ["lr-find", "--config", fifo]):
        proc = run_cli(*argv, timeout=120)
        assert_one_line_error(proc, f"config file {fifo} is a named pipe")


# ---------------------------------------------------------------------------------------------
# Properties (Reliability III): any output name, any search-space range

output_parts = st.one_of(st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t and "\0" not in t),
                         st.sampled_from(["plot.png", "last.pt", "config.json", "link.png", "fifo.png", "x" * 300,
                                          "..", ".", "run", "afile", "sub.svg", "a.PDF", "b.jpeg", "c.pt"]))
output_paths = st.lists(output_parts, min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output_paths)
def test_any_output_name_is_written_whole_or_one_short_line(tmp_path, name):
    """Names in a folder holding a run, a link to its checkpoint, a named pipe and a file: check_output
    accepts a name or says why in one line, and the run's files never change."""
    from trainkit.outputs import check_output, write_output

    root = tmp_path / "case"
    if not root.exists():
        (root / "run").mkdir(parents=True)
        for file in ("config.json", "plot.png"):
            (root / "run" / file).write_text(file)
        ckpt.atomic_torch_save({"w": torch.zeros(2)}, root / "run" / "last.pt")
        (root / "run" / "link.png").symlink_to(root / "run" / "last.pt")
        (root / "link.png").symlink_to(root / "run" / "last.pt")
        os.mkfifo(root / "fifo.png")
        (root / "afile").write_text("a file")
        (root / "sub.svg").mkdir()
    before = snapshot(root / "run")
    try:
        path = check_output(root / name, "--png", picture=True)
    except TrainkitError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
    else:
        write_output(path, b"picture bytes", "--png")
        assert path.read_bytes() == b"picture bytes" and not path.is_symlink()
        path.unlink()
    assert snapshot(root / "run") == before and (root / "run" / "link.png").is_symlink()
    assert (root / "afile").read_text() == "a file"


range_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 600), st.floats(allow_nan=True),
                         st.sampled_from(["abc", "", "1e-3", [1, 2], {"a": 1}]))
range_specs = st.fixed_dictionaries({"low": range_values, "high": range_values},
                                    optional={"log": range_values, "step": range_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["lr", "batch_size", "momentum", "epochs", "pct_start"]), range_specs)
@example("lr", {"low": float("-inf"), "high": False, "step": 1})    # found: an infinite range's step count
@example("lr", {"low": 1, "high": 2, "step": 2e-259})                # found: a grid past Optuna's decimal check
@example("lr", {"low": 1, "high": 999999942.0, "step": 3})           # found: not whole, within a float's tolerance
def test_any_search_space_range_samples_or_is_one_short_line(tmp_path, name, spec):
    """A range accepted by load_space is sampled by Optuna without an error (an error there was a
    traceback in the first trial); anything else is one line."""
    optuna = pytest.importorskip("optuna")
    from trainkit.commands.tune import load_space, suggest

    path = tmp_path / "space.json"
    path.write_text(json.dumps({name: spec}))
    try:
        space = load_space(path, TrainConfig())
    except TrainkitError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < MAX_MESSAGE + len(str(path)), str(exc)
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # Optuna's "high is not a multiple of step" would change the range
        values = suggest(optuna.create_study().ask(), space)
    kind, low, high = space[name][1], space[name][2], space[name][3]
    assert low <= values[name] <= high and isinstance(values[name], int if kind == "int" else float)


# ---------------------------------------------------------------------------------------------
# Reliability IV: data.json, the image cache, own CIFAR/IDX files checked, never trusted

def write_strokes(root: Path, per_class: int = 12) -> Path:
    """A flat folder of two classes, horizontal and vertical strokes (28 x 28 PNGs)."""
    from PIL import Image, ImageDraw
    for label in ("horiz", "vert"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("L", (28, 28), 0)
            at = 4 + i * 20 // per_class
            ImageDraw.Draw(image).line((4, at, 24, at) if label == "horiz" else (at, 4, at, 24), fill=255, width=3)
            image.save(root / label / f"{i:03d}.png")
    return root


def train_strokes(tmp_path_factory, name: str, **settings) -> Path:
    """A run trained (1 epoch, in this process) on a flat folder that trainkit splits from --seed 7."""
    from trainkit import train
    base = tmp_path_factory.mktemp(name)
    root = write_strokes(base / "pics")
    train(TrainConfig(dataset=f"imagefolder:{root}", model="speednet", epochs=1, batch_size=8, seed=7,
                      progress=False, precision="fp32", channels_last="off", device="cpu", **settings), out=base / "run")
    return base / "run"


@pytest.fixture(scope="module")
def strokes_run(tmp_path_factory):
    return train_strokes(tmp_path_factory, "strokes")


@pytest.fixture
def strokes_copy(strokes_run, tmp_path):
    return Path(shutil.copytree(strokes_run, tmp_path / "run"))


def fifo_in_place(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("loss", ["deleted", "folder", "fifo"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_lost_data_json_is_refused_never_split_again(strokes_copy, loss, command):
    path = strokes_copy / "data.json"
    if loss == "deleted":
        path.unlink()
    elif loss == "folder":
        path.unlink()
        path.mkdir()
    else:
        fifo_in_place(path)
    args = ("eval", strokes_copy) if command == "eval" else \
        ("train", "--resume", strokes_copy, "--epochs", "2", "--no-progress")
    fragment = "lost its data.json" if loss == "deleted" else "data record"
    before = (strokes_copy / "last.pt").read_bytes()
    assert_one_line_error(run_cli(*args, timeout=60), fragment)
    assert (strokes_copy / "last.pt").read_bytes() == before        # nothing trained on other images


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=8)
manifest_parts = st.fixed_dictionaries({}, optional={"dataset": json_values, "files": json_values,
                                                     "splits": json_values, "classes": json_values})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=manifest_parts | json_values)
@example(content={"files": 5, "splits": {}})
@example(content={"files": {}, "splits": []})
@example(content={"files": {}, "splits": "test"})
@example(content={"files": {"a": ["x", 1]}, "splits": {"test": {"count": "3"}}})
def test_a_damaged_data_json_is_one_line(tmp_path, content):
    from trainkit.data.manifest import check_same_data
    (tmp_path / "data.json").write_text(json.dumps(content))
    current = {"dataset": "x", "files": {}, "splits": {"test": {"count": 1, "fingerprint": "f"}}}
    try:
        check_same_data(tmp_path, current, ("train", "val", "test"), "eval")
    except TrainkitError as exc:
        assert "\n" not in str(exc)


def test_deeply_nested_data_json_is_one_line(strokes_copy):
    (strokes_copy / "data.json").write_text("[" * 200_000 + "]" * 200_000)
    assert_one_line_error(run_cli("eval", strokes_copy), "not a trainkit data manifest")


@pytest.fixture(scope="module")
def strokes_stream_run(tmp_path_factory):
    """A run on the flat folder through --pipeline stream: its image cache built (in the tests' cache folder)."""
    return train_strokes(tmp_path_factory, "strokes-stream", pipeline="stream")


def image_caches() -> list[Path]:
    return sorted((Path(os.environ["TRAINKIT_CACHE_DIR"]) / "images").glob("pics-*.tkcache"))


def damage_pixels(path: Path, how: str) -> None:
    from trainkit.data.cache import read_header
    header = read_header(path)
    size = 1
    for n in header["shape"]:
        size *= n
    with open(path, "r+b") as f:
        if how == "zeroed":
            f.seek(header["data_offset"])
            f.write(bytes(size))
        else:                                           # bits flipped all over the pixels
            for i in range(0, size, max(1, size // 3000)):
                f.seek(header["data_offset"] + i)
                byte = f.read(1)
                f.seek(header["data_offset"] + i)
                f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["zeroed", "flipped"])
def test_a_damaged_image_cache_is_built_again_not_scored(strokes_stream_run, how):
    first = cli_ok("eval", strokes_stream_run).stdout.splitlines()[-1]
    [path] = image_caches()
    damage_pixels(path, how)
    again = cli_ok("eval", strokes_stream_run)
    assert "decoding" in again.stdout and "made from these files before" not in again.stdout
    assert again.stdout.splitlines()[-1] == first                       # the same score as before the damage


def test_the_caches_undecodable_files_are_the_files_not_the_headers(tmp_path):
    from trainkit.data.cache import _header, build_cache, open_cache, read_header
    from PIL import Image
    pngs = []
    for i in range(4):
        pngs.append(tmp_path / f"{i}.png")
        Image.new("L", (8, 8), 60 * i).save(pngs[-1])
    path = build_cache(pngs, 1, (8, 8), "fit", "fp", tmp_path / "c", workers=1, unreadable=[])
    assert open_cache(path, "fp", (4, 1, 8, 8), paths=pngs).unreadable == []
    meta = read_header(path)
    forged = _header("fp", (4, 1, 8, 8), "fit", [(1, "is not a readable image"), (2, "is not a readable image")])
    assert len(forged) == meta["data_offset"]
    with open(path, "r+b") as f:
        f.write(forged)
    assert len(read_header(path)["unreadable"]) == 2
    assert open_cache(path, "fp", (4, 1, 8, 8), paths=pngs) is None          # 1.png and 2.png decode: stale


def header_with(**changes) -> dict:
    from trainkit.data.cache import DECODER_VERSION, FORMAT
    return {"format": FORMAT, "decoder": DECODER_VERSION, "fingerprint": "fp", "shape": [4, 1, 8, 8],
            "dtype": "uint8", "resize": "fit", "data_offset": 4096, **changes}


header_values = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=4) | \
    st.lists(st.integers(-10, 2**31) | st.text(max_size=3), max_size=4) | \
    st.lists(st.lists(st.integers(-10, 10**9) | st.text(max_size=3), max_size=3), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["format", "decoder", "fingerprint", "shape", "dtype", "resize",
                                                "data_offset", "unreadable"]), header_values, max_size=3))
@example(changes={"unreadable": 5})
@example(changes={"unreadable": [["abc", "x"]]})
@example(changes={"unreadable": [[1000000000, "x"]]})
def test_a_damaged_cache_header_is_a_stale_cache(tmp_path, changes):
    from trainkit.data.cache import MAGIC, build_cache, open_cache
    from PIL import Image
    pngs = []
    for i in range(4):
        pngs.append(tmp_path / f"{i}.png")
        Image.new("L", (8, 8), 60 * i).save(pngs[-1])
    path = build_cache(pngs, 1, (8, 8), "fit", "fp", tmp_path / "c", workers=1, unreadable=[])
    line = (json.dumps(header_with(**changes)) + "\n").encode()
    with open(path, "r+b") as f:
        f.write(MAGIC + line[:4096 - len(MAGIC)])
    pixels = open_cache(path, "fp", (4, 1, 8, 8), paths=pngs)       # never a traceback
    if pixels is not None:
        assert pixels.read(range(4)).reshape(4, -1)[:, 0].tolist() == [0, 60, 120, 180]
    path.unlink()


def test_an_image_cache_replaced_by_a_fifo_is_no_hang(strokes_stream_run, tmp_path):
    import threading
    from trainkit.data.cache import open_cache, read_header
    [path] = image_caches()
    shape = read_header(path)["shape"]
    fifo = tmp_path / "images.tkcache"
    os.mkfifo(fifo)
    got = []
    opener = threading.Thread(target=lambda: got.append(open_cache(fifo, "fp", shape)), daemon=True)
    opener.start()
    opener.join(10)
    if opener.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))        # lets the blocked open() go on
    assert got == [None]


def test_a_cache_changed_after_it_was_opened_is_one_line(tmp_path):
    from trainkit.data.cache import build_cache, open_cache
    from PIL import Image
    pngs = []
    for i in range(4):
        pngs.append(tmp_path / f"{i}.png")
        Image.new("L", (8, 8), 60 * i).save(pngs[-1])
    path = build_cache(pngs, 1, (8, 8), "fit", "fp", tmp_path / "c", workers=1)
    pixels = open_cache(path, "fp", (4, 1, 8, 8))
    damage_pixels(path, "zeroed")
    assert pixels.read([0]).sum() == 0                      # row 0 was zeros: still its checksum
    with pytest.raises(TrainkitError, match="changed while it was read") as caught:
        pixels.read([2, 3])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["predict", "eval", "resume"])
@pytest.mark.parametrize("recorded", ["classes", "folder names"])
def test_class_names_edited_in_config_json_are_refused(strokes_copy, command, recorded):
    saved = json.loads((strokes_copy / "config.json").read_text())
    assert saved["data"]["classes"] == ["horiz", "vert"]
    saved["data"]["classes"].reverse()
    (strokes_copy / "config.json").write_text(json.dumps(saved))
    if recorded == "folder names":                       # a data.json written before it recorded the classes
        manifest = json.loads((strokes_copy / "data.json").read_text())
        del manifest["classes"]
        (strokes_copy / "data.json").write_text(json.dumps(manifest))
    image = next(Path(saved["config"]["dataset"].split(":", 1)[1]).glob("horiz/*.png"))
    args = {"predict": ("predict", strokes_copy, image), "eval": ("eval", strokes_copy),
            "resume": ("train", "--resume", strokes_copy, "--epochs", "2", "--no-progress")}[command]
    assert_one_line_error(run_cli(*args), "config.json was changed", "horiz, vert")


def test_a_stray_idx_label_is_refused_not_256_classes(tmp_path):
    import gzip as gz
    from trainkit.data import load_dataset
    from trainkit.data.formats import encode_idx, parse_idx
    from trainkit.data.idx import write_own_idx
    folder = write_own_idx(tmp_path / "idx", train=60, test=12)
    labels = parse_idx(gz.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())).copy()
    labels[17] = 255
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gz.compress(encode_idx(labels)))
    with pytest.raises(TrainkitError, match="labels run 0-255, but only 4 of those 256 classes") as caught:
        load_dataset(f"idx:{folder}", tmp_path, progress=False)
    assert "1 image(s) of 255" in str(caught.value) and "\n" not in str(caught.value)


def test_kaggles_idx_names_are_read(tmp_path):
    from trainkit.data import load_dataset
    from trainkit.data.idx import write_own_idx
    folder = write_own_idx(tmp_path / "idx", train=12, test=6)
    for path in list(folder.iterdir()):               # train-images-idx3-ubyte -> train-images.idx3-ubyte
        path.rename(folder / path.name.replace("-idx", ".idx"))
    assert (folder / "t10k-images.idx3-ubyte").is_file()
    data = load_dataset(f"idx:{folder}", tmp_path, progress=False)
    assert len(data.train_labels) == 12 and data.classes == ["0", "1", "2"]


idx_headers = st.tuples(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]), st.integers(0, 6),
                        st.lists(st.sampled_from([0, 1, 2, 3, 2**16, 2**31, 2**32 - 1]), min_size=0, max_size=6),
                        st.integers(0, 40))


@settings(max_examples=60, deadline=None)
@given(idx_headers)
@example((0x08, 3, [2**31, 2**31, 4], 0))
@example((0x0D, 1, [2], 8))
def test_any_idx_header_is_an_array_or_one_line(header):
    from trainkit.data.formats import parse_idx
    kind, ndim, dims, extra = header
    raw = bytes([0, 0, kind, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(extra)
    try:
        array = parse_idx(raw, "f")
    except TrainkitError as exc:
        assert "\n" not in str(exc)
        return
    assert array.dtype == np.uint8 and array.size == len(raw) - 4 - 4 * array.ndim


def cifar_pickle(data, labels, protocol: int = 2) -> bytes:
    import pickle
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=protocol)


def read_cifar_bytes(raw: bytes):
    from trainkit.data.formats import cifar_arrays, unpickle_cifar
    return cifar_arrays(unpickle_cifar(raw, "f", "a file in CIFAR's format", "hint"), "labels", None, "f", "hint")


cifar_labels = st.lists(st.integers(-2**80, 2**80) | st.sampled_from([0, 1, 9]), min_size=0, max_size=4)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(2, 3072), (2, 3, 32, 32), (2, 3000), (2,), (1, 2, 3072)]),
       st.sampled_from(["uint8", "int64", "float32"]), cifar_labels, st.sampled_from(["list", "array", "numpy ints"]),
       st.sampled_from([2, 4, 5]))
@example((2, 3072), "uint8", [2**70, 1], "list", 2)
def test_any_cifar_pickle_is_arrays_or_one_line(shape, dtype, labels, labels_as, protocol):
    if labels_as == "array":
        labels = np.array([v for v in labels if -2**63 <= v < 2**63], dtype=np.int64)
    elif labels_as == "numpy ints":
        labels = [np.int64(v) for v in labels if -2**63 <= v < 2**63]
    raw = cifar_pickle(np.zeros(shape, dtype), labels, protocol)
    try:
        images, got = read_cifar_bytes(raw)
    except TrainkitError as exc:
        assert "\n" not in str(exc)
        return
    assert images.shape == (2, 3, 32, 32) and got.dtype == torch.int64 and got.tolist() == [int(v) for v in labels]


class AsksForMemory:
    """Pickled as a call that allocates `shape` bytes when unpickled (the pickle itself is tiny)."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def test_a_small_pickle_declaring_a_huge_array_is_refused_before_allocating():
    import pickle
    from trainkit.data.formats import _RECONSTRUCT
    shape = (1_500_000, 3072)                               # 4.6 GB
    for asks in (AsksForMemory(_RECONSTRUCT, (np.ndarray, shape, b"B")), AsksForMemory(np.ndarray, (shape, "u1"))):
        raw = pickle.dumps({b"data": asks, b"labels": [0] * 3}, protocol=2)
        assert len(raw) < 200
        with pytest.raises(TrainkitError, match="UnpicklingError") as caught:
            read_cifar_bytes(raw)
        assert "\n" not in str(caught.value)


def test_cifar_files_as_torchvision_reads_them(tmp_path):
    import pickle
    from trainkit.data import load_dataset
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n, labels_as in (("data_batch_1", 6, "array"), ("test_batch", 3, "numpy ints")):
        labels = np.arange(n) % 3
        labels = labels if labels_as == "array" else [np.int64(v) for v in labels]
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)               # (N, 3, 32, 32)
        (folder / name).write_bytes(pickle.dumps({"data": images, "labels": labels}, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b", "c"]}))
    data = load_dataset(f"cifar10:{folder}", tmp_path, progress=False)
    assert data.train_labels.tolist() == [0, 1, 2, 0, 1, 2] and data.test_labels.tolist() == [0, 1, 2]
    assert data.image_shape == (3, 32, 32)


@pytest.mark.parametrize("args, fragment", [
    (("--final", "last"), "--final last chooses"),
    (("--mlflow", "sqlite:///{tmp}/m.db", "--mlflow-register", ""), "--mlflow-register needs a model name"),
    (("--val-split", "0.1"), "holds out 0 of the 2 training images; give a count of 1,"),
])
def test_settings_that_would_do_nothing_are_refused_before_training(tmp_path, args, fragment):
    from PIL import Image
    root = tmp_path / "two"
    for label in ("a", "b"):                       # 2 training images (a train/ and a test/ folder)
        for part in ("train", "test"):
            (root / part / label).mkdir(parents=True)
            Image.new("L", (8, 8), 200 if label == "a" else 20).save(root / part / label / "0.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_cli("train", "--dataset", f"imagefolder:{root}", "--model", "speednet", "--epochs", "1",
                   "--out", tmp_path / "run", "--no-progress", *args)
    line = assert_one_line_error(proc, fragment)
    assert "between 0 and 1 or a count below" not in line
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "m.db").exists()
