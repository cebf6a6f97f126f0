"""Logging a run to MLflow (`trainkit train --mlflow [URI]`, extra `trainkit[mlflow]`).

    train(cfg, callbacks=[MLflowLogger("sqlite:///mlflow.db", run_dir)])

Every setting is a param; every epoch's numbers are metrics at step = epoch, and every mid-epoch
check is a `check_<split>_acc/loss` metric at step = the global batch; at the end the run folder's
plots, metrics.csv, config.json and summary.txt are artifacts and the model is an MLflow PyTorch
model with its input signature. A resumed run continues the same MLflow run (its id is saved in
last.pt). A tracking failure warns once on stderr; training goes on without MLflow.
"""
from __future__ import annotations

import copy
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from .engine import Callback, TrainState, unwrap
from .errors import TrainkitError

DEFAULT = "auto"            # what `--mlflow` with no value stores: $MLFLOW_TRACKING_URI, else ./mlflow.db
EXPERIMENT = "trainkit"
ARTIFACTS = ("plot.png", "confusion.png", "mistakes.png", "samples.png", "metrics.csv", "config.json", "summary.txt")


def resolve_uri(uri: str | None) -> str:
    """`auto`: $MLFLOW_TRACKING_URI, else a SQLite database mlflow.db in the current folder (beside runs/)."""
    if uri in (None, "", DEFAULT):
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()


def sqlite_problem(uri: str) -> str | None:
    """Why a sqlite:/// tracking URI cannot be written, found at once (None when it can, or for
    other URIs): MLflow itself retries a database it cannot open for about 100 s."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):].split("?")[0])
    import errno
    import stat
    import tempfile

    folder = path.parent
    try:
        if path.exists():
            if not stat.S_ISREG(path.stat().st_mode):
                return f"{path} is not a regular file"
            with open(path, "r+b") as f:          # the database itself must be writable
                head = f.read(16)
            if head and head != b"SQLite format 3\0":
                return f"{path} is not an SQLite database"
        elif not folder.is_dir():
            return None                            # MLflow makes the folders of a new database
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".trainkit-probe-")   # and its folder (the journal)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror)
        return f"cannot write the SQLite database {path}: {reason}"
    return None


def code_version() -> str:
    """The git commit of trainkit's source (with `-dirty` for uncommitted changes), else its version."""
    try:
        commit = _git("rev-parse", "HEAD")
        if commit:
            return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no", "--", "trainkit") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"trainkit {version('trainkit')}"
    except PackageNotFoundError:
        return "unknown"


class MLflowLogger(Callback):
    """Logs the run to an MLflow tracking store; see the module's docstring."""

    main_process_only = True     # under torchrun, rank 0 alone logs

    def __init__(self, uri: str | None = None, run_dir: Path | None = None, experiment: str = EXPERIMENT):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrainkitError("--mlflow needs the mlflow package: pip install trainkit[mlflow]") from None
        # A tracking server that does not answer should cost seconds, not minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_dir, self.experiment = resolve_uri(uri), run_dir, experiment
        self.run_id: str | None = None
        self.failed = False
        self.client = None

    # -- every MLflow call goes through here: a failure warns once and logging stops ----------
    def _safe(self, what: str, call) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as exc:  # any tracking failure (network, store, disk) must not stop training
            self.failed = True
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            print(f"trainkit: warning: MLflow logging failed ({what}: {reason}); training goes on without it",
                  file=sys.stderr, flush=True)

    def on_fit_start(self, state: TrainState) -> None:
        self._safe("starting the run", lambda: self._start(state))

    def _start(self, state: TrainState) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        problem = sqlite_problem(self.uri)
        if problem:       # MLflow would retry for about 100 s, logging each attempt
            raise RuntimeError(problem)
        self.client = client = MlflowClient(self.uri)
        if self.run_id is not None:             # a resumed run: the same MLflow run goes on
            client.update_run(self.run_id, status="RUNNING")
            return
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        tags = {"mlflow.source.git.commit": code_version(), "host": platform.node(),
                "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                "device": str(state.device), "torch": torch.__version__, "python": platform.python_version()}
        if self.run_dir is not None:
            tags["run_dir"] = str(Path(self.run_dir).resolve())
        run = client.create_run(experiment_id, run_name=Path(self.run_dir).name if self.run_dir else None, tags=tags)
        self.run_id = run.info.run_id
        client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in self._settings().items()],
                         tags=[RunTag("mlflow.runName", run.info.run_name)])

    def _settings(self) -> dict:
        import json
        if self.run_dir is not None and (Path(self.run_dir) / "config.json").is_file():
            return json.loads((Path(self.run_dir) / "config.json").read_text())["config"]
        return {}

    def _metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                                    if v is not None])

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        if e.after_batch is not None and self.run_id:
            step = (e.epoch - 1) * state.num_batches + e.after_batch
            self._safe("a mid-epoch check", lambda: self._metrics(
                {f"check_{e.split}_acc": e.acc, f"check_{e.split}_loss": e.loss}, step))

    def on_epoch_end(self, state: TrainState) -> None:
        r = state.result
        keys = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "seconds")
        if self.run_id:
            self._safe("an epoch's metrics", lambda: self._metrics({k: getattr(r, k) for k in keys}, r.epoch))

    def on_fit_end(self, state: TrainState) -> None:
        if not self.run_id:
            return
        if state.interrupted:
            self._safe("ending the run", lambda: self.client.set_terminated(self.run_id, "KILLED"))
            return
        last = state.history[-1] if state.history else None
        if last is not None and last.val_acc is not None and last.test_acc is not None:  # the final test
            self._safe("the test metrics", lambda: self._metrics(
                {"test_acc": last.test_acc, "test_loss": last.test_loss}, last.epoch))
        self._safe("the artifacts and the model", lambda: self._finish(state))

    def _finish(self, state: TrainState) -> None:
        import mlflow
        from mlflow.models import infer_signature

        if self.run_dir is not None:
            for name in ARTIFACTS:
                if (Path(self.run_dir) / name).is_file():
                    self.client.log_artifact(self.run_id, str(Path(self.run_dir) / name))
        model = copy.deepcopy(unwrap(state.eval_model or state.model)).cpu().float().eval()
        loader = state.val_loader if state.val_loader is not None else state.test_loader
        x, _ = next(iter(loader))
        sample = x[:4].detach().cpu().float().contiguous()
        with torch.no_grad():
            output = model(sample)
        signature = infer_signature(sample.numpy(), output.numpy())
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():     # ends the run FINISHED
            warnings.simplefilter("ignore")
            logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)   # its note on pickling, every run
            # pickled, not torch.export's "pt2": an exported program is fixed to the sample's batch size
            mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "uri": self.uri} if self.run_id else {}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")
        self.uri = state.get("uri", self.uri)
