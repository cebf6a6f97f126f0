"""The run folder: owned by one process (its lock), never written into someone else's folder, and
every epoch committed by last.pt, so that a kill between any two writes resumes exactly.

docs/reliability.md lists each fault with the test here that covers it.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, cli_ok, data_dir, metrics_without_time, run_cli, run_clis
from trainkit import checkpoint as ckpt
from trainkit.run import rundir

SMALL = ["--limit-train", "128", "--limit-test", "64", "--batch-size", "64", "--epochs", "2", "--no-progress"]

def _killed_run(argv: list[str], env: dict) -> None:
    """A forked child: the CLI with TRAINKIT_FAULT_AFTER_WRITES, which ends it with os._exit(137)."""
    os.environ.update(env)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    from trainkit.commands.cli import main
    os._exit(main(argv))


def kill_at_writes(runs: list[tuple[list, dict]]) -> list[int]:
    """Each (argv, env) of `runs` in a process of its own, killed (os._exit(137)) at the write
    boundary asked for. Each is forked from this process, as DataLoader's workers are: it starts
    with trainkit imported, and with torch at one thread (set by the test) a fork is safe. Two at a
    time; returns their exit codes."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    codes, env = [], {"TRAINKIT_DATA_DIR": str(data_dir())}
    for pair in range(0, len(runs), 2):
        started = [fork.Process(target=_killed_run, args=([str(a) for a in argv], {**env, **extra}))
                   for argv, extra in runs[pair:pair + 2]]
        for child in started:
            child.start()
        for child in started:
            child.join(600)
            codes.append(child.exitcode)
    return codes


@pytest.fixture
def one_thread():
    """torch at one thread for a test that forks (and for the runs it compares with the forked ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(path: Path) -> dict:
    state = ckpt.safe_load(path)
    return state["model"] if "model" in state and isinstance(state.get("model"), dict) else state


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), (a, b)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (b, name)       # bit for bit


def final_numbers(run: Path) -> list[str]:
    """summary.txt without its wall time ("Epochs: 2, 3.1 s")."""
    return [line for line in (run / "summary.txt").read_text().splitlines() if not line.startswith("Epochs:")]


def assert_same_run(ref: Path, run: Path):
    assert metrics_without_time(run) == metrics_without_time(ref), run
    for name in ("model.pt", "best.pt", "last.pt"):
        assert_same_weights(ref / name, run / name)
    assert ckpt.load_checkpoint(run / "best.pt")["epoch"] == ckpt.load_checkpoint(ref / "best.pt")["epoch"]
    assert ckpt.load_checkpoint(run / "last.pt")["finished"] is True
    assert final_numbers(run) == final_numbers(ref)
    for name in rundir.FILES:
        assert (run / name).is_file(), (run, name)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_a_kill_at_every_write_boundary_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    # The uninterrupted run, and the files it writes in order.
    ref, log = tmp_path / "ref", tmp_path / "writes.log"
    cli_ok("train", *SMALL, "--out", ref, env={"TRAINKIT_WRITE_LOG": str(log)})
    writes = log.read_text().split()
    epoch = ["last.pt", "best.pt", "metrics.csv"]       # last.pt first: the commit point
    assert writes == ["config.json", "data.json", "samples.png", *epoch, *epoch, "metrics.csv", "model.pt", "plot.png",
                      "confusion.png", "mistakes.png", "summary.txt"], writes
    # Killed once k writes are on disk, for every k; "torn": killed with the next write's temporary
    # file complete but not yet renamed (before the first write, and before each checkpoint and model.pt).
    points = [(k, False) for k in range(1, len(writes) + 1)]
    points += [(k, True) for k, name in enumerate(writes) if k == 0 or name.endswith(".pt")]
    runs = []
    for k, torn in points:
        out = tmp_path / f"killed-{k}{'-torn' if torn else ''}"
        env = {"TRAINKIT_FAULT_AFTER_WRITES": str(k), "TRAINKIT_FAULT_TORN": "1" if torn else "0"}
        runs.append((["train", *SMALL, "--out", out], env))
    killed = kill_at_writes(runs)
    assert killed == [137] * len(points), killed     # the last one after all its writes, before it exited
    for k, torn in points:
        out = tmp_path / f"killed-{k}{'-torn' if torn else ''}"
        if torn:
            assert [p.name for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)], out
        if (out / "last.pt").exists():
            cli_ok("train", "--resume", out)
        else:   # killed before its first checkpoint: nothing was trained, the folder is used again
            assert writes[:k] == ["config.json", "data.json", "samples.png"][:k]
            cli_ok("train", *SMALL, "--out", out)
    for k, torn in points:
        assert_same_run(ref, tmp_path / f"killed-{k}{'-torn' if torn else ''}")


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_goes_on(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    held = rundir.prepare(run)          # this process owns the folder, as a running training would
    try:
        # no checkpoint yet: --resume says so (before any lock)
        second, resumed = run_clis(["train", *SMALL, "--out", run], ["train", "--resume", run])
        assert_one_line_error(second, f"{run} is in use by another trainkit process (pid {os.getpid()})")
        assert resumed.returncode == 2
    finally:
        held.release()
    assert sorted(p.name for p in run.iterdir()) == []         # the lock file goes with the lock


@pytest.mark.slow
def test_two_trainings_into_the_same_out_one_is_refused(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "TRAINKIT_DATA_DIR": str(data_dir())}
    # Far more epochs than the checks below take, on any machine; it is stopped with SIGTERM after them.
    # Fixed settings: with auto ones, 200,000 planned steps would have a compile timed (and maybe
    # chosen) before the first epoch, for many seconds on a slow machine.
    fixed = ["--precision", "fp32", "--channels-last", "off", "--compile", "off"]
    first = subprocess.Popen([sys.executable, "-m", "trainkit", "train", *SMALL, *fixed, "--epochs", "100000",
                              "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (run / "last.pt").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert (run / "last.pt").exists(), first.stderr.read()[-2000:] if first.poll() is not None else "no epoch in 300 s"
    # a second training, and --resume too, while the first holds the folder
    second, resumed = run_clis(["train", *SMALL, "--out", run], ["train", "--resume", run])
    assert_one_line_error(second, "is in use by another trainkit process (pid ")
    assert_one_line_error(resumed, "is in use by another trainkit process (pid ")
    assert first.poll() is None                     # the first run went on meanwhile
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 143, first.stderr.read()[-2000:]
    done = len(metrics_without_time(run))
    assert done >= 1
    cli_ok("train", "--resume", run, "--epochs", str(done + 1))   # its checkpoint is whole: it continues
    assert len(metrics_without_time(run)) == done + 1


@pytest.mark.slow
def test_out_into_a_folder_of_other_files_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"notes.txt": b"mine", ".tmp-thesis.tex": b"draft", "config.json": b'{"mine": 1}'}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    assert_one_line_error(run_cli("train", *SMALL, "--out", mine),
                          f"--out {mine} is a folder that holds other files", "choose another --out")
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == files      # nothing written, nothing deleted


def test_only_trainkits_own_temporaries_are_removed(tmp_path):
    names = [".tmp-trainkit-last.pt.x1y2z3ab", ".tmp-last.pt.k3j4h5g6", ".tmp-notes.txt.abcdefgh",
             ".tmp-last.pt", ".tmp-mine"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = ckpt.remove_stale_temporaries(tmp_path, rundir.OWN_NAMES)
    assert sorted(p.name for p in removed) == [".tmp-last.pt.k3j4h5g6", ".tmp-trainkit-last.pt.x1y2z3ab"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".tmp-notes.txt.abcdefgh", ".tmp-last.pt", ".tmp-mine"])


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_can_start_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {}, "environment": {}}))
    (run / (ckpt.TMP_PREFIX + "samples.png.abcdefgh")).write_bytes(b"half")
    held = rundir.prepare(run)              # accepted as a new run; its stale temporary is gone
    held.release()
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    proc = run_cli("train", "--resume", run)
    assert_one_line_error(proc, "holds no checkpoint", f"start it again with --out {run}")


@pytest.mark.slow
def test_a_finished_run_names_what_it_saved_and_leaves_no_lock_file(tmp_path):
    run = tmp_path / "run"
    proc = cli_ok("train", *SMALL, "--epochs", "1", "--evals-per-epoch", "2", "--precision", "fp32",
                  "--channels-last", "off", "--compile", "off", "--out", run)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("Run saved in"))
    named = line.split(": ", 1)[1].split()
    assert "checks.csv" in named and (run / "checks.csv").is_file()      # its mid-epoch checks
    assert all((run / name).exists() for name in named), named
    assert not (run / rundir.LOCK).exists()          # an empty .trainkit.lock was left behind


def test_a_released_lock_removes_its_file_and_a_new_taker_gets_a_fresh_one(tmp_path):
    first = rundir.lock_run(tmp_path)
    first.release()
    assert not (tmp_path / rundir.LOCK).exists()
    second = rundir.lock_run(tmp_path)              # a new file, locked as before
    try:
        assert (tmp_path / rundir.LOCK).is_file()
        with pytest.raises(Exception, match="in use by another trainkit process"):
            rundir.lock_run(tmp_path)
    finally:
        second.release()
