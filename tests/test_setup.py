"""A fresh machine: the README's set-up is enough, the tests find (or fetch) their data, CI runs everything."""
import fcntl
import os
import re
import subprocess
import sys
import time
import tomllib

import pytest

from cli_runner import needs_new_process
from conftest import (MNIST_STEMS, ROOT, cache_dir, data_dir, fetch_mnist, metrics_without_time,
                      need_system_package, run_cli)
from trainkit.checkpoint import LOCK
from trainkit.data.idx import MNIST

MNIST_GZ = sorted(item.stem + ".gz" for item in MNIST.files.values())


def test_conftest_looks_for_the_files_trainkit_reads():
    assert sorted(MNIST_STEMS) == sorted(item.stem for item in MNIST.files.values())


def test_without_a_data_folder_mnist_is_fetched_once_into_the_cache(tmp_path, local_mirror, monkeypatch):
    monkeypatch.delenv("TRAINKIT_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TRAINKIT_MIRROR", local_mirror)
    assert data_dir() == cache_dir() == tmp_path / "cache" / "trainkit" / "datasets"
    root = fetch_mnist(data_dir())
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == MNIST_GZ        # checked, no temporary files left
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    monkeypatch.setenv("TRAINKIT_MIRROR", "http://127.0.0.1:9/")      # offline from now on
    fetch_mnist(data_dir())                                            # once: nothing is fetched again
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps


@pytest.mark.slow   # a pytest subprocess that imports torch
def test_the_test_suite_runs_without_TRAINKIT_DATA_DIR(tmp_path, local_mirror):
    """The README's command on a machine without the data: conftest fills the cache, the tests read it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINKIT_DATA_DIR", "TRAINKIT_REQUIRE_ALL")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TRAINKIT_MIRROR=local_mirror)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_datasets.py::test_reads_extracted_files"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = tmp_path / "cache" / "trainkit" / "datasets" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == MNIST_GZ


def test_a_missing_system_package_skips_and_names_it(tmp_path):
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install dataset-fashion-mnist"):
        need_system_package("dataset-fashion-mnist", tmp_path / "fashion-mnist")
    need_system_package("anything", tmp_path)                          # present: no skip


def test_ci_fails_a_skipped_test(pytester, monkeypatch):
    """Under TRAINKIT_REQUIRE_ALL=1 (.ci/run) a test that skips fails instead, with its reason."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(cli_runner=(ROOT / "tests" / "cli_runner.py").read_text())     # which conftest imports
    pytester.makepyfile(test_skips="import pytest\n\ndef test_needs_a_package():\n"
                                   "    pytest.skip('needs Debian\\'s dataset-x: apt-get install dataset-x')\n")
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(data_dir()))
    monkeypatch.setenv("TRAINKIT_REQUIRE_ALL", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*TRAINKIT_REQUIRE_ALL=1 (CI) runs every test*apt-get install dataset-x*"])


def test_readme_set_up_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[0].splitlines()[0].startswith("pip install -r requirements.txt")
    assert blocks[0].splitlines()[1].startswith("trainkit train")
    commands = [line.split("#")[0].strip() for line in blocks[1].splitlines()]
    assert commands[0] == "python -m pytest -q"                        # no data folder a clone lacks
    assert 'python -m pytest -q -m "not slow"' in commands
    assert "../shared" not in readme.split("## Results")[0]


def test_ci_runs_every_test_on_the_shared_data():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y -qq dataset-fashion-mnist" in ci
    assert re.search(r"^export TRAINKIT_DATA_DIR=\.\./shared/datasets$", ci, re.M)
    assert re.search(r"^export TRAINKIT_REQUIRE_ALL=1$", ci, re.M)
    assert re.search(r"^python -m pytest -q$", ci, re.M)               # every test, no -m


def test_the_notebook_extra_has_what_nbconvert_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", req)[0] for req in extras["notebook"]}
    assert {"nbconvert", "ipykernel", "ipywidgets"} <= names      # jupyter nbconvert, a kernel, tqdm's widget bars
    assert any("notebook" in req for req in extras["test"])
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


# -- tests/cli_runner.py: the commands the tests run, in the test process -------------------------------

@pytest.mark.slow
def test_a_command_run_in_process_gives_what_a_new_process_gives(tmp_path):
    commands = [["--help"], ["train", "--epochs", "zero"], ["eval", tmp_path / "no-run"],
                ["train", "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--batch-size", "32",
                 "--precision", "fp32", "--channels-last", "off", "--compile", "off", "--no-progress",
                 "--out", tmp_path / "{}"]]
    for argv in commands:
        here, new = (run_cli(*[str(a).format(kind) for a in argv], new_process=kind == "new", cwd=tmp_path)
                       for kind in ("inproc", "new"))
        assert here.returncode == new.returncode, (argv, here.stderr, new.stderr)
        assert here.stderr.replace(str(tmp_path / "inproc"), str(tmp_path / "new")) == new.stderr, argv
        if new.returncode == 0 and argv[0] == "train":      # the last line names the run folder, which differs
            assert here.stdout.count("Test set:") == new.stdout.count("Test set:") == 1
            assert metrics_without_time(tmp_path / "inproc") == metrics_without_time(tmp_path / "new")
        assert here.stdout.replace(str(tmp_path / "inproc"), str(tmp_path / "new")) == new.stdout, argv


@pytest.mark.slow
def test_a_command_that_runs_out_of_time_is_killed_with_what_it_started(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("train", "--limit-train", "256", "--limit-test", "64", "--epochs", "100000", "--precision", "fp32",
                "--channels-last", "off", "--compile", "off", "--out", out, timeout=15)
    assert (out / LOCK).is_file()                       # it had started its run
    with open(out / LOCK) as lock:      # no process of it holds the run folder now (its children may take a moment)
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed command's run folder is still held"
                time.sleep(0.1)


def test_only_variables_read_when_used_can_change_for_a_command_in_process():
    assert not needs_new_process({**os.environ, "TRAINKIT_MIRROR": "http://127.0.0.1:9/"})
    assert needs_new_process({**os.environ, "CXX": "/nonexistent/g++"})          # read when torch's compiler loads
    assert needs_new_process({k: v for k, v in os.environ.items() if k != "HOME"})
    assert not needs_new_process({**os.environ, "PYTEST_CURRENT_TEST": "another test (call)"})
    # compared with a given environment instead of this process's
    started = {**os.environ, "MPLBACKEND": "svg"}
    assert needs_new_process(dict(os.environ), started) and not needs_new_process(dict(started), started)


def test_torch_in_the_test_process_has_the_threads_its_commands_get():
    """A command run in this process and one in a process of its own compute with the same number
    of threads (OMP_NUM_THREADS, set by conftest before torch loads), so their numbers agree bit for bit."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
    probe = "import torch; print(torch.get_num_threads())"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert int(child.stdout) == torch.get_num_threads()
