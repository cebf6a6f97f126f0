"""A training run from a config: the Python API that the CLI and the notebook share.

    cfg = TrainConfig(epochs=2, limit_train=2048)
    result = train(cfg)                 # or train(cfg, model=my_module, data=my_data, callbacks=[...])
    result.history[-1].test_acc
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from ..config import TrainConfig
from ..data.dataset import ImageData
from ..errors import TrainkitError
from ..loop import distributed
from ..loop.engine import Callback, History, fit
from .assembly import Run, build_run
from .resume import predates_manifests, resume_run
from .rundir import RunDirectory, default_run_dir, prepare


@dataclass
class RunResult:
    history: History
    run_dir: Path | None
    run: Run = field(repr=False)


def train(cfg: TrainConfig, *, model: nn.Module | None = None, data: ImageData | None = None,
          out: str | Path | None = None, resume: str | Path | None = None,
          callbacks: Sequence[Callback] = (), write: bool = True, console: bool = False,
          signals: bool = False) -> RunResult:
    """Train as `cfg` says and return the history; with `write`, keep it all in a run directory.

    `callbacks` run beside the ones the settings ask for, where assembly.built_in_callbacks puts them (they
    see each epoch's result before the run directory is written). `console`: the CLI's lines and
    progress bar; `signals`: SIGINT/SIGTERM interrupt the run with a checkpoint. `resume` continues
    the run in that directory from its last checkpoint. Under torchrun only rank 0 shows progress
    and writes files; it holds the run folder's lock (rundir.lock_run) until this returns, so no
    other process writes there.
    """
    if cfg.mlflow_register is not None and not cfg.mlflow_register.strip():
        raise TrainkitError("--mlflow-register needs a model name (MLflow's registry cannot hold a model "
                            "without one); give one, or leave --mlflow-register out")
    if cfg.mlflow_register and not cfg.mlflow:
        raise TrainkitError("--mlflow-register needs --mlflow (the tracking store whose registry it goes to)")
    run_dir = Path(resume) if resume is not None else (Path(out) if out else default_run_dir()) if write else None
    before_manifests = resume is not None and predates_manifests(run_dir)
    run = build_run(cfg, data=data, model=model, callbacks=callbacks, run_dir=run_dir, console=console,
                    signals=signals, before_manifests=before_manifests)
    held = None     # the run folder's lock, held by the one process that writes it until train returns
    try:
        if resume is not None:
            held = resume_run(run, before_manifests)
        elif run.callback(RunDirectory) is not None:
            held = prepare(run_dir)
            (run_dir / "checks.csv").unlink(missing_ok=True)    # a run stopped before its first checkpoint's
            run.callback(RunDirectory).start()
        history = fit(run)
    finally:
        if held is not None:
            held.release()
    distributed.barrier()
    return RunResult(history, run_dir, run)
