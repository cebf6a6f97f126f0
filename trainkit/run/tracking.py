"""Logging a run to MLflow (`trainkit train --mlflow [URI]`, extra `trainkit[mlflow]`).

    train(cfg, callbacks=[MLflowLogger("sqlite:///mlflow.db", run_dir)])

Every setting is a param and the data a dataset input (data.json's digest); every epoch's numbers
are metrics at step = epoch, and every mid-epoch check is a `check_<split>_acc/loss` metric at step =
the global batch; at the end the run folder's plots, metrics.csv, checks.csv, config.json, data.json
and summary.txt are artifacts, and the model is an MLflow ONNX model, with the run's final numbers
on it, that needs neither trainkit nor torch to load (`mlflow_model`):

    mlflow.pyfunc.load_model(uri).predict(images)["probabilities"]    # images: float32 (N, C, H, W) in [0, 1]

The normalisation is inside it, its output is the class probabilities, and its MLmodel metadata says
so (with the classes); `--mlflow-register NAME` also registers it in the model registry. A resumed
run continues the same MLflow run (its id is saved in last.pt). A tracking failure warns once on
stderr; training goes on without MLflow.
"""
from __future__ import annotations

import copy
import getpass
import io
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TrainkitError
from ..loop.engine import Callback, TrainState, unwrap

DEFAULT = "auto"            # what `--mlflow` with no value stores: $MLFLOW_TRACKING_URI, else ./mlflow.db
EXPERIMENT = "trainkit"
ARTIFACTS = ("plot.png", "confusion.png", "mistakes.png", "samples.png", "metrics.csv", "checks.csv", "config.json",
             "data.json", "summary.txt")
# The numbers shown on the logged model (MLflow 3's model page): the last epoch's, and the final test
FINAL = ("test_acc", "test_loss", "val_acc", "val_loss", "train_acc", "train_loss")
# MLflow's own INFO lines when it opens a store (creating or upgrading the database's tables): said on
# stderr in the middle of the run's lines on stdout, and of no use to a user
SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic")


def resolve_uri(uri: str | None) -> str:
    """`auto`: $MLFLOW_TRACKING_URI, else a SQLite database mlflow.db in the current folder (beside runs/)."""
    if uri in (None, "", DEFAULT):
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[2]
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


class Probabilities(nn.Module):
    """A trained network as a user outside trainkit calls it: images (N, C, H, W), float in [0, 1]
    -> class probabilities (N, classes). Softmax turns logits and log-probabilities alike into them."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((images - self.mean) / self.std).float(), dim=1)


def dataset_entity(run_dir: Path, settings: dict):
    """The run's data as an MLflow dataset input: its name, a digest of data.json (which records
    every file's size and checksum and each split's images), where it was read, and its splits'
    sizes; None when the run folder has no data.json."""
    import hashlib

    from mlflow.entities import Dataset

    try:
        record = json.loads((Path(run_dir) / "data.json").read_text())
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    splits = {name: part.get("count") for name, part in record.get("splits", {}).items() if isinstance(part, dict)}
    where = settings.get("data_dir") or ""
    return Dataset(name=str(record.get("dataset") or settings.get("dataset", "data")), digest=digest,
                   source_type="local", source=json.dumps({"uri": str(Path(where).resolve()) if where else ""}),
                   profile=json.dumps({"images": splits}))


def model_metadata(data: dict, dataset: str) -> dict:
    """What a caller of the MLflow model needs to know, from config.json's "data" section."""
    c, h, w = data["image_shape"]
    return {"input": f"float32 array (N, {c}, {h}, {w}): pixel / 255, in [0, 1]",
            "color": "grayscale" if c == 1 else "RGB", "image_shape": [c, h, w],
            "normalization": "inside the model: (x - mean) / std, per channel",
            "mean": list(data["mean"]), "std": list(data["std"]),
            "output": "probabilities", "output_name": "probabilities", "classes": [str(k) for k in data["classes"]],
            "dataset": dataset, "framework": "trainkit"}


def onnx_bytes(wrapped: Probabilities, example: torch.Tensor) -> bytes:
    """The network with its normalisation and softmax, as ONNX with a variable batch size."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), buffer, input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


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


def _source() -> str:
    """"trainkit train" from the CLI, else the script (or notebook kernel) that called train()."""
    if Path(sys.argv[0]).name in ("trainkit", "__main__.py"):
        return " ".join(["trainkit", *sys.argv[1:2]])
    return Path(sys.argv[0]).name or "python"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):     # a container's uid with no passwd entry
        return os.environ.get("USER", "unknown")


class MLflowLogger(Callback):
    """Logs the run to an MLflow tracking store; see the module's docstring."""

    main_process_only = True     # under torchrun, rank 0 alone logs

    def __init__(self, uri: str | None = None, run_dir: Path | None = None, experiment: str = EXPERIMENT,
                 register: str | None = None):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrainkitError("--mlflow needs the mlflow package: pip install trainkit[mlflow]") from None
        # A tracking server that does not answer should cost seconds, not minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_dir, self.experiment = resolve_uri(uri), run_dir, experiment
        self.register = register
        self.run_id: str | None = None
        self.failed = False
        self.client = None
        self.latest: dict = {}          # each metric's latest (value, timestamp, step), for the model

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
        for name in SETUP_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = client = MlflowClient(self.uri)
        if self.run_id is not None:             # a resumed run: the same MLflow run goes on
            client.update_run(self.run_id, status="RUNNING")
            return
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        tags = {"mlflow.source.git.commit": code_version(), "host": platform.node(),
                "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                "device": str(state.device), "torch": torch.__version__, "python": platform.python_version(),
                # the UI's "Source" and "Created by"
                "mlflow.source.name": _source(), "mlflow.source.type": "LOCAL", "mlflow.user": _user()}
        if self.run_dir is not None:
            tags["run_dir"] = str(Path(self.run_dir).resolve())
        run = client.create_run(experiment_id, run_name=Path(self.run_dir).name if self.run_dir else None, tags=tags)
        self.run_id = run.info.run_id
        client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in self._settings().items()],
                         tags=[RunTag("mlflow.runName", run.info.run_name)])
        dataset = dataset_entity(self.run_dir, self._saved().get("config", {})) if self.run_dir else None
        if dataset is not None:
            from mlflow.entities import DatasetInput, InputTag
            client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def _settings(self) -> dict:
        settings = self._saved().get("config", {})
        return {**settings, "mlflow": self.uri} if settings else {}    # the store it went to, not "auto"

    def _saved(self) -> dict:
        if self.run_dir is not None and (Path(self.run_dir) / "config.json").is_file():
            return json.loads((Path(self.run_dir) / "config.json").read_text())
        return {}

    def _metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.latest.update({m.key: m for m in metrics})

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
        if self.run_dir is not None:
            for name in ARTIFACTS:
                if (Path(self.run_dir) / name).is_file():
                    self.client.log_artifact(self.run_id, str(Path(self.run_dir) / name))
        saved = self._saved()
        if "data" not in saved:       # no run folder: nothing says how the model's input is made
            self.client.set_terminated(self.run_id)
            return
        self.mlflow_model(state, saved)

    def mlflow_model(self, state: TrainState, saved: dict) -> None:
        """Log the model as ONNX (mlflow.onnx: loads with onnxruntime, no trainkit, no torch)."""
        import mlflow
        import onnx
        from mlflow.models import ModelSignature, infer_signature

        from ..data.loaders import denormalize

        data = saved["data"]
        loader = state.val_loader if state.val_loader is not None else state.test_loader
        x, _ = next(iter(loader))
        # the loader's batches are normalised; the model takes pixel / 255
        example = denormalize(x[:4].detach().cpu().float(), data["mean"], data["std"]).contiguous()
        model = copy.deepcopy(unwrap(state.eval_model or state.model)).cpu().float().eval()
        wrapped = Probabilities(model, data["mean"], data["std"]).eval()
        proto = onnx.load_from_string(onnx_bytes(wrapped, example))
        metadata = model_metadata(data, saved.get("config", {}).get("dataset", ""))
        for key, value in metadata.items():      # also in the .onnx file, for onnxruntime users
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"trainkit.{key}", json.dumps(value)
        with torch.no_grad():
            output = wrapped(example).numpy()
        # The outputs only: an input schema makes MLflow refuse a float64 or uint8 batch with a dump of
        # the whole array. Without one, float64 is cast to float32 (mlflow.onnx does it) and uint8 is
        # refused by ONNX Runtime in one line ("Unexpected input data type. Actual: (tensor(uint8))");
        # the input's shape and scale are in the metadata and the input example.
        signature = ModelSignature(outputs=infer_signature(example.numpy(), {"probabilities": output}).outputs)
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():     # ends the run FINISHED
            warnings.simplefilter("ignore")
            for name in ("mlflow.models.model", "mlflow.store.model_registry", "mlflow.tracking._model_registry"):
                logging.getLogger(name).setLevel(logging.WARNING)     # its lines on every registration
            # CPU alone: MLflow's default asks for CUDA first, and warns on every load where it is missing
            info = mlflow.onnx.log_model(proto, name="model", signature=signature, input_example=example[:1].numpy(),
                                         metadata=metadata, registered_model_name=self.register,
                                         save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"])
            self.final_metrics_on(info.model_id, state.history[-1].epoch)

    def final_metrics_on(self, model_id: str, epoch: int) -> None:
        """The run's final numbers on the logged model too: the same metric entries (value, time,
        step) as the run's, so its history gains nothing."""
        from mlflow.entities import Metric

        final = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=self.run_id)
                 for key, m in self.latest.items() if key in FINAL and m.step == epoch]
        self.client.log_batch(self.run_id, metrics=final)

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "uri": self.uri} if self.run_id else {}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")
        self.uri = state.get("uri", self.uri)
