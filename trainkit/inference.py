"""Using a finished run: evaluate it, predict image files, export the model."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import TrainConfig, from_mapping, load_config_file
from .errors import TrainkitError
from .flags import add_config_flags, config_flags
from .loaders import normalize
from .models import build_model


@dataclass
class TrainedModel:
    model: nn.Module
    cfg: TrainConfig
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalized float, as in training."""
        return normalize(images, self.mean, self.std)


def load_run(run_dir: str | Path) -> TrainedModel:
    """The trained model of a run directory (model.pt, else the last checkpoint) and its settings."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise TrainkitError(f"{run_dir} is not a trainkit run directory (no config.json)")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = from_mapping(load_config_file(run_dir / "config.json"))
    info = saved["data"]
    shape = tuple(info["image_shape"])
    model = build_model(cfg.model, in_channels=shape[0], num_classes=len(info["classes"]))
    if (run_dir / "model.pt").is_file():
        source = run_dir / "model.pt"
        state = ckpt.load_weights(source)
    elif (run_dir / "last.pt").is_file():
        source = run_dir / "last.pt"
        state = ckpt.load_checkpoint(source)["model"]
    else:
        raise TrainkitError(f"{run_dir} holds no weights (model.pt or last.pt)")
    ckpt.load_weights_into(model, state, str(source))
    model.eval()
    return TrainedModel(model, cfg, info["classes"], tuple(info["mean"]), tuple(info["std"]), shape)


def cmd_eval(args) -> int:
    from .engine import evaluate
    from .experiment import get_data
    from .loaders import TensorLoader
    from .reports import test_line

    trained = load_run(args.run_dir)
    cfg = trained.cfg.replace(**config_flags(args), limit_train=1)
    data = get_data(cfg, channels=trained.image_shape[0])
    loader = TensorLoader(data.test_images, data.test_labels, 1000, mean=trained.mean, std=trained.std)
    loss, correct, total = evaluate(trained.model, loader, device=torch.device("cpu"))
    print(test_line(loss, correct, total))
    return 0


@torch.no_grad()
def predict_files(trained: TrainedModel, paths: list[Path]) -> torch.Tensor:
    """Class probabilities (N, classes) for image files, preprocessed as in training."""
    from .datasets import load_image

    c, h, w = trained.image_shape
    images = torch.stack([load_image(Path(p), c, (h, w)) for p in paths])
    return trained.model(trained.preprocess(images)).float().exp()


def cmd_predict(args) -> int:
    trained = load_run(args.run_dir)
    probs = predict_files(trained, args.images)
    k = min(args.top, len(trained.classes))
    for path, p in zip(args.images, probs):
        values, indices = p.topk(k)
        ranked = ", ".join(f"{trained.classes[i]} {v:.1%}" for v, i in zip(values.tolist(), indices.tolist()))
        print(f"{path}: {ranked}")
    return 0


def export(trained: TrainedModel, fmt: str, output: Path) -> Path:
    example = torch.zeros(1, *trained.image_shape)
    if fmt == "safetensors":
        ckpt.save_weights(trained.model, output)
    elif fmt == "torchscript":
        try:
            scripted = torch.jit.trace(trained.model, example)
        except Exception as exc:
            raise TrainkitError(f"the model could not be traced to TorchScript: {exc}") from None
        scripted.save(str(output))
    else:
        if importlib.util.find_spec("onnx") is None:
            raise TrainkitError("ONNX export needs the onnx package: pip install trainkit[onnx]")
        torch.onnx.export(trained.model, (example,), str(output), input_names=["images"],
                          output_names=["log_probs"], dynamic_axes={"images": {0: "batch"}, "log_probs": {0: "batch"}},
                          dynamo=False)
    return output


def cmd_export(args) -> int:
    trained = load_run(args.run_dir)
    suffix = {"onnx": "model.onnx", "torchscript": "model.ts", "safetensors": "model.safetensors"}[args.format]
    output = Path(args.output) if args.output else Path(args.run_dir) / suffix
    export(trained, args.format, output)
    print(f"Exported {args.format} to {output}")
    return 0


def add_command(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run's model on its test set")
    ev.add_argument("run_dir")
    add_config_flags(ev, only=("data_dir",))
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="classify PNG/JPEG files with a run's model")
    pr.add_argument("run_dir")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--top", type=int, default=3, help="how many classes to show (default: 3)")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a run's model to ONNX, TorchScript or safetensors")
    ex.add_argument("run_dir")
    ex.add_argument("--format", choices=["onnx", "torchscript", "safetensors"], default="onnx")
    ex.add_argument("--output", help="output file (default: model.onnx / model.ts / model.safetensors in the run)")
    ex.set_defaults(func=cmd_export)
