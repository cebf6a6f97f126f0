"""The callbacks trainkit ships; each is a few lines on the protocol in engine.py.

    fit(..., callbacks=[GradientClipping(1.0), EMA(0.999), EarlyStopping(3)])
    train(cfg, callbacks=[MyLogger()])

The console output (reports.ConsoleLogger) and the run directory (rundir.RunDirectory) are
callbacks too.
"""
from __future__ import annotations

import signal
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .engine import Callback, TrainState
from .errors import TrainkitError


class TargetAccuracy(Callback):
    """Stop as soon as an evaluation reaches `target` percent (mid-epoch checks included; on the
    validation split when there is one)."""

    def __init__(self, target: float):
        self.target = target

    def on_fit_start(self, state: TrainState) -> None:
        if state.history and state.history[-1].score >= self.target:
            state.stop()            # a resumed run that had already got there

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        if e.acc >= self.target and (e.split == "val" or state.val_loader is None):
            state.stop()


class EarlyStopping(Callback):
    """Stop when the end-of-epoch accuracy has not improved for `patience` epochs."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best, self.waited = -1.0, 0

    def on_fit_start(self, state: TrainState) -> None:
        if self.waited >= self.patience:
            state.stop()

    def on_epoch_end(self, state: TrainState) -> None:
        if state.result.score > self.best:
            self.best, self.waited = state.result.score, 0
        else:
            self.waited += 1
        if self.waited >= self.patience:
            state.stop()

    def state_dict(self) -> dict:
        return {"best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.waited = state["best"], state["waited"]


class GradientClipping(Callback):
    """Rescale the gradients so that their total norm is at most `max_norm`."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_after_backward(self, state: TrainState) -> None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.max_norm)


class EMA(Callback):
    """An exponential moving average of the weights (and batch-norm statistics), updated after
    every step and evaluated in place of the raw weights. The run's model.pt holds the average."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise TrainkitError(f"EMA decay must be between 0 and 1 (e.g. 0.999), got {decay}")
        self.decay = decay
        self.average: AveragedModel | None = None
        self._saved: dict | None = None

    def on_fit_start(self, state: TrainState) -> None:
        self.average = AveragedModel(state.module, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                     use_buffers=True)
        if self._saved is not None:
            self.average.load_state_dict(self._saved)
        state.eval_model = self.average.module

    def on_batch_end(self, state: TrainState) -> None:
        self.average.update_parameters(state.module)

    def state_dict(self) -> dict:
        return self.average.state_dict() if self.average is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state


class BestWeights(Callback):
    """With a validation split, the run ends with the weights of its best validation epoch: they are
    kept (on the device) whenever an epoch is the best so far, and put back before the final test,
    so the test number, model.pt and everything made from it are of the model that was chosen.
    Without a validation split it does nothing (the seed's behaviour: the last epoch's weights)."""

    def __init__(self):
        self.best: dict | None = None      # {"epoch", "score", "weights"}

    def on_epoch_end(self, state: TrainState) -> None:
        r = state.result
        if r.val_acc is None or self.best is not None and r.val_acc < self.best["score"]:
            return           # a tie takes the later epoch, as best.pt does
        model = state.eval_model or state.module
        self.best = {"epoch": r.epoch, "score": r.val_acc,
                     "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    def on_train_end(self, state: TrainState) -> None:
        if self.best is None or self.best["epoch"] == len(state.history):
            return
        (state.eval_model or state.module).load_state_dict(self.best["weights"])
        state.chosen_epoch = self.best["epoch"]

    def state_dict(self) -> dict:
        return dict(self.best) if self.best is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state) if state else None


class SignalStop(Callback):
    """SIGINT/SIGTERM interrupt the run at the next step boundary (so a checkpoint of the
    unfinished epoch can be written); a second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> "SignalStop":
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def on_batch_end(self, state: TrainState) -> None:
        if self.signum is not None:
            state.interrupt()


class TensorBoardLogger(Callback):
    """The per-epoch numbers as TensorBoard scalars, and every mid-epoch check."""

    KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr", "seconds")

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainkitError("--tensorboard needs the tensorboard package: pip install trainkit[tensorboard]") from None
        self.writer = SummaryWriter(str(log_dir))

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        if e.after_batch is not None:
            step = (e.epoch - 1) * state.num_batches + e.after_batch
            self.writer.add_scalar(f"check/{e.split}_acc", e.acc, step)

    def on_epoch_end(self, state: TrainState) -> None:
        for key in self.KEYS:
            if getattr(state.result, key) is not None:
                self.writer.add_scalar(key, getattr(state.result, key), state.result.epoch)
        self.writer.flush()

    def on_fit_end(self, state: TrainState) -> None:
        self.writer.close()
