"""Checkpoints, exact resume after SIGKILL and SIGTERM, numerical faults, safe loading, bad input.

docs/reliability.md lists each fault with the test here that covers it.
"""
import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, cli_ok, data_dir, run_cli
from trainkit import checkpoint as ckpt
from trainkit import TrainConfig, train
from trainkit.errors import TrainkitError

# compact: dropout and batch norm, so the global RNG matters too; seed augmentation on. Callbacks
# that keep state (the weights' moving average, early stopping's counter) and one that changes every
# step (gradient clipping) are on, so a resume must restore them too: model.pt is the EMA's weights.
RUN = ["--model", "compact", "--limit-train", "4096", "--limit-test", "500", "--epochs", "3",
       "--batch-size", "64", "--lr", "0.05", "--ema", "0.99", "--patience", "5", "--clip-grad-norm", "5"]


def start_cli(*args, cwd=None):
    env = {**os.environ, "TRAINKIT_DATA_DIR": str(data_dir()), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainkit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd)


def signal_during_epoch(proc, epoch: int, signum: int) -> str:
    """Send `signum` once the progress bar of `epoch` has started; returns the output so far."""
    seen = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        tail = seen.split(f"Epoch {epoch}\n".encode(), 1)
        if len(tail) == 2 and b"Batch_id=" in tail[1]:
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=300)
    return (seen + rest).decode(errors="replace")


def metrics(run_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_run(a: Path, b: Path):
    assert metrics(a) == metrics(b)
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name          # bit for bit
    oa = torch.load(a / "last.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(b / "last.pt", weights_only=True)["optimizer"]["state"]
    for key in oa:
        assert torch.equal(oa[key]["momentum_buffer"], ob[key]["momentum_buffer"])
    ca = torch.load(a / "last.pt", weights_only=True)["callbacks"]
    cb = torch.load(b / "last.pt", weights_only=True)["callbacks"]
    assert ca.keys() == cb.keys() == {"EMA", "EarlyStopping"} and ca["EarlyStopping"] == cb["EarlyStopping"]
    assert all(torch.equal(ca["EMA"][k], cb["EMA"][k]) for k in ca["EMA"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    cli_ok("train", *RUN, "--out", out)
    return out


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_cli("train", *RUN, "--out", out)
    signal_during_epoch(proc, 2, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    saved = ckpt.load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"] is None    # killed in epoch 2: epoch 1's checkpoint
    resumed = cli_ok("train", "--resume", out)
    assert "Epoch 1\n" not in resumed.stdout                  # no finished epoch is recomputed
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_resume_is_bit_identical(uninterrupted, tmp_path, signum, code):
    out = tmp_path / "run"
    proc = start_cli("train", *RUN, "--out", out)
    text = signal_during_epoch(proc, 2, signum)
    assert proc.returncode == code, text[-2000:]
    assert f"trainkit train --resume {out}" in text and "Traceback" not in text
    saved = ckpt.load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"]["epoch"] == 2 and saved["partial"]["batches"] >= 1
    cli_ok("train", "--resume", out)
    assert_same_run(uninterrupted, out)


NAN_MODEL = '''
import torch, torch.nn as nn
from trainkit.models import CompactNet

class Poisoned(CompactNet):
    """Returns NaN from the 20th training step on (epoch 2 with 16 steps an epoch). The count is the
    model's own: --precision auto times steps on a copy, which counts its own; the memory estimate's
    forward of two images is not a step."""
    calls = 0
    def forward(self, x):
        out = super().forward(x)
        if self.training and len(x) > 2:
            self.calls += 1
            if self.calls >= 20:
                return out * float("nan")
        return out

def poisoned(in_channels=1, num_classes=10):
    return Poisoned(in_channels, num_classes)
'''


@pytest.mark.slow
def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path):
    (tmp_path / "poison.py").write_text(NAN_MODEL)
    out = tmp_path / "run"
    proc = run_cli("train", "--model", f"{tmp_path / 'poison.py'}:poisoned", "--limit-train", "1024",
                   "--limit-test", "200", "--batch-size", "64", "--epochs", "3", "--out", out, "--no-progress")
    line = assert_one_line_error(proc, "the training loss became nan in epoch 2, batch 3",
                                 f"{out / 'last.pt'} (end of epoch 1)", code=3)
    saved = ckpt.load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert "--resume" in line


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


@pytest.mark.slow
def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    _Exploit.marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": _Exploit()}, bad)
    with pytest.raises(TrainkitError, match="was refused"):
        ckpt.load_checkpoint(bad)
    assert not _Exploit.marker.exists()
    # the same through the CLI, as a run's last checkpoint
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"config": {"epochs": 1, "limit_train": 64, "limit_test": 64}}')
    bad.rename(run / "last.pt")
    assert_one_line_error(run_cli("train", "--resume", run), "last.pt was refused")
    assert not _Exploit.marker.exists()


@pytest.fixture
def small_run(finished_run):
    """conftest's finished 1-epoch run (shared by the session): damage copies of it only."""
    return finished_run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train", "--resume", tmp_path / "empty"), "holds no checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_checkpoint(small_run, tmp_path, damage):
    run = copy_run(small_run, tmp_path / "run")
    data = (run / "last.pt").read_bytes()
    damaged = data[: len(data) // 2] if damage == "truncate" else data[:200] + bytes(400) + data[600:]
    (run / "last.pt").write_bytes(damaged)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line_error(run_cli("train", "--resume", run, "--epochs", "1"), "last.pt is truncated or corrupt")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before   # untouched


@pytest.mark.slow
def test_checkpoint_of_another_architecture(small_run, tmp_path):
    run = copy_run(small_run, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=True)
    state["model"]["fc1.weight"] = torch.zeros(64, 4096)
    del state["model"]["conv4.bias"]
    torch.save(state, run / "last.pt")
    assert_one_line_error(run_cli("train", "--resume", run), "does not fit the model S5Net",
                          "fc1.weight: checkpoint (64, 4096) vs model (50, 4096)", "conv4.bias missing")


@pytest.mark.slow
def test_resume_flag_that_contradicts_the_run(small_run, tmp_path):
    run = copy_run(small_run, tmp_path / "run")
    assert_one_line_error(run_cli("train", "--resume", run, "--lr", "0.5"),
                          "--lr 0.5 contradicts the run being resumed (0.01)")


@pytest.mark.slow
def test_existing_run_is_not_overwritten(small_run, tmp_path):
    run = copy_run(small_run, tmp_path / "run")
    before = (run / "last.pt").read_bytes()
    # (the folder is looked at once the run is built: a small subset in fp32 is built in a moment)
    proc = run_cli("train", "--out", run, "--epochs", "1", "--limit-train", "64", "--limit-test", "64",
                   "--precision", "fp32", "--channels-last", "off")
    assert_one_line_error(proc, "already holds a run", "--resume")
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_output_folder_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    assert_one_line_error(run_cli("train", "--out", tmp_path / "file" / "run", "--epochs", "1",
                                  "--limit-train", "64"), "a part of its path is not a folder")


@pytest.mark.slow
def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, mnist):
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False)
    data = mnist.limit(256, 128)
    out = tmp_path / "run"
    calls = {"n": 0}
    real_replace = os.replace

    def replace_then_fill(src, dst):
        calls["n"] += 1
        if str(dst).endswith("last.pt") and calls.setdefault("last", 0) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if str(dst).endswith("last.pt"):
            calls["last"] = 1
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_then_fill)
    with pytest.raises(TrainkitError, match="could not write last.pt .*No space left on device; "
                                            "the last good checkpoint is"):
        train(cfg, data=data, out=out)
    assert ckpt.load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(ckpt.TMP_PREFIX + "*"))        # no temporary file left behind


def test_atomic_write_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    ckpt.atomic_write_bytes(path, b"old")

    def fail(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ckpt.os, "fsync", fail)
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.slow
def test_stale_temporaries_are_removed(small_run, tmp_path):
    run = copy_run(small_run, tmp_path / "run")
    (run / (ckpt.TMP_PREFIX + "last.pt.abc")).write_bytes(b"half")
    proc = run_cli("train", "--resume", run, "--lr", "0.5")
    assert "contradicts" in proc.stderr                     # lr is part of the saved config
    proc = cli_ok("train", "--resume", run)
    assert not list(run.glob(ckpt.TMP_PREFIX + "*"))


@pytest.mark.slow
def test_safetensors_export_and_load(small_run, tmp_path):
    cli_ok("export", small_run, "--format", "safetensors", "--output", tmp_path / "w.safetensors")
    from trainkit.models import S5Net
    model = S5Net()
    ckpt.load_weights_into(model, ckpt.load_weights(tmp_path / "w.safetensors"), "w.safetensors")
    reference = torch.load(small_run / "model.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(TrainkitError, match="truncated or corrupt"):
        ckpt.load_weights(tmp_path / "bad.safetensors")
