"""The training loop: works with any nn.Module, loaders, optimizer, scheduler and loss.

`fit` returns a History of numbers; it shows nothing itself. What is shown (progress bars,
the seed's lines) is the job of a `Logger`, see reports.ConsoleLogger.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .errors import TrainkitError


@dataclass
class EpochResult:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float          # percent
    train_seen: int           # training images used this epoch, over all ranks
    test_loss: float
    test_acc: float           # percent
    test_correct: int
    test_total: int
    seconds: float            # wall time of the epoch: training and evaluation


class History(list):
    """The per-epoch results of a run, in order."""

    columns = [f.name for f in fields(EpochResult)]

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self]

    @property
    def best_acc(self) -> float:
        return max((r.test_acc for r in self), default=0.0)

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "History":
        return cls(EpochResult(**row) for row in rows)


class Logger:
    """Hooks the engine calls as it goes; the default shows nothing."""

    def epoch_start(self, epoch: int, lrs: list[float]) -> None: ...
    def wrap_batches(self, batches, total: int, initial: int = 0) -> Iterable: return batches
    def batch_end(self, bar, batch_id: int, loss: float, acc: float) -> None: ...
    def check_end(self, epoch: int, batch_id: int, total_batches: int,
                  loss: float, correct: int, total: int) -> None: ...
    def epoch_end(self, result: EpochResult) -> None: ...


class NonFiniteLoss(TrainkitError):
    def __init__(self, epoch: int, batch: int, value: float):
        super().__init__(f"the training loss became {value} in epoch {epoch}, batch {batch}", exit_code=3)
        self.epoch, self.batch = epoch, batch


class StopRequested(Exception):
    """Raised between two steps when `should_stop()` says so (a signal arrived).

    `partial` holds the unfinished epoch's progress, so a checkpoint can continue it exactly.
    """

    def __init__(self, partial: dict):
        super().__init__("stop requested")
        self.partial = partial


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainkitError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainkitError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainkitError("--device mps was asked for but MPS is not available here; use --device cpu")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "bf16":
        if not bf16_supported(device):
            raise TrainkitError(f"--precision bf16 is not supported on {device}; use --precision fp32")
        return torch.bfloat16
    # auto: bf16 where it is faster. On CUDA it is; on the 2-core AVX-512 CPU we measured, bf16
    # autocast made an S5Net step slower (0.79 s against 0.54 s in fp32), so CPUs stay in fp32.
    if precision == "auto" and device.type == "cuda" and bf16_supported(device):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks when running distributed; itself otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    *, device: torch.device, epoch: int = 1, amp_dtype: torch.dtype | None = None,
                    batch_scheduler=None, logger: Logger | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    resume_from: dict | None = None,
                    check: Callable[[int], bool] | None = None,
                    check_after: frozenset[int] = frozenset()) -> tuple[float, float, int]:
    """One pass over `loader`; returns (mean loss, accuracy in percent, images seen).

    `resume_from` continues an epoch that was stopped part way (see StopRequested): the loader
    then yields only the batches that were not trained yet. After each batch in `check_after`,
    `check(batch_id)` runs (a mid-epoch evaluation); when it returns True the epoch ends there.
    """
    logger = logger or Logger()
    model.train()
    first = resume_from["batches"] if resume_from else 0
    sums = torch.tensor(resume_from["sums"] if resume_from else [0.0, 0.0, 0.0], dtype=torch.float64)  # loss*n, correct, n
    bar = logger.wrap_batches(loader, len(loader), initial=first)
    for batch_id, (x, y) in enumerate(bar, start=first):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            out = model(x)
            loss = loss_fn(out, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(epoch, batch_id, loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        n = y.shape[0]
        sums += torch.tensor([loss_value * n, (out.argmax(1) == y).sum().item(), n], dtype=torch.float64)
        logger.batch_end(bar, batch_id, loss_value, 100.0 * sums[1].item() / sums[2].item())
        if check is not None and batch_id in check_after and check(batch_id):
            break
        if should_stop is not None and should_stop() and batch_id + 1 < len(loader):
            raise StopRequested({"epoch": epoch, "batches": batch_id + 1, "sums": sums.tolist()})
    if check_after and hasattr(bar, "close"):
        bar.close()             # a bar left by `break` would otherwise stay open until collected
    sums = _all_reduce(sums.to(device)).cpu()
    return sums[0].item() / sums[2].item(), 100.0 * sums[1].item() / sums[2].item(), int(sums[2].item())


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> tuple[float, int, int]:
    """Mean negative log-likelihood, correct and total over `loader` (model outputs log-probabilities)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        sums[0] += F.nll_loss(out, y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += y.shape[0]
    loss, correct, total = _all_reduce(sums).tolist()
    return loss / max(total, 1), int(correct), int(total)


def fit(model: nn.Module, train_loader, test_loader, optimizer: torch.optim.Optimizer, *,
        epochs: int, loss_fn: Callable = F.nll_loss, scheduler=None, scheduler_per_batch: bool = False,
        device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
        logger: Logger | None = None, history: History | None = None,
        target_acc: float | None = None, patience: int | None = None, evals_per_epoch: int = 1,
        on_epoch_end: Callable[[History], None] | None = None,
        should_stop: Callable[[], bool] | None = None, partial: dict | None = None) -> History:
    """Train for `epochs` epochs (continuing after `history`, if given) and return the history.

    Stops early when test accuracy reaches `target_acc`, or has not improved for `patience`
    epochs. With `evals_per_epoch` > 1 the test set is also evaluated at evenly spaced steps
    inside each epoch, and an epoch whose check reaches `target_acc` ends there: its result
    then covers the images trained so far (`train_seen`). `on_epoch_end(history)` runs after
    each epoch (checkpoints are written there).
    When `should_stop()` turns true the loop raises StopRequested at the next step; its
    `partial`, given back here, continues that epoch where it stopped.
    """
    device = torch.device(device)
    logger = logger or Logger()
    history = History(history or [])
    check_after = check_points(len(train_loader), evals_per_epoch)
    for epoch in range(len(history) + 1, epochs + 1):
        if _should_end(history, target_acc, patience):
            break
        resume_from = partial if partial and partial["epoch"] == epoch else None
        lrs = resume_from["lrs"] if resume_from else [group["lr"] for group in optimizer.param_groups]
        logger.epoch_start(epoch, lrs)
        start = time.perf_counter() - (resume_from["seconds"] if resume_from else 0.0)
        reached = []

        def check(batch_id: int, epoch=epoch) -> bool:
            loss, correct, total = evaluate(model, test_loader, device=device, amp_dtype=amp_dtype)
            model.train()
            logger.check_end(epoch, batch_id, len(train_loader), loss, correct, total)
            if target_acc is not None and 100.0 * correct / max(total, 1) >= target_acc:
                reached.append((loss, correct, total))
                return True
            return False

        try:
            train_loss, train_acc, seen = train_one_epoch(
                model, train_loader, optimizer, loss_fn, device=device, epoch=epoch, amp_dtype=amp_dtype,
                batch_scheduler=scheduler if scheduler_per_batch else None, logger=logger,
                should_stop=should_stop, resume_from=resume_from, check=check, check_after=check_after)
        except StopRequested as stop:
            stop.partial.update(lrs=lrs, seconds=time.perf_counter() - start)
            raise
        if reached:
            test_loss, correct, total = reached[0]
        else:
            test_loss, correct, total = evaluate(model, test_loader, device=device, amp_dtype=amp_dtype)
        if scheduler is not None and not scheduler_per_batch:
            scheduler.step()
        result = EpochResult(epoch, lrs[0], train_loss, train_acc, seen, test_loss,
                             100.0 * correct / max(total, 1), correct, total,
                             time.perf_counter() - start)
        history.append(result)
        logger.epoch_end(result)
        if on_epoch_end is not None:
            on_epoch_end(history)
    return history


def check_points(batches: int, evals_per_epoch: int) -> frozenset[int]:
    """The batch indices after which an epoch of `batches` steps is evaluated mid-way.

    `evals_per_epoch` evaluations split the epoch evenly; the last is the usual one at its end,
    so it is not among these.
    """
    evals = min(evals_per_epoch, batches)
    return frozenset(batches * k // evals - 1 for k in range(1, evals))


def _should_end(history: History, target_acc: float | None, patience: int | None) -> bool:
    if not history:
        return False
    if target_acc is not None and history[-1].test_acc >= target_acc:
        return True
    if patience is not None:
        best_epoch = max(history, key=lambda r: r.test_acc).epoch
        return history[-1].epoch - best_epoch >= patience
    return False
