"""The training loop: works with any nn.Module, loaders, optimizer, scheduler and loss.

`fit` trains and returns a History of numbers. Everything else that happens during a run is
a `Callback` that the loop calls at fixed points with one `TrainState`: the console lines and
progress bar, checkpoints, early stopping, gradient clipping, an average of the weights, ...

    on_fit_start
      on_epoch_start
        (per batch: forward, loss, backward) on_after_backward (optimizer step) on_batch_end
        on_evaluate                  after each mid-epoch check, and after the epoch's own evaluation
      on_epoch_end                   state.result holds the epoch's EpochResult
    on_train_end                     after the last epoch (not when interrupted), before a validation
                                     split's final test: BestWeights puts the best epoch's weights back
    on_fit_end                       also when the run was interrupted (state.partial)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TrainkitError
from .devices import autocast


@dataclass
class EpochResult:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float          # percent
    train_seen: int           # training images used this epoch, over all ranks
    test_loss: float | None   # None for the epochs of a run with a validation split, but the last
    test_acc: float | None    # percent
    test_correct: int | None
    test_total: int | None
    seconds: float            # wall time of the epoch: training and evaluation
    # With a validation split the epochs are evaluated on it, and the test set once, at the end.
    val_loss: float | None = None
    val_acc: float | None = None
    val_correct: int | None = None
    val_total: int | None = None

    @property
    def score(self) -> float:
        """The accuracy that choices are made on: validation accuracy when there is a split, else test."""
        return self.val_acc if self.val_acc is not None else self.test_acc


class History(list):
    """The per-epoch results of a run, in order."""

    columns = [f.name for f in fields(EpochResult)]

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self]

    @property
    def best_acc(self) -> float:
        return max((r.score for r in self), default=0.0)

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "History":
        return cls(EpochResult(**row) for row in rows)


@dataclass(frozen=True)
class Evaluation:
    """One pass over the test (or validation) loader."""

    loss: float
    correct: int
    total: int
    epoch: int = 0
    after_batch: int | None = None    # batches trained in the epoch at a mid-epoch check; None at its end
    split: str = "test"               # "val" for a validation split; "test" for the test set

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)


@dataclass
class TrainState:
    """What the loop knows, handed to every callback. Callbacks may read anything and change
    `eval_model`; they end a run with `stop()` or `interrupt()`."""

    model: nn.Module                       # what is trained (possibly wrapped: DDP, torch.compile)
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    test_loader: object                    # evaluated after every epoch, or once at the end with val_loader
    device: torch.device
    amp_dtype: torch.dtype | None = None
    callbacks: Sequence["Callback"] = ()
    history: History = field(default_factory=History)
    epoch: int = 0
    batch: int = -1                        # index of the last finished batch in this epoch
    num_batches: int = 0
    first_batch: int = 0                   # where this epoch started (> 0 when resumed part way)
    lrs: list[float] = field(default_factory=list)   # each group's rate at the epoch's start
    # This epoch's running sums (loss*n, correct, n), kept on the device: the loop never waits for
    # them. They reach the host only when read (`loss`, `train_acc`, `read`) and at the epoch's end.
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    evaluation: Evaluation | None = None   # the latest evaluation
    result: EpochResult | None = None      # the latest finished epoch
    eval_model: nn.Module | None = None    # what is evaluated; the trained model unless a callback says
    val_loader: object = None              # a validation split: every check and epoch is evaluated on it
    stop_requested: bool = False
    interrupted: bool = False
    partial: dict | None = None            # an interrupted epoch's progress, to continue it exactly
    chosen_epoch: int | None = None        # the epoch whose weights the run ends with, when not the last
    tuning: dict | None = None             # how the run's `auto` settings were resolved (devices.choose)
    # The losses (batch index, 0-d device tensor) not yet read, and what the last read found.
    unread: list = field(default_factory=list, repr=False)
    _seen: tuple = field(default=(math.nan, (0.0, 0.0, 0.0)), repr=False)
    read_batch: int = -1                   # the batch whose loss the latest read brought to the host
    interrupt_reason: object = None        # what `interrupt` was given
    # What `fit` trains for: the epochs to reach, the loss, how the schedule steps, the checks an epoch.
    epochs: int = 0
    loss_fn: Callable = F.cross_entropy
    scheduler_per_batch: bool = False
    evals_per_epoch: int = 1
    resumed: dict | None = None            # a resumed run's interrupted epoch, as its checkpoint held it

    @property
    def module(self) -> nn.Module:
        """The trained network itself, without DDP or torch.compile around it."""
        return unwrap(self.model)

    @property
    def loss(self) -> float:
        """The last batch's loss. Reading it waits for the device (and checks every loss since the
        last read), so a callback that reads it on every batch costs the speed the loop avoids."""
        return self.read()[0]

    @property
    def train_acc(self) -> float:
        """This epoch's training accuracy so far, in percent (a read, as `loss`)."""
        _, (_, correct, seen) = self.read()
        return 100.0 * correct / max(seen, 1)

    def add_batch(self, batch: int, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Count a finished batch on the device, without waiting for it."""
        loss = loss.detach()
        self.sums[0] += loss.to(self.sums.dtype) * n     # float64: exactly float(loss) * n on the host
        self.sums[1] += correct
        self.sums[2] += n
        self.unread.append((batch, loss))

    def reset_sums(self, values=(0.0, 0.0, 0.0)) -> None:
        self.sums = torch.tensor(values, dtype=_sum_dtype(self.device), device=self.device)
        self.unread.clear()
        self._seen = (math.nan, tuple(values))
        self.read_batch = -1

    def read(self) -> tuple[float, tuple[float, float, float]]:
        """(last loss, (loss*n, correct, n) summed this epoch), brought to the host in one transfer.
        Raises NonFiniteLoss, naming the first batch, if any loss since the last read was NaN or inf."""
        if self.unread:
            losses = torch.stack([loss for _, loss in self.unread]).to(self.sums.dtype)
            values = torch.cat([self.sums, losses]).tolist()
            for (batch, _), value in zip(self.unread, values[3:]):
                if not math.isfinite(value):
                    raise NonFiniteLoss(self.epoch, batch, value)
            self.read_batch = self.unread[-1][0]
            self.unread.clear()
            self._seen = (values[-1], tuple(values[:3]))
        return self._seen

    @property
    def last_read_loss(self) -> float:
        """The loss of batch `read_batch`, as the latest read found it: no wait (NaN before any read)."""
        return self._seen[0]

    def stop(self) -> None:
        """End the run: after this batch (the epoch is evaluated and recorded), or after this epoch."""
        self.stop_requested = True

    def interrupt(self, reason: object = None) -> None:
        """End the run at the next step boundary without finishing the epoch; `partial` then
        holds what a checkpoint needs to continue it. `reason` (SignalStop: the signal's number)
        reaches the caller of `fit` on the StopRequested it raises."""
        self.interrupted = True
        self.interrupt_reason = reason


class Callback:
    """Override the hooks you need. A callback with state returns it from `state_dict`; it is
    saved in the run's checkpoints and given back through `load_state_dict` on resume."""

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_after_backward(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_evaluate(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...    # the last epoch done; before the final test
    def on_fit_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def state_key(self) -> str:
        return type(self).__name__


class NonFiniteLoss(TrainkitError):
    def __init__(self, epoch: int, batch: int | None, value: float):
        where = f"batch {batch}" if batch is not None else "a batch of another process"
        super().__init__(f"the training loss became {value} in epoch {epoch}, {where}", exit_code=3)
        self.epoch, self.batch = epoch, batch


class StopRequested(Exception):
    """Raised by `fit` when a callback interrupted the run; `partial` is the unfinished epoch's
    progress (None when it stopped between epochs), `reason` what the callback gave `interrupt`."""

    def __init__(self, partial: dict | None, reason: object = None):
        super().__init__("stop requested")
        self.partial, self.reason = partial, reason


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if isinstance(
            model, nn.parallel.DistributedDataParallel) else None)
        if inner is None:
            return model
        model = inner


def uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wraps (DDP stays): evaluation runs it as it is, since its no-grad
    forward would be one more graph to compile, for a few batches."""
    return getattr(model, "_orig_mod", model)


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks when running distributed; itself otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def emit(callbacks: Sequence[Callback], hook: str, state: TrainState) -> None:
    """Call `hook` of every callback, in their order."""
    for callback in callbacks:
        method = getattr(callback, hook, None)    # a callback written before a hook existed lacks it
        if method is not None:
            method(state)


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64     # MPS has no float64


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: Callable, *, amp_dtype: torch.dtype | None = None,
               after_backward: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch; returns (loss, model output). Nothing here waits for the
    device: the caller checks the loss when it reads it (a NaN steps the weights to NaN too, so
    the run stops at that read and keeps its last checkpoint)."""
    with autocast(x.device, amp_dtype):
        out = model(x)
        loss = loss_fn(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    return loss, out


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> tuple[float, int, int]:
    """Mean cross-entropy, correct and total over `loader`. The model may return logits or
    log-probabilities: cross-entropy applies log_softmax, which leaves log-probabilities as they are."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        sums[0] += F.cross_entropy(out, y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += y.shape[0]
    model.train(was_training)
    loss, correct, total = _all_reduce(sums).tolist()
    return loss / max(total, 1), int(correct), int(total)


def check_points(batches: int, evals_per_epoch: int) -> frozenset[int]:
    """The batch indices after which an epoch of `batches` steps is evaluated mid-way.

    `evals_per_epoch` evaluations split the epoch evenly; the last is the usual one at its end,
    so it is not among these.
    """
    evals = min(evals_per_epoch, batches)
    return frozenset(batches * k // evals - 1 for k in range(1, evals))


def _evaluate_now(state: TrainState, after_batch: int | None, split: str | None = None) -> Evaluation:
    split = split or ("val" if state.val_loader is not None else "test")
    loss, correct, total = evaluate(state.eval_model or uncompiled(state.model),
                                    state.val_loader if split == "val" else state.test_loader,
                                    device=state.device, amp_dtype=state.amp_dtype)
    state.evaluation = Evaluation(loss, correct, total, state.epoch, after_batch, split)
    emit(state.callbacks, "on_evaluate", state)
    return state.evaluation


def _run_epoch(state: TrainState, loss_fn: Callable, per_batch_scheduler, check_after: frozenset[int],
               resume_from: dict | None) -> Evaluation | None:
    """Train one epoch (or its rest, `resume_from`). Returns the mid-epoch evaluation the epoch
    ended at, if a callback stopped it there."""
    cbs = state.callbacks
    state.first_batch = resume_from["batches"] if resume_from else 0
    state.reset_sums(resume_from["sums"] if resume_from else (0.0, 0.0, 0.0))
    state.model.train()
    after_backward = (lambda: emit(cbs, "on_after_backward", state)) if cbs else None
    for batch_id, (x, y) in enumerate(state.train_loader, start=state.first_batch):
        x, y = x.to(state.device, non_blocking=True), y.to(state.device, non_blocking=True)
        loss, out = train_step(state.model, x, y, state.optimizer, loss_fn, amp_dtype=state.amp_dtype,
                               after_backward=after_backward)
        if per_batch_scheduler is not None:
            per_batch_scheduler.step()
        state.add_batch(batch_id, loss, (out.argmax(1) == y).sum(), y.shape[0])
        state.batch = batch_id
        emit(cbs, "on_batch_end", state)
        checked = None
        if batch_id in check_after:
            state.read()                # no evaluation (nor a stop it decides) of NaN weights
            checked = _evaluate_now(state, batch_id + 1)
        if state.stop_requested:
            return checked
        if state.interrupted and batch_id + 1 < state.num_batches:
            _, sums = state.read()      # a checkpoint of the unfinished epoch only when its losses are finite
            state.partial = {"epoch": state.epoch, "batches": batch_id + 1, "sums": list(sums)}
            return None
    return None


def fit(model, train_loader=None, test_loader=None, optimizer: torch.optim.Optimizer | None = None, *,
        epochs: int | None = None, loss_fn: Callable = F.cross_entropy, scheduler=None,
        scheduler_per_batch: bool = False, device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
        callbacks: Sequence[Callback] = (), evals_per_epoch: int = 1, val_loader=None,
        resume: dict | None = None, tuning: dict | None = None) -> History:
    """Train for `epochs` epochs and return the history: `fit(run)` with a Run (assembly.build_run),
    which brings every piece and its callbacks, or `fit(model, train_loader, test_loader, optimizer,
    epochs=...)` with pieces of your own.

    The test loader (or `val_loader`, when given: then the test set is evaluated once, at the
    end, into the last epoch's test_* fields) is evaluated at the end of every epoch, and with
    `evals_per_epoch` > 1 also at evenly spaced steps inside it; a callback that calls `state.stop()` after such a check
    ends the epoch there (its result then covers the images trained so far, `train_seen`).
    `resume` continues a run: {"history": rows of the finished epochs, "partial": the progress
    of an interrupted epoch, or None} (a Run holds them: Run.load_state_dict). `tuning` is handed to the callbacks (what was measured). When a callback interrupts the run, `on_fit_end` still
    runs (with `state.partial`) and then StopRequested is raised.
    """
    if not isinstance(model, nn.Module):        # a Run: its pieces, callbacks and history
        run = model
        return _fit(TrainState(run.train_model, run.optimizer, run.scheduler, run.train_loader, run.test_loader,
                               torch.device(run.device), run.amp_dtype, list(run.callbacks), run.history,
                               num_batches=len(run.train_loader), val_loader=run.val_loader, tuning=run.tuning,
                               epochs=run.epochs, loss_fn=run.loss_fn, scheduler_per_batch=run.scheduler_per_batch,
                               evals_per_epoch=run.evals_per_epoch, resumed=run.partial))
    if train_loader is None or optimizer is None or epochs is None:
        raise TypeError("fit(model, train_loader, test_loader, optimizer, epochs=...) needs all four, or fit(run)")
    resume = resume or {}
    return _fit(TrainState(model, optimizer, scheduler, train_loader, test_loader, torch.device(device), amp_dtype,
                           list(callbacks), History.from_rows(resume.get("history", [])),
                           num_batches=len(train_loader), val_loader=val_loader, tuning=tuning, epochs=epochs,
                           loss_fn=loss_fn, scheduler_per_batch=scheduler_per_batch, evals_per_epoch=evals_per_epoch,
                           resumed=resume.get("partial")))


def _fit(state: TrainState) -> History:
    """The loop of `fit`: epochs of training, each evaluated; the state's history is added to."""
    optimizer, scheduler, scheduler_per_batch = state.optimizer, state.scheduler, state.scheduler_per_batch
    partial = state.resumed
    check_after = check_points(state.num_batches, state.evals_per_epoch)
    emit(state.callbacks, "on_fit_start", state)
    for epoch in range(len(state.history) + 1, state.epochs + 1):
        if state.stop_requested or state.interrupted:
            break
        resume_from = partial if partial and partial["epoch"] == epoch else None
        state.epoch, state.batch, state.evaluation, state.result = epoch, -1, None, None
        state.lrs = resume_from["lrs"] if resume_from else [group["lr"] for group in optimizer.param_groups]
        start = time.perf_counter() - (resume_from["seconds"] if resume_from else 0.0)
        emit(state.callbacks, "on_epoch_start", state)
        checked = _run_epoch(state, state.loss_fn, scheduler if scheduler_per_batch else None, check_after, resume_from)
        if state.partial is not None:
            state.partial.update(lrs=state.lrs, seconds=time.perf_counter() - start)
            break
        loss, seen_acc, seen = _reduced_train_sums(state)
        final = checked or _evaluate_now(state, None)
        if scheduler is not None and not scheduler_per_batch:
            scheduler.step()
        numbers = (final.loss, final.acc, final.correct, final.total)
        held_out = numbers if final.split == "test" else (None,) * 4
        state.result = EpochResult(epoch, state.lrs[0], loss, seen_acc, seen, *held_out,
                                   time.perf_counter() - start, *(numbers if final.split == "val" else ()))
        state.history.append(state.result)
        emit(state.callbacks, "on_epoch_end", state)
    if not state.interrupted:
        emit(state.callbacks, "on_train_end", state)
    if state.val_loader is not None and state.test_loader is not None and state.history and not state.interrupted:
        test = _evaluate_now(state, None, "test")     # the test set, once, of the weights the run ends with
        last = state.history[-1]
        last.test_loss, last.test_acc, last.test_correct, last.test_total = test.loss, test.acc, test.correct, test.total
    emit(state.callbacks, "on_fit_end", state)
    if state.interrupted:
        raise StopRequested(state.partial, state.interrupt_reason)
    return state.history


def _reduced_train_sums(state: TrainState) -> tuple[float, float, int]:
    """(mean loss, accuracy in percent, images) of this epoch's training, summed over ranks. Raises
    NonFiniteLoss if a loss was not finite, on every rank (the summed loss is then not finite)."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        _, sums = state.read()
    else:
        sums = _all_reduce(state.sums.clone()).tolist()
        if not math.isfinite(sums[0]):
            state.read()                # names the batch on the rank where it happened
            raise NonFiniteLoss(state.epoch, None, sums[0])
    return sums[0] / sums[2], 100.0 * sums[1] / sums[2], int(sums[2])


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                    device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                    callbacks: Sequence[Callback] = ()) -> tuple[float, float, int]:
    """One pass over `loader` with no evaluation; returns (mean loss, accuracy in percent, images seen)."""
    state = TrainState(model, optimizer, None, loader, None, torch.device(device), amp_dtype, list(callbacks),
                       epoch=1, num_batches=len(loader))
    _run_epoch(state, loss_fn, None, frozenset(), None)
    return _reduced_train_sums(state)
