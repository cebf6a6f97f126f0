"""The callbacks trainkit ships; each is a few lines on the protocol in engine.py.

    fit(..., callbacks=[GradientClipping(1.0), EMA(0.999), EarlyStopping(3)])
    train(cfg, callbacks=[MyLogger()])

The console output (reports.ConsoleLogger) and the run directory (rundir.RunDirectory) are
callbacks too.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..errors import TrainkitError
from .engine import Callback, TrainState


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
            state.interrupt(self.signum)    # the CLI names the signal and exits with 128 + it


class CheckLog(Callback):
    """Every mid-epoch check, one row appended to the run's checks.csv (for `trainkit compare`):
    epoch, after_batch, batches, split, loss, acc, and seconds since the epoch began. A resumed
    run appends; a check made again after a resume is a row again (readers keep the last)."""

    COLUMNS = ("epoch", "after_batch", "batches", "split", "loss", "acc", "seconds")

    main_process_only = True     # under torchrun, rank 0 alone writes

    def __init__(self, path: Path):
        self.path = Path(path)
        self._started = time.monotonic()

    def on_epoch_start(self, state: TrainState) -> None:
        self._started = time.monotonic()

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        if e.after_batch is None:          # the epoch's own evaluation is in metrics.csv
            return
        new = not self.path.is_file()
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(",".join(self.COLUMNS) + "\n")
            f.write(f"{e.epoch},{e.after_batch},{state.num_batches},{e.split},{e.loss!r},{e.acc!r},"
                    f"{time.monotonic() - self._started:.3f}\n")


class TensorBoardLogger(Callback):
    """TensorBoard event files: the training loss and learning rate per step, every check's loss and
    accuracy, the per-epoch numbers, and the run's settings with its final numbers in the HParams tab.

    Every tag has one x-axis, the batches trained since the run began (TensorBoard's step), so an
    epoch's number sits where the epoch ended and a check's where it ran: `step/train_loss`,
    `step/lr` (the rate each step trained with); `check/<split>_loss`, `check/<split>_acc` (every
    evaluation, mid-epoch ones included); the epoch's `train_loss`, `test_acc`, ... at its last step
    (where it stopped, for an epoch stopped part way). The step loss is logged when something else
    has already brought it to the host (the progress bar, as often as it redraws), else read at most
    every `read_every` seconds: the loop never waits for it per step."""

    KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "seconds")

    main_process_only = True     # under torchrun, rank 0 alone writes

    def __init__(self, log_dir: Path, settings: dict | None = None, read_every: float = 1.0):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise TrainkitError("--tensorboard needs the tensorboard package: pip install trainkit[tensorboard]") from None
        self.log_dir, self.writer = Path(log_dir), None     # made when the run starts, once its folder is taken
        self.settings = settings or {}
        self.read_every = read_every
        self._logged = (0, -1)          # (epoch, batch) of the last loss written
        self._next_read = 0.0
        self._lr = None                 # the rate the next step trains with
        self._end_step = 0              # the step the latest epoch ended at

    def on_fit_start(self, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(self.log_dir))
        self._end_step = len(state.history) * state.num_batches     # a resumed run's epochs so far

    @staticmethod
    def _step(state: TrainState, batches: int) -> int:
        """Batches trained since the run began, `batches` of them in this epoch."""
        return (state.epoch - 1) * state.num_batches + batches

    def on_epoch_start(self, state: TrainState) -> None:
        self._lr = state.optimizer.param_groups[0]["lr"]

    def on_batch_end(self, state: TrainState) -> None:
        # the rate this step trained with: a per-batch schedule has already set the next one
        used, self._lr = self._lr, state.optimizer.param_groups[0]["lr"]
        self.writer.add_scalar("step/lr", used, self._step(state, state.batch + 1))
        now = time.monotonic()
        fresh = lambda: state.read_batch >= 0 and (state.epoch, state.read_batch) != self._logged
        if not fresh() and now >= self._next_read:
            state.read()                # no one has read for a while (no progress bar): one wait
        if fresh():
            self._next_read = now + self.read_every
            self._log_step(state)

    def _log_step(self, state: TrainState) -> None:
        self._logged = (state.epoch, state.read_batch)
        self.writer.add_scalar("step/train_loss", state.last_read_loss, self._step(state, state.read_batch + 1))

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        step = self._step(state, e.after_batch if e.after_batch is not None else state.num_batches)
        self.writer.add_scalar(f"check/{e.split}_loss", e.loss, step)
        self.writer.add_scalar(f"check/{e.split}_acc", e.acc, step)

    def on_epoch_end(self, state: TrainState) -> None:
        if state.read_batch >= 0 and (state.epoch, state.read_batch) != self._logged:
            self._log_step(state)       # the epoch's last loss, read at its end
        self._end_step = self._step(state, state.batch + 1)     # the epoch's last step, whole or stopped
        for key in self.KEYS:
            if getattr(state.result, key) is not None:
                self.writer.add_scalar(key, getattr(state.result, key), self._end_step)
        self.writer.flush()

    def on_fit_end(self, state: TrainState) -> None:
        last = state.history[-1] if state.history else None
        if last is not None and last.val_acc is not None and last.test_acc is not None:
            # with a validation split the test set is evaluated once, after the last epoch's end
            self.writer.add_scalar("test_acc", last.test_acc, self._end_step)
            self.writer.add_scalar("test_loss", last.test_loss, self._end_step)
        if last is not None and self.settings:
            self._hparams(state)
        self.writer.close()

    def _hparams(self, state: TrainState) -> None:
        """The settings and final numbers as one HParams session (this run's folder): the tab reads
        each metric's latest value from the scalars of the same tag written above. No experiment
        summary: each run would write its own and TensorBoard would take one run's at random; without,
        it types each setting and finds which differ from all the runs' sessions together."""
        from torch.utils.tensorboard.summary import hparams

        last = state.history[-1]
        metrics = {k: getattr(last, k) for k in ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss",
                                                  "train_acc") if getattr(last, k) is not None}
        _, start, end = hparams(hparam_values(self.settings), metrics)
        for summary in (start, end):
            self.writer.file_writer.add_summary(summary)


def hparam_values(settings: dict) -> dict:
    """Settings as HParams values of their own type. An unset number is NaN, which TensorBoard
    shows as unset in a number column ("None", a string, made the column a string one, or hid the
    run from it); an unset string is ""; anything else (a list) is its text."""
    from ..config import field_specs, kind_of

    kinds = {f.name: kind_of(f) for f in field_specs()}
    values = {}
    for name, value in settings.items():
        if value is None:
            value = math.nan if kinds.get(name) in ("int", "float") else ""
        values[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values
