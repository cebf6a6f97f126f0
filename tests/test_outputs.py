"""One rule for every file a command writes (`compare --png`, `summary --png`, `lr-find --output`,
`export --output`): never a run's own files, never through a symbolic link, whole or not at all,
and one line for a missing folder, a read-only mount, a full disk, a long name or an unknown format.

docs/reliability.md lists each case with its test.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, mount_namespace, run_cli
from trainkit import checkpoint as ckpt
from trainkit.commands.cli import main
from trainkit.errors import TrainkitError
from trainkit.outputs import RUN_NAMES, check_output, write_output

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, accs=(90.0, 95.0)) -> Path:
    """A run folder as trainkit leaves it, small: config.json, metrics.csv, plot.png, a checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": {"lr": 0.01, "epochs": len(accs)}}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"])
        for i, acc in enumerate(accs, 1):
            writer.writerow([i, 0.01, 0.5, acc - 1, 0.3, acc, 1.5])
    (folder / "plot.png").write_bytes(b"\x89PNG the run's own plot")
    ckpt.atomic_torch_save({"w": torch.zeros(3)}, folder / "last.pt")
    return folder


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def call(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    if code:
        assert len(err) == 1 and err[0].startswith("trainkit: error: ") and "Traceback" not in err[0], err
    return code, err[0] if err else ""


def test_run_names_cover_every_file_a_run_writes():
    from trainkit.run import rundir

    assert set(rundir.FILES) | {rundir.LOCK} <= RUN_NAMES


@pytest.fixture
def run(tmp_path):
    return fake_run(tmp_path / "run")


@pytest.mark.parametrize("target, fragment", [
    ("run/plot.png", "plot.png is a file of the run"),
    ("run/confusion.png", "confusion.png is a file of the run"),     # not there yet: still the run's name
    ("run/link.png", "it is a symbolic link"),
    ("run/dangling.png", "it is a symbolic link"),
    ("sub", "it is a folder"),
    ("fifo.png", "not a regular file"),
    ("nowhere/x.png", "the folder {tmp}/nowhere does not exist"),
    ("afile/x.png", "a part of its path is not a folder"),
    ("/proc/x.png", "files cannot be created in the folder /proc"),
    ("x.pt", "the extension .pt is not a picture format"),
    ("noext", "a name without an extension is not a picture format"),
    ("y" * 300 + ".png", "the name is too long"),
    ("y" * 240 + ".png", "at most"),                     # fits, but its temporary would not
    ("/".join(["z" * 200] * 25) + "/x.png", "the name is too long"),
])
def test_pictures_that_must_not_or_cannot_be_written(tmp_path, run, target, fragment):
    (run / "link.png").symlink_to(run / "last.pt")
    (run / "dangling.png").symlink_to(tmp_path / "nothing-here")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "afile").write_text("a file, not a folder")
    before = snapshot(run)
    path = tmp_path / target if target != "sub" else tmp_path / "sub.png"
    with pytest.raises(TrainkitError) as caught:
        check_output(path, "--png", picture=True)
    message = str(caught.value)
    assert fragment.format(tmp=tmp_path) in message and "\n" not in message and len(message) < 400, message
    assert snapshot(run) == before
    assert (run / "link.png").is_symlink() and os.readlink(run / "link.png") == str(run / "last.pt")


def test_a_checkpoint_outside_a_run_is_not_overwritten(tmp_path):
    ckpt.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "mine.svg")    # any name: judged by content
    with pytest.raises(TrainkitError, match="is a trainkit checkpoint or weights file"):
        check_output(tmp_path / "mine.svg", "--png", picture=True)


def test_other_names_in_a_run_folder_and_any_format_matplotlib_saves(tmp_path, run, capsys):
    """compare --png RUN/compare.svg is fine: it is not one of the run's files."""
    for name in ("compare.svg", "compare.pdf", "compare.PNG"):
        code, _ = call(capsys, "compare", run, "--png", run / name)
        assert code == 0 and (run / name).stat().st_size > 1000
    assert (run / "compare.svg").read_text().lstrip().startswith("<?xml")
    assert (run / "compare.pdf").read_bytes().startswith(b"%PDF")
    assert not [p for p in run.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def test_an_existing_picture_is_replaced_whole_and_a_hard_link_keeps_the_old(tmp_path, run, capsys):
    """The rename replaces the name: another name for the old file (a hard link) still reads the old bytes."""
    (tmp_path / "old.png").write_bytes(b"old picture")
    os.link(tmp_path / "old.png", tmp_path / "other-name.png")
    assert call(capsys, "compare", run, "--png", tmp_path / "old.png")[0] == 0
    assert (tmp_path / "old.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "other-name.png").read_bytes() == b"old picture"


@pytest.mark.parametrize("argv, name", [
    (["compare", "{run}", "--png", "{run}/link.png"], "link.png"),
    (["compare", "{run}", "--png", "{run}/plot.png"], "plot.png"),
    (["summary", "--png", "{run}/confusion.png"], "confusion.png"),
    (["summary", "--png", "{run}/link.png"], "link.png"),
    (["lr-find", "--steps", "5", "--output", "{run}/plot.png"], "plot.png"),
    (["lr-find", "--steps", "5", "--output", "{run}/x.pt"], "x.pt"),
    (["compare", "{run}", "--png", "{tmp}/no/such/c.png"], "c.png"),
])
def test_commands_never_write_over_a_run(tmp_path, run, capsys, argv, name):
    (run / "link.png").symlink_to(run / "last.pt")
    before = snapshot(run)
    code, line = call(capsys, *(a.format(run=run, tmp=tmp_path) for a in argv))
    assert code == 2 and name in line
    assert snapshot(run) == before and (run / "link.png").is_symlink()


@pytest.mark.slow
def test_lr_find_refuses_its_output_before_the_sweep(tmp_path, run):
    """A whole sweep of MNIST would take seconds; the refusal comes first (no data is read)."""
    proc = run_cli("lr-find", "--output", run / "plot.png", "--data-dir", tmp_path / "no-data-here", timeout=120)
    assert_one_line_error(proc, "plot.png is a file of the run")


def in_tmpfs(target: Path, options: str, *argv) -> tuple[subprocess.CompletedProcess, str]:
    """`trainkit ARGV` with a real tmpfs (`options`: size=16k, ro) mounted on `target`; the process
    and what the tmpfs holds afterwards."""
    target.mkdir(exist_ok=True)
    script = (f'mount -t tmpfs -o {options} tmpfs "$1" || exit 99; shift; "$@" 2>&1 1>/dev/null; code=$?; '
              f'echo "exit=$code"; ls -A "{target}"')
    cmd = [*mount_namespace(), "sh", "-c", script, "sh", str(target), sys.executable, "-m", "trainkit", *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "exit=" in proc.stdout, proc.stdout + proc.stderr
    err, _, rest = proc.stdout.rpartition("exit=")
    code, _, listing = rest.partition("\n")
    return subprocess.CompletedProcess(cmd, int(code), "", err), listing.strip()


@pytest.mark.slow
@pytest.mark.parametrize("options, fragment", [("size=16k", "the disk is full; nothing was written"),
                                               ("ro", "is on a read-only file system")])
def test_compare_onto_a_full_or_read_only_disk(tmp_path, run, options, fragment):
    proc, listing = in_tmpfs(tmp_path / "disk", options, "compare", run, "--png", tmp_path / "disk" / "c.png")
    assert_one_line_error(proc, f"cannot write --png {tmp_path / 'disk' / 'c.png'}", fragment)
    assert listing == ""                  # no partial picture, no temporary


@pytest.mark.slow
def test_summary_and_lr_find_onto_a_read_only_disk(tmp_path):
    for argv in (["summary", "--png", tmp_path / "disk" / "s.png"],
                 ["lr-find", "--steps", "5", "--output", tmp_path / "disk" / "l.png"]):
        proc, listing = in_tmpfs(tmp_path / "disk", "ro", *argv)
        assert_one_line_error(proc, "is on a read-only file system")


def test_write_output_says_why_and_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainkitError, match="a part of its path is not a folder; nothing was written"):
        write_output(tmp_path / "afile" / "x.png", b"data", "--png")
    (tmp_path / "late-link.png").symlink_to(tmp_path / "afile")
    with pytest.raises(TrainkitError, match="symbolic link"):
        write_output(tmp_path / "late-link.png", b"data", "--png")
    assert (tmp_path / "afile").read_text() == "x"
