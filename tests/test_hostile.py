"""Hostile input: damaged checkpoints, stalling mirrors, gzip and PNG bombs, absurd settings.

Every case ends in one line on stderr and a non-zero exit (or a TrainkitError with a short
message), never a traceback, a hang or lost data. docs/reliability.md lists each with its test.
"""
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, cli_ok, data_dir, run_cli
from trainkit import TrainConfig, train
from trainkit import checkpoint as ckpt
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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real 1-epoch run (last.pt, best.pt, model.pt, config.json) to damage copies of."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    cfg = TrainConfig(limit_train=256, limit_test=100, epochs=1, batch_size=64, progress=False,
                      data_dir=str(data_dir()))
    train(cfg, out=out)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    from PIL import Image
    path = tmp_path_factory.mktemp("png") / "digit.png"
    Image.new("L", (28, 28), 0).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Checkpoints carry a SHA-256 of their bytes

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


@pytest.mark.parametrize("where", ["start", "middle", "end", "footer"])
def test_any_flipped_byte_is_caught(run_copy, where):
    path = run_copy / "last.pt"
    offset = {"start": 40, "middle": None, "end": -100, "footer": -5}[where]
    flip(path, offset, count=1)
    with pytest.raises(TrainkitError, match="truncated or corrupt: its contents do not match"):
        ckpt.load_checkpoint(path)


def test_checkpoints_from_before_checksums_still_load(run_copy):
    # An old checkpoint: the same torch.save bytes with an empty zip comment.
    path = run_copy / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-82] + b"\0\0")
    assert ckpt.check_checksum(path.read_bytes(), path) is False
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    torch.save(ckpt.load_weights(run_copy / "model.pt"), run_copy / "model.pt")   # plain torch.save
    assert set(ckpt.load_weights(run_copy / "model.pt")) == set(ckpt.load_checkpoint(run_copy / "best.pt")["model"])
