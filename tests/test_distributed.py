"""Data-parallel training with torchrun: 2 CPU processes, gloo, bound to 127.0.0.1; one agent
with two processes, or two agents as two nodes of one process each."""
import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import cli_ok, data_dir

pytestmark = pytest.mark.slow   # torchrun starts training processes

# fp32: the tolerances below were measured in fp32 (--precision auto may choose bf16, whose sums
# differ more between 1 and 2 processes). No compile: its timing (and its choice) would depend on the
# machine. --channels-last auto is still measured: rank 0's choice is broadcast to the other rank.
SUBSET = ["--limit-train", "2048", "--limit-test", "1000", "--batch-size", "64", "--epochs", "2", "--compile", "off",
          "--no-progress", "--precision", "fp32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env():
    return {**os.environ, "TRAINKIT_DATA_DIR": str(data_dir()), "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}  # gloo talks over loopback only


def torchrun(*args, extra=(), timeout=600, popen=False):
    # c10d rendezvous, as the README recommends, with its endpoint on loopback.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=trainkit-test",
           *extra, "-m", "trainkit", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def two_nodes(*args, logs, extra=()):
    """Two torchrun agents as the two nodes of one run (one process each), meeting at a c10d
    rendezvous on 127.0.0.1; each agent's output goes to logs/node<i>.log. Every process they
    started is killed on the way out (each agent leads a process group of its own with its workers)."""
    logs.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=trainkit-two-nodes", *extra,
           "-m", "trainkit", *map(str, args)]
    agents = []
    try:
        for i in range(2):
            with open(logs / f"node{i}.log", "wb") as log:
                agents.append(subprocess.Popen(cmd, env=torchrun_env(), stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        yield agents
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)    # the agent and its workers, finished or not
            agent.wait()


def wait_all(agents, timeout):
    deadline = time.monotonic() + timeout
    for agent in agents:
        agent.wait(timeout=max(1, deadline - time.monotonic()))
    return [agent.returncode for agent in agents]


def read_logs(logs):
    return [(logs / f"node{i}.log").read_text(errors="replace") for i in range(2)]


def worker_of_rank(agents, rank):
    """The pid of the worker (a child of one of the agents) that torchrun gave RANK=rank, or None."""
    for agent in agents:
        children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, children):
            with contextlib.suppress(OSError):
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID=trainkit-two-nodes" in env:
                    return pid
    return None


def rows(run_dir):
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    cli_ok("train", *SUBSET, "--out", out)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One agent, two processes. Mid-epoch evaluations too: every rank must take part in each (the
    sums are all-reduced)."""
    runs = tmp_path_factory.mktemp("two_processes")
    proc = torchrun("train", *SUBSET, "--evals-per-epoch", "2", "--out", runs / "ddp", timeout=600)
    return runs, proc


def test_two_processes_train_like_one(single, two_processes):
    tmp_path, proc = two_processes
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]      # one run directory
    assert proc.stdout.count("Test set:") == 2                         # only rank 0 prints
    assert proc.stdout.count("Test set after batch 16/32:") == 2
    ddp, one = rows(tmp_path / "ddp"), rows(single)
    for r in ddp:
        assert int(r["train_seen"]) == 2048 and int(r["test_total"]) == 1000   # each image once per epoch
    assert_trains_like_one(ddp, one)


def assert_trains_like_one(ddp, one):
    # Same global batch, same permutation, same augmentation: only the order of floating-point
    # sums differs (gradients are averaged over ranks). After one epoch the two runs agree to
    # about 1e-5 in loss (measured). Such differences then grow at a rate that depends on the
    # processor's kernels: at the end of epoch 2 the test accuracies were 1.2 points apart on an
    # AMD EPYC with AVX-512 and 4.4 on CI's machine, so past epoch 1 no tolerance is a fact; what
    # is checked there is that the run goes on learning from where epoch 1 left it.
    assert [int(r["epoch"]) for r in ddp] == [int(r["epoch"]) for r in one] == [1, 2]
    assert abs(float(ddp[0]["train_loss"]) - float(one[0]["train_loss"])) < 1e-3
    assert abs(float(ddp[0]["test_acc"]) - float(one[0]["test_acc"])) <= 0.5
    assert float(ddp[1]["train_loss"]) < float(ddp[0]["train_loss"])


def test_a_killed_worker_restarts_from_the_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    args = [*SUBSET[:-3], "--epochs", "3", "--out", out]   # progress bars on: they tell us where we are
    proc = torchrun("train", *args, extra=["--max-restarts=1"], popen=True)
    seen, killed = b"", False
    deadline = time.time() + 400
    while time.time() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        if not killed and b"Epoch 2\n" in seen and (out / "last.pt").exists():
            # kill one worker (a child of the torchrun agent) in the middle of epoch 2
            workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "trainkit"], capture_output=True, text=True)
            pids = [int(p) for p in workers.stdout.split()]
            assert pids, "no worker found"
            os.kill(pids[-1], signal.SIGKILL)
            killed = True
    rest, _ = proc.communicate(timeout=400)
    text = (seen + rest).decode(errors="replace")
    assert killed
    assert proc.returncode == 0, text[-3000:]
    result = rows(out)
    assert [int(r["epoch"]) for r in result] == [1, 2, 3]
    assert all(int(r["train_seen"]) == 2048 for r in result)
    assert text.count("Epoch 1\n") == 1          # the restart resumed after epoch 1, not from scratch


def test_two_nodes_train_like_one_process(single, two_processes, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with two_nodes("train", *SUBSET, "--out", runs / "two", logs=tmp_path / "logs") as agents:
        codes = wait_all(agents, timeout=600)
    logs = read_logs(tmp_path / "logs")
    assert codes == [0, 0], [log[-3000:] for log in logs]
    assert sorted(p.name for p in runs.iterdir()) == ["two"]   # one run folder, in the --out both nodes were given
    assert sorted(log.count("Test set:") for log in logs) == [0, 2]     # rank 0 alone printed, once an epoch
    two, one = rows(runs / "two"), rows(single)
    assert [int(r["epoch"]) for r in two] == [1, 2]
    for r in two:
        assert int(r["train_seen"]) == 2048 and int(r["test_total"]) == 1000   # each image once per epoch
    assert_trains_like_one(two, one)     # the same tolerances as two processes of one agent
    # Two nodes of one process and one node of two do the same sums in the same order: their
    # numbers are the same to the last digit (the mid-epoch evaluations of the latter change nothing).
    ddp = rows(two_processes[0] / "ddp")
    columns = ["epoch", "train_loss", "train_acc", "test_loss", "test_correct"]
    assert [[r[c] for c in columns] for r in two] == [[r[c] for c in columns] for r in ddp]


def test_two_nodes_a_killed_worker_restarts_from_the_checkpoint(tmp_path):
    # Two epochs: the kill lands in the second, after the first one's checkpoint. Progress bars on
    # (rank 0's node log): they tell us which batch rank 0 is at.
    out = tmp_path / "run"
    args = ["--limit-train", "1024", "--limit-test", "256", "--batch-size", "32", "--epochs", "2",
            "--precision", "fp32", "--channels-last", "off", "--compile", "off", "--out", out]
    killed_at = None
    with two_nodes("train", *args, logs=tmp_path / "logs", extra=["--max-restarts=1"]) as agents:
        deadline = time.monotonic() + 400
        while killed_at is None and time.monotonic() < deadline and all(a.poll() is None for a in agents):
            time.sleep(0.05)
            epoch2 = [log.split("Epoch 2\n", 1)[1] for log in read_logs(tmp_path / "logs") if "Epoch 2\n" in log]
            batches = [int(b) for b in re.findall(r"Batch_id=(\d+)", epoch2[0])] if epoch2 else []
            if batches and max(batches) >= 4 and (out / "last.pt").exists():
                pid = worker_of_rank(agents, 1)     # rank 1: the worker of the node that is not rank 0's
                assert pid is not None, "no worker of rank 1 found"
                finished = [int(r["epoch"]) for r in rows(out)]
                os.kill(pid, signal.SIGKILL)
                killed_at = (max(batches), finished)
                print(f"killed rank 1 (pid {pid}) in epoch 2 at batch {max(batches)}/32, metrics.csv's epochs {finished}")
        codes = wait_all(agents, timeout=400)
    logs = read_logs(tmp_path / "logs")
    assert killed_at is not None, [log[-3000:] for log in logs]
    assert killed_at[1] == [1]                  # killed in epoch 2, with epoch 1 done and checkpointed
    assert codes == [0, 0], [log[-3000:] for log in logs]
    result = rows(out)
    assert [int(r["epoch"]) for r in result] == [1, 2]      # no epoch counted twice
    assert all(int(r["train_seen"]) == 1024 for r in result)
    text = "".join(logs)
    assert text.count("Epoch 1\n") == 1        # the restart resumed after epoch 1, not from scratch
    assert text.count("Epoch 2\n") == 2        # epoch 2 began again from its start
