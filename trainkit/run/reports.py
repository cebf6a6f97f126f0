"""Everything that is shown: console lines, progress bars, tables, plots and figures, and the
final reports a run leaves in its folder (FinalReports)."""
from __future__ import annotations

import csv
import io
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import atomic_write_text, save_weights
from ..data import stream
from ..data.loaders import denormalize
from ..loop.engine import Callback, History, TrainState, unwrap
from .experiment import evaluation_loader


def test_line(loss: float, correct: int, total: int, after: str = "", split: str = "test") -> str:
    """The seed's line for an evaluation: `Test set: Average loss: 0.0191, Accuracy: 9931/10000 (99.31%)`."""
    name = "Validation set" if split == "val" else "Test set"
    return (f"{name}{after}: Average loss: {loss:.4f}, Accuracy: {correct}/{total} "
            f"({100.0 * correct / max(total, 1):.2f}%)")


def _how_measured(tuning: dict) -> str:
    """How far the measurement can be trusted: the widest spread of its timings, and for a noisy
    one the tries and how long our threads waited for a core (devices.summarize)."""
    if not isinstance(tuning.get("spread"), (int, float)):
        return ""
    text = f"spread {tuning['spread']:.0%}"
    tries = len(tuning.get("tries") or [])
    if tuning.get("noisy"):
        text += f" over {tries} tr{'y' if tries == 1 else 'ies'}"
        if isinstance(tuning.get("waited"), (int, float)):
            text += f", our threads waited for a core {tuning['waited']:.0%} of the time"
    return f" ({text})"


def tuning_line(tuning: dict | None) -> str | None:
    """One line saying what `auto` measured and chose (devices.choose): the warm median step of
    the choice, how far the timings can be trusted (noisy ones are not cached), and the compile's
    payback; None when there was nothing to choose (every setting given)."""
    if not tuning or not (tuning.get("timings") or tuning.get("not_measured")):
        return None
    choice = tuning["choice"]
    timings = tuning["timings"]
    label = f"{choice['precision']}, channels_last {choice['channels_last']}"
    if tuning.get("not_measured"):
        return f"Not measured ({tuning['not_measured']}): {label}, the default" + \
            ("; compile off" if tuning.get("compile") else "")
    eager = (timings.get(label) or {}).get("seconds")
    how = ", ".join(["cached"] * bool(tuning.get("cached")) + ["noisy, so not cached"] * bool(tuning.get("noisy")))
    text = f"Measured{f' ({how})' if how else ''}: {label}" + \
           (f" at {eager:.3f} s/step" if isinstance(eager, (int, float)) else "") + _how_measured(tuning)
    decided = tuning.get("compile")
    compiled = timings.get(label + ", compiled") or {}
    noisy = " (noisy, so not cached)" if compiled.get("noisy") else ""
    if decided and "payback" in decided:      # only a compiled step faster than the uncompiled: no negative saving
        p = decided["payback"]
        verdict = "saves" if p["pays"] else "would save only"
        text += (f"; compiled {compiled['seconds']:.3f} s/step{noisy}, {verdict} {p['saved_seconds']:.0f} s over "
                 f"{p['steps']:,} steps against {p['compile_seconds']:.0f} s to compile: compile {decided['chosen']}")
    elif decided:
        text += f"; compile off ({decided['why']}){noisy}"
    return text


class ConsoleLogger(Callback):
    """Prints the seed's lines: the learning rate, `Epoch N`, a tqdm bar and the test result."""

    main_process_only = True     # under torchrun, rank 0 alone prints

    def __init__(self, progress: bool = True, print_fn=print, bar=None):
        self.progress, self.print = progress, print_fn
        self.bar_class = bar        # tqdm.auto's: a widget in Jupyter (ipywidgets), else text
        self.bar = None
        self._next_read = 0.0

    def on_fit_start(self, state: TrainState) -> None:
        line = tuning_line(state.tuning)
        if line:
            self.print(line)

    def on_epoch_start(self, state: TrainState) -> None:
        from tqdm.auto import tqdm

        for i, lr in enumerate(state.lrs):
            self.print(f"Adjusting learning rate of group {i} to {lr:.4e}.")
        self.print(f"Epoch {state.epoch}")
        self.bar = (self.bar_class or tqdm)(total=state.num_batches, initial=state.first_batch,
                                            disable=not self.progress, dynamic_ncols=True)
        self._next_read = 0.0

    def on_batch_end(self, state: TrainState) -> None:
        if not self.progress:
            return
        # The loss and accuracy are read from the device (a wait) only as often as the bar redraws
        # (tqdm's mininterval), and on the epoch's last batch, which the closed bar shows.
        now = time.monotonic()
        if now >= self._next_read or state.batch + 1 == state.num_batches:
            self._next_read = now + self.bar.mininterval
            self.bar.set_description(f"Train: Loss={state.loss:0.4f} Batch_id={state.batch} "
                                     f"Accuracy={state.train_acc:0.2f}", refresh=False)
        self.bar.update(1)

    def on_evaluate(self, state: TrainState) -> None:
        from tqdm.auto import tqdm

        e = state.evaluation
        if e.after_batch is None and e.split == "test" and state.val_loader is not None:
            chosen = (f" with the weights of epoch {state.chosen_epoch}, the best on validation"
                      if state.chosen_epoch is not None else "")
            self.print(test_line(e.loss, e.correct, e.total, f", evaluated once at the end{chosen}"))
            return
        if e.after_batch is None:
            return                      # the epoch's own evaluation is printed with the epoch
        line = test_line(e.loss, e.correct, e.total, f" after batch {e.after_batch}/{state.num_batches}",
                         e.split)
        if self.progress and self.print is print:
            tqdm.write(line)            # above the bar, which stays in place
        else:
            self.print(line)

    def on_epoch_end(self, state: TrainState) -> None:
        if self.bar is not None and hasattr(self.bar, "container") and not self.bar.disable:
            # a notebook widget: shown live in Jupyter, but an exported HTML or the notebook's text
            # keeps only its first state ("0/128"); the finished bar as a line of text stays
            self.print(self.bar.format_meter(**{**self.bar.format_dict, "ncols": 100, "ascii": True}))
        self._close_bar()
        r = state.result
        if not self.progress:
            self.print(f"Train: Loss={r.train_loss:0.4f} Accuracy={r.train_acc:0.2f}")
        if r.val_acc is not None:
            self.print(test_line(r.val_loss, r.val_correct, r.val_total, split="val") + "\n")
        else:
            self.print(test_line(r.test_loss, r.test_correct, r.test_total) + "\n")

    def on_fit_end(self, state: TrainState) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def metrics_csv(history: History) -> str:
    """The history as CSV text: a header and one row per epoch."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=History.columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history.rows())
    return out.getvalue()


def markdown_table(history: History) -> str:
    """One row per epoch. Its train loss is the epoch's mean; the bar's `Loss=` is the last batch's."""
    split = "val" if history and history[0].val_acc is not None else "test"
    lines = [f"| epoch | lr | train loss (epoch mean) | train acc % | {split} loss | {split} acc % | seconds |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in history:
        loss, acc = getattr(r, f"{split}_loss"), getattr(r, f"{split}_acc")
        lines.append(f"| {r.epoch} | {r.lr:.4g} | {r.train_loss:.4f} | {r.train_acc:.2f} | "
                     f"{loss:.4f} | {acc:.2f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot, on the Agg backend outside a notebook (runs on machines without a display)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _in_notebook() -> bool:
    import sys
    return "ipykernel" in sys.modules


def epochs_trained(epoch: int, seen: int | None, per_epoch: int | None) -> float:
    """Where an epoch's row ends, in epochs: `epoch`, or less for an epoch stopped part way (a
    pruned trial, --target-acc at a mid-epoch check), whose row counts the `seen` images it
    trained on out of the `per_epoch` of a whole one (1.5: half-way through the second)."""
    if not seen or not per_epoch or seen >= per_epoch:
        return float(epoch)
    return epoch - 1 + seen / per_epoch


def mark_stopped(ax, x: float, y: float, label: str | None = None) -> None:
    """A cross on a curve's last point when its epoch was stopped part way (x: the epochs trained)."""
    ax.plot([x], [y], "X", color="C3", markersize=11, label=label or f"stopped at epoch {x:.3g}", zorder=3)


def whole_epochs(ax) -> None:
    """Ticks on the epoch axis at whole epochs only (1, 2, 3; not 1.25), at least one of them."""
    import math

    from matplotlib.ticker import MaxNLocator
    low, high = ax.get_xlim()
    if math.ceil(low) > high:           # a lone point part way through an epoch (0.5)
        ax.set_xlim(math.floor(low), math.ceil(high))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def plot_history(history: History, path: Path | None = None, images_per_epoch: int | None = None):
    """The seed's 2x2 figure: training loss, training accuracy, test loss, test accuracy. With
    `images_per_epoch`, an epoch stopped part way is drawn where it stopped, marked."""
    plt = pyplot()
    epochs = [epochs_trained(r.epoch, r.train_seen, images_per_epoch) for r in history]
    stopped = bool(history) and epochs[-1] < history[-1].epoch
    fig, axs = plt.subplots(2, 2, figsize=(15, 10))
    held_out = ("val", "Validation") if history and history[0].val_acc is not None else ("test", "Test")
    panels = [("train_loss", "Training Loss"), ("train_acc", "Training Accuracy"),
              (f"{held_out[0]}_loss", f"{held_out[1]} Loss"), (f"{held_out[0]}_acc", f"{held_out[1]} Accuracy")]
    for ax, (key, title) in zip(axs.T.flat, panels):
        values = [getattr(r, key) for r in history]
        ax.plot(epochs, values, marker="o")
        if stopped:
            mark_stopped(ax, epochs[-1], values[-1])
            ax.legend(fontsize=9)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        whole_epochs(ax)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure_to(fig, path)


def save_figure_to(fig, path: Path | None):
    if path is not None:
        fig.savefig(path, dpi=80)
        pyplot().close(fig)
    return fig


def image_grid(images: torch.Tensor, titles: list[str], path: Path | None = None, cols: int = 4,
               suptitle: str | None = None):
    """Images (B, C, H, W) in [0, 1] with a title each."""
    plt = pyplot()
    rows = (len(images) + cols - 1) // cols
    fig, axs = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    for ax, image, title in zip(axs.flat, images, titles):
        image = image.permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return save_figure_to(fig, path)


def plot_samples(loader, classes: list[str], mean, std, path: Path | None = None, count: int = 12):
    """`count` images of one training batch, as the model sees them after augmentation."""
    x, y = next(iter(loader))
    x = denormalize(x[:count], mean, std)
    return image_grid(x, [classes[i] for i in y[:count].tolist()], path, cols=4)


@torch.no_grad()
def predictions(model: nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model outputs, labels, per-image cross-entropy, images) over a loader, on the CPU."""
    model.eval()
    outs, labels, images = [], [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y.cpu())
        images.append(x.float().cpu())
    out, y = torch.cat(outs), torch.cat(labels)
    return out, y, torch.nn.functional.cross_entropy(out, y, reduction="none"), torch.cat(images)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    index = target * num_classes + pred
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float]:
    totals = matrix.sum(1).clamp_min(1)
    return (100.0 * matrix.diag() / totals).tolist()


def plot_confusion(matrix: torch.Tensor, classes: list[str], path: Path | None = None):
    plt = pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * n, 0.8 + 0.7 * n))
    ax.imshow(matrix.numpy(), cmap="Blues")
    for (i, j), value in zip(((i, j) for i in range(n) for j in range(n)), matrix.flatten().tolist()):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                color="white" if value > matrix.max().item() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test set)")
    fig.tight_layout()
    return save_figure_to(fig, path)


def plot_mistakes(images, out, labels, losses, classes, mean, std, path: Path | None = None, count: int = 16):
    """The test images with the highest loss, with their true and predicted labels."""
    worst = losses.argsort(descending=True)[:count]
    pred = out.argmax(1)
    titles = [f"true {classes[labels[i]]} / pred {classes[pred[i]]}\nloss {losses[i]:.2f}" for i in worst.tolist()]
    return image_grid(denormalize(images[worst], mean, std), titles, path, cols=4,
                      suptitle="Highest-loss test images")


def model_summary(model: nn.Module, input_shape: tuple[int, ...]):
    """torchinfo's per-layer table (layer, output shape, parameters) for one input of `input_shape`,
    shown (in a notebook too) with its units as torchinfo means them: "Total mult-adds (M)", where
    its 1.8 prints "(Units.MEGABYTES)" under Python 3.11+ (an enum formatted by name)."""
    from torchinfo import Units, summary
    from torchinfo.model_statistics import ModelStatistics

    class Summary(ModelStatistics):
        def __repr__(self) -> str:
            text = super().__repr__()
            for unit in Units:
                text = text.replace(f"({unit})", f"({unit.value})")
            return text

    stats = summary(model, input_size=(1, *input_shape), col_names=("output_size", "num_params"),
                    device="cpu", verbose=0, depth=4)
    stats.__class__ = Summary       # the same statistics; only how they print changes
    return stats


def summary_table(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """model_summary as text."""
    return str(model_summary(model, input_shape))


def architecture_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str, int]]:
    """(operation, output shape, parameters) for each step of the forward pass, traced with torch.fx
    so that functional calls (relu, max_pool2d, flatten) show too; torchinfo's leaf modules if the
    model cannot be traced."""
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        traced = symbolic_trace(model.cpu().eval())
        ShapeProp(traced).propagate(torch.zeros(1, *input_shape))
    except Exception:
        stats = model_summary(model, input_shape)
        return [(l.class_name, str(l.output_size), l.num_params) for l in stats.summary_list
                if l.depth > 0 and not l.children]
    modules = dict(traced.named_modules())
    layers = []
    for node in traced.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        meta = node.meta.get("tensor_meta")
        shape = str(list(meta.shape)) if meta is not None and hasattr(meta, "shape") else ""
        if node.op == "call_module":
            module = modules[node.target]
            label = _describe(module)
            params = sum(p.numel() for p in module.parameters())
        else:
            name = getattr(node.target, "__name__", str(node.target))
            args = [str(a) for a in node.args[1:] if isinstance(a, (int, float))]
            label = f"{name}({', '.join(args)})"
            params = 0
        layers.append((label if len(label) < 44 else label[:41] + "...", shape, params))
    return layers


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        k = "x".join(map(str, module.kernel_size))
        pad = f", pad {module.padding[0]}" if module.padding != (0, 0) else ""
        return f"Conv2d {module.in_channels}->{module.out_channels}, {k}{pad}"
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.BatchNorm2d):
        return f"BatchNorm2d({module.num_features})"
    if isinstance(module, nn.MaxPool2d):
        return f"MaxPool2d({module.kernel_size})"
    if isinstance(module, (nn.Dropout, nn.Dropout2d)):
        return f"{type(module).__name__}({module.p})"
    return f"{type(module).__name__}({module.extra_repr()})"


def plot_architecture(model: nn.Module, input_shape: tuple[int, ...], path: Path | None = None):
    """A picture of the network made from the model itself: one box per step of its forward pass."""
    plt = pyplot()
    layers = [("input", str([1, *input_shape]), 0)] + architecture_layers(model, input_shape)
    total = sum(p.numel() for p in model.parameters())
    fig, ax = plt.subplots(figsize=(8, 0.62 * len(layers) + 0.8))
    ax.set_xlim(0, 10)
    ax.set_ylim(-len(layers) + 0.4, 0.8)
    ax.axis("off")
    colors = {"Conv2d": "#9ecae1", "Linear": "#fdae6b", "max_pool2d": "#c7e9c0", "MaxPool2d": "#c7e9c0",
              "BatchNorm2d": "#dadaeb", "input": "#ffffff"}
    for i, (label, shape, params) in enumerate(layers):
        y = -i
        kind = label.replace("(", " ").split()[0]
        ax.add_patch(plt.Rectangle((0.2, y - 0.3), 9.6, 0.6, facecolor=colors.get(kind, "#f2f2f2"),
                                   edgecolor="black", linewidth=0.8))
        ax.text(0.4, y, label, va="center", fontsize=9, family="monospace")
        ax.text(6.0, y, shape, va="center", fontsize=9, family="monospace")
        ax.text(9.6, y, f"{params:,}" if params else "", va="center", ha="right", fontsize=9)
        if i:
            ax.annotate("", xy=(3.0, y + 0.3), xytext=(3.0, y + 0.7), arrowprops=dict(arrowstyle="->", lw=0.8))
    ax.set_title(f"{type(model).__name__}: {total:,} parameters (operation, output shape, parameters)", fontsize=10)
    fig.tight_layout()
    return save_figure_to(fig, path)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor()


def environment(device: torch.device, amp_dtype: torch.dtype | None = None) -> dict:
    """What a run ran on: versions, platform, device and its name, precision, threads."""
    import platform
    import sys

    import torchvision

    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "threads": torch.get_num_threads()}


def run_summary(model: nn.Module, data, history: History, matrix: torch.Tensor) -> str:
    """summary.txt: the layer table, the dataset, the final numbers and the per-class accuracy."""
    lines = [summary_table(model, data.image_shape), "",
             f"Dataset: {data.name} ({len(data.train_labels)} train, {len(data.test_labels)} test images)", ""]
    if history:
        last = history[-1]
        held_out = f"validation accuracy {last.val_acc:.2f}%, " if last.val_acc is not None else ""
        test = f"test accuracy {last.test_acc:.2f}% ({last.test_correct}/{last.test_total})" \
            if last.test_acc is not None else "test set not evaluated"
        lines += [f"Epochs: {len(history)}, {sum(r.seconds for r in history):.1f} s",
                  f"Final: train accuracy {last.train_acc:.2f}%, {held_out}{test}, "
                  f"best {'validation' if held_out else 'test'} accuracy {history.best_acc:.2f}%", ""]
    lines.append("Per-class test accuracy:")
    lines += [f"  {name:>12}: {acc:6.2f}%" if total else f"  {name:>12}:      - (no test image of it)"
              for name, acc, total in zip(data.classes, per_class_accuracy(matrix), matrix.sum(1).tolist())]
    return "\n".join(lines) + "\n"


class FinalReports(Callback):
    """At the end of a run, in its folder: model.pt (the weights evaluated: the average with --ema,
    the chosen epoch's with --final best), those weights run once more over the whole test set for
    confusion.png, mistakes.png and summary.txt's per-class table, and plot.png of the history.
    Written through `folder` (rundir.RunDirectory: atomic, one line on a failure); nothing when the
    run was interrupted (its checkpoint continues it)."""

    main_process_only = True     # under torchrun, rank 0 alone writes

    def __init__(self, folder, data, batch_size: int, device):
        self.folder, self.data, self.batch_size, self.device = folder, data, batch_size, device

    def on_fit_end(self, state: TrainState) -> None:
        if not state.interrupted:
            self.write(state.history, unwrap(state.eval_model or state.model))

    def write(self, history: History, model: nn.Module) -> None:
        data, device = self.data, self.device
        # the whole test set, on every rank count
        loader = evaluation_loader(data, self.batch_size, data.mean, data.std, device)
        out, labels, losses, images = (stream.predictions(model, loader, device) if data.streamed else
                                       predictions(model, loader, device))
        matrix = confusion_matrix(out.argmax(1), labels, data.num_classes)
        summary = run_summary(model, data, history, matrix)
        folder = self.folder

        def write_all():
            save_weights(model, folder.dir / "model.pt")
            folder.figure(partial(plot_history, images_per_epoch=len(data.train_labels)), history, name="plot.png")
            folder.figure(plot_confusion, matrix, data.classes, name="confusion.png")
            folder.figure(plot_mistakes, images, out, labels, losses, data.classes, data.mean, data.std,
                          name="mistakes.png")
            atomic_write_text(folder.dir / "summary.txt", summary)

        folder.guard("the final reports", write_all)
