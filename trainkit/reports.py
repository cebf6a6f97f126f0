"""Everything that is shown: console lines, progress bars, tables, plots and figures."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn as nn

from .engine import EpochResult, History, Logger


class ConsoleLogger(Logger):
    """Prints the seed's lines: the learning rate, `Epoch N`, a tqdm bar and the test result."""

    def __init__(self, progress: bool = True, print_fn=print):
        self.progress, self.print = progress, print_fn

    def epoch_start(self, epoch: int, lrs: list[float]) -> None:
        for i, lr in enumerate(lrs):
            self.print(f"Adjusting learning rate of group {i} to {lr:.4e}.")
        self.print(f"Epoch {epoch}")

    def wrap_batches(self, batches, total: int):
        from tqdm.auto import tqdm

        return tqdm(batches, total=total, disable=not self.progress, dynamic_ncols=True)

    def batch_end(self, bar, batch_id: int, loss: float, acc: float) -> None:
        if self.progress:
            bar.set_description(f"Train: Loss={loss:0.4f} Batch_id={batch_id} Accuracy={acc:0.2f}",
                                refresh=False)

    def epoch_end(self, r: EpochResult) -> None:
        if not self.progress:
            self.print(f"Train: Loss={r.train_loss:0.4f} Accuracy={r.train_acc:0.2f}")
        self.print(f"Test set: Average loss: {r.test_loss:.4f}, Accuracy: {r.test_correct}/{r.test_total} "
                   f"({r.test_acc:.2f}%)\n")


def write_metrics(history: History, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=History.columns)
        writer.writeheader()
        writer.writerows(history.rows())


def read_metrics(path: Path) -> History:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    types = {name: type(value) for name, value in EpochResult(0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0, 0, 0.0).__dict__.items()}
    return History.from_rows({k: types[k](v) if types[k] is not int else int(float(v)) for k, v in row.items()}
                             for row in rows)


def markdown_table(history: History) -> str:
    lines = ["| epoch | lr | train loss | train acc % | test loss | test acc % | seconds |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in history:
        lines.append(f"| {r.epoch} | {r.lr:.4g} | {r.train_loss:.4f} | {r.train_acc:.2f} | "
                     f"{r.test_loss:.4f} | {r.test_acc:.2f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _in_notebook() -> bool:
    import sys
    return "ipykernel" in sys.modules


def plot_history(history: History, path: Path | None = None):
    """The seed's 2x2 figure: training loss, training accuracy, test loss, test accuracy."""
    plt = _pyplot()
    epochs = [r.epoch for r in history]
    fig, axs = plt.subplots(2, 2, figsize=(15, 10))
    panels = [("train_loss", "Training Loss"), ("train_acc", "Training Accuracy"),
              ("test_loss", "Test Loss"), ("test_acc", "Test Accuracy")]
    for ax, (key, title) in zip(axs.T.flat, panels):
        ax.plot(epochs, [getattr(r, key) for r in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def _finish(fig, path: Path | None):
    if path is not None:
        fig.savefig(path, dpi=80)
        _pyplot().close(fig)
    return fig


def _unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (x.float().cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)).clamp(0, 1)


def image_grid(images: torch.Tensor, titles: list[str], path: Path | None = None, cols: int = 4,
               suptitle: str | None = None):
    """Images (B, C, H, W) in [0, 1] with a title each."""
    plt = _pyplot()
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
    return _finish(fig, path)


def plot_samples(loader, classes: list[str], mean, std, path: Path | None = None, count: int = 12):
    """`count` images of one training batch, as the model sees them after augmentation."""
    x, y = next(iter(loader))
    x = _unnormalize(x[:count], mean, std)
    return image_grid(x, [classes[i] for i in y[:count].tolist()], path, cols=4)


@torch.no_grad()
def predictions(model: nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities, labels, per-image NLL, images) over a loader, on the CPU."""
    model.eval()
    outs, labels, images = [], [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y.cpu())
        images.append(x.float().cpu())
    out, y = torch.cat(outs), torch.cat(labels)
    return out, y, torch.nn.functional.nll_loss(out, y, reduction="none"), torch.cat(images)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    index = target * num_classes + pred
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float]:
    totals = matrix.sum(1).clamp_min(1)
    return (100.0 * matrix.diag() / totals).tolist()


def plot_confusion(matrix: torch.Tensor, classes: list[str], path: Path | None = None):
    plt = _pyplot()
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
    return _finish(fig, path)


def plot_mistakes(images, out, labels, losses, classes, mean, std, path: Path | None = None, count: int = 16):
    """The test images with the highest loss, with their true and predicted labels."""
    worst = losses.argsort(descending=True)[:count]
    pred = out.argmax(1)
    titles = [f"true {classes[labels[i]]} / pred {classes[pred[i]]}\nloss {losses[i]:.2f}" for i in worst.tolist()]
    return image_grid(_unnormalize(images[worst], mean, std), titles, path, cols=4,
                      suptitle="Highest-loss test images")


def model_summary(model: nn.Module, input_shape: tuple[int, ...]):
    """torchinfo's per-layer table (layer, output shape, parameters) for one input of `input_shape`."""
    from torchinfo import summary

    return summary(model, input_size=(1, *input_shape), col_names=("output_size", "num_params"),
                   device="cpu", verbose=0, depth=4)


def plot_architecture(model: nn.Module, input_shape: tuple[int, ...], path: Path | None = None):
    """A picture of the network drawn from its layers as traced by torchinfo: one box per layer."""
    plt = _pyplot()
    stats = model_summary(model, input_shape)
    layers = [l for l in stats.summary_list if l.depth > 0 and not l.children]
    if not layers:  # a functional model: draw its top-level modules instead
        layers = [l for l in stats.summary_list if l.depth == 1]
    height = 0.9 * (len(layers) + 1)
    fig, ax = plt.subplots(figsize=(7, height))
    ax.set_xlim(0, 10)
    ax.set_ylim(-len(layers) - 0.5, 1)
    ax.axis("off")
    boxes = [("input", f"{list((1, *input_shape))}", "")] + [
        (f"{l.class_name}", str(l.output_size), f"{l.num_params:,} params" if l.num_params else "")
        for l in layers]
    colors = {"Conv2d": "#9ecae1", "Linear": "#fdae6b", "MaxPool2d": "#c7e9c0", "ReLU": "#eeeeee",
              "BatchNorm2d": "#dadaeb", "Dropout2d": "#f0f0f0", "Dropout": "#f0f0f0", "input": "#ffffff"}
    for i, (name, shape, params) in enumerate(boxes):
        y = -i
        ax.add_patch(plt.Rectangle((1, y - 0.35), 8, 0.7, facecolor=colors.get(name, "#fee391"),
                                   edgecolor="black"))
        ax.text(1.3, y, name, va="center", fontsize=10, weight="bold")
        ax.text(4.2, y, shape, va="center", fontsize=9, family="monospace")
        ax.text(8.7, y, params, va="center", ha="right", fontsize=9)
        if i:
            ax.annotate("", xy=(5, y + 0.35), xytext=(5, y + 0.65), arrowprops=dict(arrowstyle="->"))
    ax.set_title(f"{type(model).__name__}: {stats.total_params:,} parameters")
    fig.tight_layout()
    return _finish(fig, path)
