import atexit
import functools
import http.server
import os
import subprocess
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from cli_runner import needs_new_process, run_in_new_process, run_in_process

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]   # tests/test_setup.py runs the suite's own hooks in a scratch folder

# CI (.ci/run) sets TRAINKIT_REQUIRE_ALL=1: there every test must run, so a skip is a failure.
REQUIRE_ALL = os.environ.get("TRAINKIT_REQUIRE_ALL") == "1"

# The property tests draw new examples on every run while the code is changed; CI draws the same ones
# each time (derandomize), so that what lands does not depend on a draw. A falsifying example found
# on the way is kept as an @example.
if REQUIRE_ALL:
    from hypothesis import settings as _hypothesis_settings
    _hypothesis_settings.register_profile("ci", derandomize=True)
    _hypothesis_settings.load_profile("ci")


def cache_dir() -> Path:
    """Where the tests keep the data they download: $XDG_CACHE_HOME/trainkit/datasets (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trainkit" / "datasets"


def data_dir() -> Path:
    """$TRAINKIT_DATA_DIR when it is set (CI: ../shared/datasets), else the cache folder."""
    env = os.environ.get("TRAINKIT_DATA_DIR")
    return Path(env) if env else cache_dir()


# Tests change folders, so a relative TRAINKIT_DATA_DIR is made absolute; when it is not set, the
# cache folder is used, by this process and by the trainkit processes the tests start.
os.environ["TRAINKIT_DATA_DIR"] = str(data_dir().resolve())

# Under pytest-xdist each test process gets its share of the cores for its math (torch's threads,
# here and in the trainkit processes it starts): two processes of two threads each on two cores wait
# on each other's spinning threads. A thread count the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# --precision / --channels-last auto keep their measurements in a cache: for the tests, and the
# trainkit processes they start, one of their own (removed at the end), never the user's.
os.environ["TRAINKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="trainkit-test-cache-")
atexit.register(shutil.rmtree, os.environ["TRAINKIT_CACHE_DIR"], ignore_errors=True)


# trainkit.data.idx.MNIST's files, named here so that finding them needs no torch import.
MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist_present(root: Path) -> bool:
    raw = Path(root) / "MNIST" / "raw"
    return all((raw / stem).is_file() or (raw / (stem + ".gz")).is_file() for stem in MNIST_STEMS)


def fetch_mnist(root: Path) -> Path:
    """Make sure root/MNIST/raw holds MNIST: trainkit's downloader fetches what is missing (the
    four published .gz files, about 11 MB) and checks every file's MD5. Returns root."""
    from trainkit.data.idx import MNIST, load_idx_dataset
    if not mnist_present(root):
        load_idx_dataset(MNIST, root, download=True, progress=False)
    return Path(root)


@pytest.fixture(scope="session", autouse=True)
def mnist_dir() -> Path:
    """The data folder, with MNIST in it: downloaded once into the cache on a machine without it."""
    path = data_dir()
    if mnist_present(path):
        return path
    from trainkit.errors import TrainkitError
    try:
        return fetch_mnist(path)
    except TrainkitError as exc:
        pytest.fail(f"the tests need MNIST: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from trainkit.data.idx import MNIST, load_idx_dataset
    return load_idx_dataset(MNIST, mnist_dir, download=False)


@pytest.fixture
def local_mirror(mnist_dir):
    """An HTTP server on 127.0.0.1 serving the MNIST files, like the official mirrors."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mnist_dir / "MNIST" / "raw"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def need_system_package(package: str, path: str | Path):
    """Skip, naming the Debian package to install, when `path` (which the package provides) is absent."""
    if not Path(path).exists():
        pytest.skip(f"needs Debian's {package} ({path} is missing): apt-get install {package}")


@pytest.fixture
def fashion_mnist_package():
    """Debian's dataset-fashion-mnist, which .ci/run installs; without it the test is skipped."""
    from trainkit.data.idx import FASHION_MNIST
    need_system_package("dataset-fashion-mnist", FASHION_MNIST.system_dirs[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"TRAINKIT_REQUIRE_ALL=1 (CI) runs every test, but this one was skipped: {reason}"
    return report


# TRAINKIT_TEST_NEW_PROCESSES=1 starts every command as a new process (to compare, or to rule out the in-process runner).
NEW_PROCESSES = os.environ.get("TRAINKIT_TEST_NEW_PROCESSES") == "1"


def run_cli(*args, env=None, cwd=None, timeout=None, new_process=False):
    """Run `trainkit ARGS`; returns a CompletedProcess (exit code, stdout, stderr). It runs in this
    process (tests/cli_runner.py) unless a new process is asked for, a `timeout` says that a hang or
    a kill is what the test looks for, or the environment has a variable read at import time."""
    argv = list(map(str, args))
    env = {"TRAINKIT_DATA_DIR": str(data_dir()), **(env or {})}
    killed = "TRAINKIT_FAULT_AFTER_WRITES" in env      # it would end this process: a process of its own
    if new_process or NEW_PROCESSES or timeout is not None or killed or needs_new_process({**os.environ, **env}):
        return run_in_new_process(argv, env, cwd, timeout=timeout or 600)
    return run_in_process(argv, env, cwd)


def run_clis(*commands, **kwargs) -> list[subprocess.CompletedProcess]:
    """run_cli for each of several independent commands (argument lists), in order."""
    return [run_cli(*args, **kwargs) for args in commands]


def mount_namespace() -> list[str]:
    """`unshare` that gives a command its own mounts (user namespaces: no root needed), or a skip."""
    cmd = ["unshare", "--map-root-user", "--mount"]
    if not shutil.which("unshare") or subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces, to mount a small or read-only tmpfs")
    return cmd


def cli_ok(*args, **kwargs):
    """run_cli that must succeed; a failure shows the end of stderr."""
    proc = run_cli(*args, **kwargs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def assert_one_line_error(proc, *fragments, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("trainkit: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# 2,048 training and 1,000 test images, 2 epochs, batch 32 (128 steps), otherwise the seed
# recipe. It reaches about 90% here; 80% leaves room for other seeds and CPUs while
# still failing for a model that learns nothing useful.
QUICK = ["--limit-train", "2048", "--limit-test", "1000", "--epochs", "2", "--batch-size", "32"]
QUICK_MIN_ACC = 80.0


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    proc = cli_ok("train", *QUICK, "--out", out)
    return out, proc


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, mnist_dir) -> Path:
    """A real finished 1-epoch run (last.pt, best.pt, model.pt, config.json, the reports), trained once
    for the whole session: read it, or damage and extend copies of it (shutil.copytree), never itself.
    fp32 and channels_last off as given settings: no --precision auto measurement (seconds) for a run
    whose files, not its speed, the tests look at."""
    from trainkit import TrainConfig, train
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(limit_train=256, limit_test=128, epochs=1, batch_size=64, progress=False,
                      precision="fp32", channels_last="off", data_dir=str(mnist_dir)), out=out)
    return out




def metrics_without_time(run_dir: Path) -> list[dict]:
    """metrics.csv as rows, without the wall-time column (the only one that may differ between runs)."""
    import csv
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


# The files whose tests take longest, longest first (the durations pytest prints). The two test
# processes (pytest-xdist, --dist loadfile) take files in collection order, so these go first: the
# short files then fill the gaps instead of one long file running alone at the end.
LONG_FILES = ("test_hostile.py", "test_distributed.py", "test_training.py", "test_reuse.py", "test_run_folder.py",
              "test_bench.py", "test_tracking.py", "test_notebook.py", "test_reliability.py", "test_serve.py",
              "test_real_models.py", "test_setup.py", "test_engine.py", "test_chosen_model.py", "test_precision.py",
              "test_compile.py", "test_outputs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))     # stable: a file keeps its order
