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

from . import checkpoint as ckpt
from . import distributed
from .callbacks import CheckLog, TensorBoardLogger
from .config import TrainConfig
from .data.dataset import ImageData
from .data.manifest import check_same_data, read_manifest
from .engine import Callback, History, fit
from .errors import TrainkitError
from .experiment import Experiment, build_experiment, training_callbacks, warn_unchecked_data
from .rundir import OWN_NAMES, RunDirectory, default_run_dir, lock_run, prepare, restore


@dataclass
class RunResult:
    history: History
    run_dir: Path | None
    experiment: Experiment = field(repr=False)


def train(cfg: TrainConfig, *, model: nn.Module | None = None, data: ImageData | None = None,
          out: str | Path | None = None, resume: str | Path | None = None,
          callbacks: Sequence[Callback] = (), write: bool = True) -> RunResult:
    """Train as `cfg` says and return the history; with `write`, keep it all in a run directory.

    `callbacks` run beside the ones the settings ask for (shown first: they see each epoch's
    result before the run directory is written). `resume` continues the run in that directory
    from its last checkpoint. Under torchrun only rank 0 shows progress and writes files; it holds
    the run folder's lock (rundir.lock_run) until this returns, so no other process writes there.
    """
    if cfg.mlflow_register and not cfg.mlflow:
        raise TrainkitError("--mlflow-register needs --mlflow (the tracking store whose registry it goes to)")
    # a run made before data.json is resumed on the data as it was read then (experiment.get_data)
    before_manifests = resume is not None and (Path(resume) / "last.pt").is_file() and read_manifest(Path(resume)) is None
    exp = build_experiment(cfg, data=data, model=model, before_manifests=before_manifests)
    main = exp.rank.is_main
    everyone = training_callbacks(cfg)
    own = [cb for cb in callbacks if main or not getattr(cb, "main_process_only", False)]
    run_dir = Path(resume) if resume is not None else (Path(out) if out else default_run_dir()) if write else None
    writers: list[Callback] = []
    resume_state = None
    tracker: list[Callback] = []
    if cfg.mlflow and main:       # after the run directory's writers: it logs the files they wrote
        from .tracking import MLflowLogger
        tracker.append(MLflowLogger(cfg.mlflow, run_dir, register=cfg.mlflow_register))
    held = None     # the run folder's lock, held by the one process that writes it until train returns
    try:
        if resume is not None:
            saved_path = run_dir / "last.pt"
            if main and run_dir.is_dir():   # else load_checkpoint says there is none
                held = lock_run(run_dir)
                ckpt.remove_stale_temporaries(run_dir, OWN_NAMES)
            saved = ckpt.load_checkpoint(saved_path)
            check_same_data(run_dir, exp.data.manifest(), ("train", "val", "test"), "--resume")
            resume_state = restore(exp, saved, str(saved_path), everyone + tracker)
            if before_manifests and main:
                warn_unchecked_data(exp.cfg)
            if main:
                RunDirectory(exp, run_dir).repair(saved)
                RunDirectory(exp, run_dir).record_config()
        elif run_dir is not None and main:
            held = prepare(run_dir)
            (run_dir / "checks.csv").unlink(missing_ok=True)    # a run stopped before its first checkpoint's
            RunDirectory(exp, run_dir).start()
        if run_dir is not None and main:
            writers.append(RunDirectory(exp, run_dir))
            if cfg.evals_per_epoch > 1:
                writers.append(CheckLog(run_dir / "checks.csv"))
            if cfg.tensorboard:
                writers.append(TensorBoardLogger(run_dir / "tensorboard", settings=exp.cfg.to_dict()))
        history = fit(exp.train_model, exp.train_loader, exp.test_loader, exp.optimizer, epochs=cfg.epochs,
                      loss_fn=exp.loss_fn, scheduler=exp.scheduler, scheduler_per_batch=exp.scheduler_per_batch,
                      device=exp.device, amp_dtype=exp.amp_dtype, evals_per_epoch=cfg.evals_per_epoch,
                      val_loader=exp.val_loader,
                      callbacks=everyone + own + writers + tracker, resume=resume_state, tuning=exp.tuning)
    finally:
        if held is not None:
            held.release()
    distributed.barrier()
    return RunResult(history, run_dir, exp)
