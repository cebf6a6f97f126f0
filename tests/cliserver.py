"""Start `trainkit` commands for the tests without paying Python's and torch's start-up each time.

Most of a short `python -m trainkit ...` is its imports: Python, torch, torch._dynamo (which the
first optimizer imports), matplotlib for the reports: about 3 s of each command here, and the tests
run a few hundred commands. So each test process keeps one server process that has made those
imports and run no torch operation. For each command it forks a child, which becomes what
`python -m trainkit ARGS` would be: its own process with the command's environment, working folder,
sys.path[0], sys.argv, stdin from /dev/null and stdout and stderr in files; it runs the CLI's main,
then what the interpreter does on the way out (threads joined, atexit handlers), and exits with the
command's code. Its output is read once it has ended and so has what it started in its process group
(as subprocess.run reads until every holder of the output has closed it). A fork copies a process that has imported everything before it ran anything, as
multiprocessing's fork start method does.

What a fork cannot give is a setting read while those modules were imported: a command whose
environment differs from the one the server started with in anything other than trainkit's own
variables (TRAINKIT_*, each read when it is used) and PYTEST_CURRENT_TEST is started as a new
process instead (`needs_new_process`). A server that dies is replaced at the next command.
"""
import contextlib
import json
import locale
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The server: reads one JSON request a line on fd 0 and answers on fd 1 with {"id", "pid"} when the
# child is started and {"id", "status"} when it has ended (a wait status, as os.waitpid gives it).
SERVER = r"""
import json, os, select, sys
requests, answers = os.dup(0), os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, torchinfo, torch, torch._dynamo
import trainkit, trainkit.commands.cli, trainkit.run.training, trainkit.run.rundir, trainkit.run.reports
import trainkit.run.experiment

MAIN = os.path.join(os.path.dirname(trainkit.__file__), "__main__.py")


def run(request):
    import atexit, threading, traceback
    os.setpgid(0, 0)                # a group of its own: a timeout kills it with its own children
    os.close(requests)
    os.close(answers)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 1
    try:            # (torch's threads: OMP_NUM_THREADS is the server's, as the environment must be)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]     # as `python -m` puts the working folder first
        sys.argv = [MAIN, *request["argv"]]
        code = trainkit.commands.cli.main(request["argv"])
    except SystemExit as stop:
        code = stop.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            stream.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def answer(message):
    os.write(answers, (json.dumps(message) + "\n").encode())


running, pending = {}, b""
while True:
    ready, _, _ = select.select([requests], [], [], 0.02)
    if ready:
        chunk = os.read(requests, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                run(request)
            try:
                os.setpgid(pid, pid)    # here too: the group exists before anyone may signal it
            except OSError:
                pass                    # the child made it already, or has ended
            running[pid] = request["id"]
            answer({"id": request["id"], "pid": pid})
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        answer({"id": running.pop(pid), "status": status})
"""


# Read when they are used, never at import: trainkit's own variables, and the test pytest is running.
READ_WHEN_USED = ("TRAINKIT_", "PYTEST_CURRENT_TEST")


def needs_new_process(env: dict, base: dict | None = None) -> bool:
    """True when `env` differs from `base` (the server's environment; by default this process's) in
    something that a module may have read when it was imported (anything but READ_WHEN_USED)."""
    base = os.environ if base is None else base
    keys = set(env) | set(base)
    return any(env.get(k) != base.get(k) for k in keys if not k.startswith(READ_WHEN_USED))


def _live_members(pgid: int) -> bool:
    """Whether a process of group `pgid` is alive (a zombie that nobody reaps does not count)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()     # after "pid (comm)": state, ppid, pgrp
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class CliServer:
    """One server process, started on the first command; safe to use from several threads."""

    def __init__(self):
        self._proc = None
        self._environment = None
        self._lock = threading.Lock()
        self._next = 0
        self._waiting = {}      # id -> {"pid": ..., "status": ..., "event": Event for each answer}

    @property
    def environment(self) -> dict:
        """The environment the server was started with (the one it will start with, before it is)."""
        return self._environment if self._environment is not None else dict(os.environ)

    def _start(self):
        self._environment = dict(os.environ)
        self._proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=self._environment, cwd=Path(__file__).resolve().parents[1])
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            message = json.loads(line)
            with self._lock:
                slot = self._waiting.get(message["id"])
            if slot is not None:
                slot.update(message)
                slot["started" if "pid" in message else "ended"].set()
        with self._lock:                        # the server ended: nobody waits for it in vain
            if self._proc is proc:
                self._proc = self._environment = None       # the next command starts another
            for slot in self._waiting.values():
                slot["lost"] = True
                slot["started"].set()
                slot["ended"].set()

    def close(self):
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)

    def run(self, argv: list[str], env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
        """`python -m trainkit ARGV` as subprocess.run(..., capture_output=True, text=True) would give it."""
        with tempfile.TemporaryDirectory(prefix="trainkit-cli-") as folder:
            slot = {"started": threading.Event(), "ended": threading.Event()}
            with self._lock:
                if self._proc is None:
                    self._start()
                self._next += 1
                ident = self._next
                self._waiting[ident] = slot
                request = {"id": ident, "argv": argv, "env": env, "cwd": str(Path(cwd or os.getcwd()).resolve()),
                           "stdout": f"{folder}/stdout", "stderr": f"{folder}/stderr"}
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                self._proc.stdin.flush()
            try:
                if not slot["started"].wait(120) or "lost" in slot:
                    raise RuntimeError("the tests' trainkit command server stopped answering")
                if not slot["ended"].wait(timeout):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(slot["pid"], signal.SIGKILL)  # the command and what it started
                    slot["ended"].wait(60)                       # reaped, as subprocess.run waits for its child
                    raise subprocess.TimeoutExpired(self._args(argv), timeout, *self._outputs(folder))
                if "lost" in slot:
                    raise RuntimeError("the tests' trainkit command server stopped answering")
                self._wait_for_group(slot["pid"])
                code = os.waitstatus_to_exitcode(slot["status"])
                return subprocess.CompletedProcess(self._args(argv), code, *self._outputs(folder))
            finally:
                with self._lock:
                    self._waiting.pop(ident, None)

    @staticmethod
    def _wait_for_group(pgid: int, seconds: float = 10.0):
        """Until what the command started (a multiprocessing resource tracker, say) has ended too:
        subprocess.run reads the output until every process holding it has closed it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and _live_members(pgid):
            time.sleep(0.02)

    @staticmethod
    def _args(argv):
        return [sys.executable, "-m", "trainkit", *argv]

    @staticmethod
    def _outputs(folder) -> tuple[str, str]:
        # decoded and with universal newlines, as subprocess.run(text=True) gives them
        encoding = locale.getpreferredencoding(False)
        texts = []
        for name in ("stdout", "stderr"):
            path = Path(folder) / name
            data = path.read_bytes() if path.exists() else b""
            texts.append(data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n"))
        return texts[0], texts[1]
