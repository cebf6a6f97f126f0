"""Run `trainkit` commands for the tests the way click's and typer's test runners do: the CLI's
`main(argv)` in the test process, its output captured, its exit code returned.

A real process is started only where the process is the point: a command given a time limit (a
hang or a kill is what the test looks for), or an environment that differs in a variable a module
may have read when it was imported (anything but TRAINKIT_*, which trainkit reads when it uses it).
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback
import warnings

READ_WHEN_USED = ("TRAINKIT_", "PYTEST_CURRENT_TEST")

# The warning filters of a plain `python -m trainkit`: pytest records warnings inside each test,
# where a command run in a process of its own would print them.
PROCESS_FILTERS = list(warnings.filters)


def needs_new_process(env: dict, base: dict | None = None) -> bool:
    """True when `env` differs from `base` (by default this process's environment) in a variable
    that a module may have read when it was imported."""
    base = os.environ if base is None else base
    return any(env.get(k) != base.get(k) for k in set(env) | set(base) if not k.startswith(READ_WHEN_USED))


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _as_a_process(env: dict, cwd):
    """This process's environment, folder, signal handlers, torch threads and warning filters as a
    new process would have them for the command, and as they were again after it."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    import torch     # here, not at the top: conftest sets torch's threads (OMP_NUM_THREADS) before torch loads

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    os.environ.update(env)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings():
            warnings.filters[:] = PROCESS_FILTERS
            warnings.showwarning = _print_warning
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)


def run_in_process(argv: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    """`trainkit ARGV` as main(argv) here; returns what subprocess.run(text=True) would."""
    from trainkit.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _as_a_process(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:          # argparse's --help and usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except Exception:                  # what the interpreter prints for an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    return subprocess.CompletedProcess(["trainkit", *argv], code, out.getvalue(), err.getvalue())


def run_in_new_process(argv: list[str], env: dict, cwd=None, timeout=None) -> subprocess.CompletedProcess:
    """`python -m trainkit ARGV` in a session of its own: past `timeout` it is killed with every
    process it started (DataLoader workers, a server) and TimeoutExpired raised, as subprocess.run does."""
    with subprocess.Popen([sys.executable, "-m", "trainkit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True, env={**os.environ, **env}, cwd=cwd,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
