"""A training run from a config: build the pieces, train, and keep everything in a run directory.

This is the Python API the CLI and the notebook share:

    cfg = TrainConfig(epochs=2, limit_train=2048)
    result = train(cfg)                 # or train(cfg, model=my_module, data=my_data)
    result.history[-1].test_acc
"""
from __future__ import annotations

import json
import platform
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from . import checkpoint as ckpt
from . import distributed, reports
from .config import TrainConfig, load_config_file, resolve_data_dir, validate
from .datasets import ImageData, load_dataset
from .distributed import Rank
from .engine import History, Logger, StopRequested, autocast_dtype, fit, resolve_device
from .errors import TrainkitError
from .loaders import SeedAugment, TensorLoader, torchvision_loader
from .models import build_model, check_model_name, count_parameters


@dataclass
class Experiment:
    """Everything a config builds: data, model, loaders, optimizer, schedule, loss, device."""

    cfg: TrainConfig
    data: ImageData
    model: nn.Module               # the module whose weights are saved
    train_model: nn.Module         # what is trained (the compiled module under --compile)
    train_loader: object
    test_loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scheduler_per_batch: bool
    loss_fn: Callable
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: Rank = Rank()

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "train_loader": self.train_loader.state_dict()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.train_loader.load_state_dict(state["train_loader"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_data(cfg: TrainConfig, channels: int = 1) -> ImageData:
    data = load_dataset(cfg.dataset, resolve_data_dir(cfg), channels=channels, progress=cfg.progress)
    return data.limit(cfg.limit_train, cfg.limit_test)


def build_experiment(cfg: TrainConfig, *, data: ImageData | None = None,
                     model: nn.Module | None = None) -> Experiment:
    """Build every piece of a run from `cfg`; `data` and `model` replace the configured ones.

    Under torchrun this process joins the group and trains its share with DistributedDataParallel.
    """
    validate(cfg)
    if model is None:
        check_model_name(cfg.model)
    ranks, device = distributed.setup(resolve_device(cfg.device))
    rank, world = ranks.rank, ranks.world
    if cfg.batch_size % world:
        raise TrainkitError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly "
                            f"among the {world} processes")
    seed_everything(cfg.seed)
    if device.type == "cuda":  # same seed, same flags, same numbers: no non-deterministic cuDNN kernels
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    data = data if data is not None else get_data(cfg)
    if model is None:
        model = build_model(cfg.model, in_channels=data.image_shape[0], num_classes=data.num_classes)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = model
    if world > 1:  # DDP starts every rank from rank 0's weights and averages gradients
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    if cfg.pipeline == "tensor":
        augment = SeedAugment() if cfg.augment == "seed" else None
        train_loader = TensorLoader(data.train_images, data.train_labels, cfg.batch_size, mean=data.mean,
                                    std=data.std, device=device, shuffle=True, augment=augment,
                                    seed=cfg.seed, channels_last=cfg.channels_last, rank=rank, world=world)
        test_loader = TensorLoader(data.test_images, data.test_labels, cfg.test_batch_size, mean=data.mean,
                                   std=data.std, device=device, channels_last=cfg.channels_last,
                                   rank=rank, world=world)
    else:
        common = dict(mean=data.mean, std=data.std, seed=cfg.seed, workers=cfg.workers,
                      pin_memory=device.type == "cuda", rank=rank, world=world)
        train_loader = torchvision_loader(data.train_images, data.train_labels, cfg.batch_size,
                                          train=cfg.augment == "seed", **common)
        test_loader = torchvision_loader(data.test_images, data.test_labels, cfg.test_batch_size,
                                         train=False, **common)

    params = model.parameters()
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_batch = cfg.scheduler == "onecycle"
    if cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.scheduler == "onecycle":
        total = cfg.epochs * len(train_loader)
        if total < 3:
            raise TrainkitError(f"--scheduler onecycle needs at least 3 training steps, this run has {total}")
        scheduler = torch.optim.lr_scheduler.OneCycleLR(  # warm up for at least one step
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=min(max(cfg.pct_start, 2 / total), 0.5))
    else:
        scheduler = None

    smoothing = cfg.label_smoothing
    # The models return log-probabilities; cross_entropy of log-probabilities equals nll_loss.
    loss_fn = (lambda out, y: F.cross_entropy(out.float(), y, label_smoothing=smoothing)) if smoothing \
        else (lambda out, y: F.nll_loss(out.float(), y))
    precision = "fp32" if cfg.pipeline == "torchvision" and cfg.precision == "auto" else cfg.precision
    return Experiment(cfg, data, model, train_model, train_loader, test_loader, optimizer, scheduler,
                      per_batch, loss_fn, device, autocast_dtype(precision, device), ranks)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def environment(exp: Experiment) -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform(), "device": str(exp.device),
            "device_name": torch.cuda.get_device_name(exp.device) if exp.device.type == "cuda" else _cpu_name(),
            "autocast": str(exp.amp_dtype).replace("torch.", "") if exp.amp_dtype else "fp32",
            "threads": torch.get_num_threads()}


def data_info(data: ImageData) -> dict:
    return {"name": data.name, "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
            "image_shape": list(data.image_shape), "train_size": len(data.train_labels),
            "test_size": len(data.test_labels)}


@dataclass
class RunResult:
    history: History
    run_dir: Path | None
    experiment: Experiment = field(repr=False)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _prepare_run_dir(path: Path) -> Path:
    if (path / "last.pt").exists():
        raise TrainkitError(f"{path} already holds a run; continue it with --resume {path}, or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(path)
        ckpt.atomic_write_text(path / ".write-test", "")
        (path / ".write-test").unlink()
    except OSError as exc:
        raise TrainkitError(f"cannot write to the run directory {path}: {exc.strerror}") from None
    return path


def checkpoint_state(exp: Experiment, history: History, partial: dict | None = None) -> dict:
    """Everything needed to continue: weights, optimizer, schedule, every RNG, history, config.

    `partial` is the progress of an epoch stopped part way (by a signal), else None.
    """
    return {"format": ckpt.FORMAT, "epoch": len(history), "partial": partial, "config": exp.cfg.to_dict(),
            "model_name": type(exp.model).__name__, "model": exp.model.state_dict(),
            "optimizer": exp.optimizer.state_dict(),
            "scheduler": exp.scheduler.state_dict() if exp.scheduler is not None else None,
            "rng": exp.rng_state(), "history": history.rows()}


def restore(exp: Experiment, state: dict, source: str) -> tuple[History, dict | None]:
    ckpt.load_weights_into(exp.model, state["model"], source)
    try:
        exp.optimizer.load_state_dict(state["optimizer"])
        if exp.scheduler is not None:
            exp.scheduler.load_state_dict(state["scheduler"])
        exp.set_rng_state(state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise TrainkitError(f"{source} does not match this run's optimizer or schedule ({exc})") from None
    return History.from_rows(state["history"]), state.get("partial")


class RunWriter:
    """Writes what a run leaves behind, after each epoch and at the end."""

    def __init__(self, exp: Experiment, run_dir: Path, history: History | None = None):
        self.exp, self.dir = exp, run_dir
        self.history = History(history or [])  # the finished epochs, as saved in last.pt
        self.tensorboard = None
        if exp.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainkitError("--tensorboard needs the tensorboard package: pip install trainkit[tensorboard]") from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def _guard(self, what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            last = self.dir / "last.pt"
            kept = f"; the last good checkpoint is {last}" if last.exists() else ""
            raise TrainkitError(f"could not write {what} in {self.dir}: {exc.strerror or exc}{kept}") from None

    def start(self) -> None:
        cfg = {"config": self.exp.cfg.to_dict(), "environment": environment(self.exp),
               "data": data_info(self.exp.data), "parameters": count_parameters(self.exp.model)}
        self._guard("config.json", lambda: ckpt.atomic_write_text(self.dir / "config.json", json.dumps(cfg, indent=2)))
        loader = self.exp.train_loader
        state = loader.state_dict()  # drawing the samples must not change what training sees
        self._guard("samples.png", lambda: reports.plot_samples(loader, self.exp.data.classes, self.exp.data.mean,
                                                                self.exp.data.std, self.dir / "samples.png"))
        loader.load_state_dict(state)

    def save_partial(self, partial: dict) -> None:
        """A checkpoint in the middle of an epoch, written when a signal stops the run."""
        state = checkpoint_state(self.exp, self.history, partial)
        self._guard("last.pt", lambda: ckpt.atomic_torch_save(state, self.dir / "last.pt"))

    def epoch_end(self, history: History) -> None:
        self.history = History(history)
        state = checkpoint_state(self.exp, history)
        self._guard("last.pt", lambda: ckpt.atomic_torch_save(state, self.dir / "last.pt"))
        if history[-1].test_acc >= history.best_acc:
            self._guard("best.pt", lambda: ckpt.atomic_torch_save(state, self.dir / "best.pt"))
        self._guard("metrics.csv", lambda: ckpt.atomic_write_text(self.dir / "metrics.csv",
                                                                   reports.metrics_csv(history)))
        if self.tensorboard is not None:
            r = history[-1]
            for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
                self.tensorboard.add_scalar(key, getattr(r, key), r.epoch)
            self.tensorboard.flush()

    def finish(self, history: History) -> list[Path]:
        exp, data = self.exp, self.exp.data
        loader = TensorLoader(data.test_images, data.test_labels, exp.cfg.test_batch_size, mean=data.mean,
                              std=data.std, device=exp.device)  # the whole test set, on every rank count
        out, labels, losses, images = reports.predictions(exp.model, loader, exp.device)
        matrix = reports.confusion_matrix(out.argmax(1), labels, exp.data.num_classes)
        summary = render_summary(exp, history, matrix)

        def write_all():
            ckpt.save_weights(exp.model, self.dir / "model.pt")
            reports.plot_history(history, self.dir / "plot.png")
            reports.plot_confusion(matrix, exp.data.classes, self.dir / "confusion.png")
            reports.plot_mistakes(images, out, labels, losses, exp.data.classes, exp.data.mean,
                                  exp.data.std, self.dir / "mistakes.png")
            ckpt.atomic_write_text(self.dir / "summary.txt", summary)

        self._guard("the final reports", write_all)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return [self.dir / name for name in ("config.json", "metrics.csv", "plot.png", "samples.png",
                                             "confusion.png", "mistakes.png", "model.pt", "summary.txt",
                                             "last.pt", "best.pt")]


def render_summary(exp: Experiment, history: History, matrix: torch.Tensor) -> str:
    table = str(reports.model_summary(exp.model, exp.data.image_shape))
    per_class = reports.per_class_accuracy(matrix)
    lines = [table, "", f"Dataset: {exp.data.name} ({len(exp.data.train_labels)} train, "
             f"{len(exp.data.test_labels)} test images)", ""]
    if history:
        last = history[-1]
        lines += [f"Epochs: {len(history)}, {sum(r.seconds for r in history):.1f} s",
                  f"Final: train accuracy {last.train_acc:.2f}%, test accuracy {last.test_acc:.2f}% "
                  f"({last.test_correct}/{last.test_total}), best {history.best_acc:.2f}%", ""]
    lines.append("Per-class test accuracy:")
    lines += [f"  {name:>12}: {acc:6.2f}%" for name, acc in zip(exp.data.classes, per_class)]
    return "\n".join(lines) + "\n"


def load_resume_config(run_dir: Path, overrides: dict) -> TrainConfig:
    """The saved config of a run, checked against flags given again with --resume."""
    from .config import from_mapping

    if not (run_dir / "last.pt").is_file():
        raise TrainkitError(f"{run_dir} holds no checkpoint (last.pt) to resume from")
    saved = from_mapping(load_config_file(run_dir / "config.json"))
    may_change = {"progress", "workers", "device", "tensorboard"}
    for name, value in overrides.items():
        if name not in may_change and getattr(saved, name) != value:
            raise TrainkitError(f"--{name.replace('_', '-')} {value} contradicts the run being resumed "
                                f"({getattr(saved, name)}); leave it out to resume with the saved settings")
    return saved.replace(**{k: v for k, v in overrides.items() if k in may_change})


def train(cfg: TrainConfig, *, model: nn.Module | None = None, data: ImageData | None = None,
          out: str | Path | None = None, resume: str | Path | None = None, logger: Logger | None = None,
          should_stop: Callable[[], bool] | None = None, write: bool = True) -> RunResult:
    """Train as `cfg` says and return the history; with `write`, keep it all in a run directory.

    `resume` continues the run in that directory from its last checkpoint.
    """
    exp = build_experiment(cfg, data=data, model=model)
    main = exp.rank.is_main             # under torchrun only rank 0 shows progress and writes files
    logger = logger if main else None
    run_dir = None
    history, partial = History(), None
    writer = None
    if resume is not None:
        run_dir = Path(resume)
        if main:
            ckpt.remove_stale_temporaries(run_dir)
        history, partial = restore(exp, ckpt.load_checkpoint(run_dir / "last.pt"), str(run_dir / "last.pt"))
        writer = RunWriter(exp, run_dir, history) if main else None
    elif write:
        run_dir = Path(out) if out else default_run_dir()
        if main:
            writer = RunWriter(exp, _prepare_run_dir(run_dir))
            writer.start()
    try:
        history = fit(exp.train_model, exp.train_loader, exp.test_loader, exp.optimizer, epochs=cfg.epochs,
                      loss_fn=exp.loss_fn, scheduler=exp.scheduler, scheduler_per_batch=exp.scheduler_per_batch,
                      device=exp.device, amp_dtype=exp.amp_dtype, logger=logger, history=history,
                      target_acc=cfg.target_acc, patience=cfg.patience, evals_per_epoch=cfg.evals_per_epoch,
                      partial=partial,
                      on_epoch_end=writer.epoch_end if writer else None,
                      should_stop=should_stop)
    except StopRequested as stop:
        # Under torchrun the ranks stop at different steps, so only finished epochs are kept.
        if writer is not None and exp.rank.world == 1:
            writer.save_partial(stop.partial)
        raise
    if writer is not None:
        writer.finish(history)
    distributed.barrier()
    return RunResult(history, run_dir, exp)
