"""Using a finished run: evaluate it, predict image files, export the model."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import TrainConfig, load_config_file, run_settings, validate
from ..data.loaders import normalize
from ..data.manifest import check_classes
from ..errors import TrainkitError
from ..models import build_model, gated_model_name, output_kind
from ..run.rundir import FILES as RUN_FILES
from .flags import add_config_flags, config_flags


@dataclass
class TrainedModel:
    model: nn.Module
    cfg: TrainConfig
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]
    outputs: str = "log_probs"     # what the model returns: "log_probs" or "logits"
    deep: object = None            # images.DeepRange: how its data's 32-bit and float images were read (data.json)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, classes) of uint8 images (N, C, H, W) of the run's image shape."""
        with torch.no_grad():
            return torch.softmax(self.model(self.preprocess(images)).float(), dim=1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalized float, as in training."""
        return normalize(images, self.mean, self.std)


def _data_info(path: Path) -> tuple[list[str], tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """Classes, image shape, mean and std from a run's config.json, checked: a damaged or
    hand-edited file is one line, not a KeyError."""
    saved = json.loads(path.read_text(encoding="utf-8"))  # load_config_file has parsed it already
    try:
        info = saved["data"]
        classes = [str(c) for c in info["classes"]]
        shape = tuple(int(d) for d in info["image_shape"])
        mean = tuple(float(m) for m in info["mean"])
        std = tuple(float(v) for v in info["std"])
        if len(shape) != 3 or not all(1 <= d <= 1 << 15 for d in shape) or not 1 <= len(classes) <= 1 << 20:
            raise ValueError("shape or classes")
        if len(mean) != shape[0] or len(std) != shape[0] or not all(math.isfinite(v) for v in mean + std) \
                or min(std) <= 0:
            raise ValueError("mean or std")
    except (TypeError, KeyError, ValueError, OverflowError) as exc:
        raise TrainkitError(f"{path} is damaged: its \"data\" section (classes, image_shape, mean, std) is missing "
                            f"or wrong ({type(exc).__name__}); restore it from a copy of the run") from None
    return classes, shape, mean, std


def _model_section(path: Path) -> dict | None:
    """config.json's record of how to build the model (None for runs from before it was written)."""
    saved = json.loads(path.read_text(encoding="utf-8")).get("model")
    return saved if isinstance(saved, dict) else None


def rebuild_model(run_dir: Path, cfg: TrainConfig, in_channels: int, num_classes: int,
                  model_spec: str | None = None, trust_code: bool = False) -> nn.Module:
    """The run's network, untrained, built by way of the one gate for recorded models
    (models.gated_model_name): a run folder is data, opening it imports no code unless asked."""
    name = gated_model_name(str(run_dir / "config.json"), cfg.model, _model_section(run_dir / "config.json"),
                            named=model_spec, trust_code=trust_code)
    return build_model(name, in_channels=in_channels, num_classes=num_classes)


def load_run(run_dir: str | Path, *, model: nn.Module | None = None, model_spec: str | None = None,
             trust_code: bool = False) -> TrainedModel:
    """The trained model of a run directory (model.pt, else the last checkpoint) and its settings.

    `model` is an untrained instance of a network built in Python; `model_spec` names the model
    to build instead of the recorded one; see rebuild_model for `trust_code`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise TrainkitError(f"{run_dir} is not a trainkit run directory (no config.json)")
    settings = load_config_file(run_dir / "config.json")  # one line for a file that is empty, not JSON...
    try:
        cfg = validate(run_settings(settings))
    except TrainkitError as exc:
        raise TrainkitError(f"{run_dir / 'config.json'} holds a bad setting: {exc}") from None
    classes, shape, mean, std = _data_info(run_dir / "config.json")
    check_classes(run_dir, classes, "loading the run")
    if model is None:
        model = rebuild_model(run_dir, cfg, shape[0], len(classes), model_spec, trust_code)
    if (run_dir / "model.pt").is_file():
        source = run_dir / "model.pt"
        state = ckpt.load_weights(source)
    elif (run_dir / "last.pt").is_file():
        source = run_dir / "last.pt"
        state = ckpt.load_checkpoint(source)["model"]  # load_checkpoint checks that it is there
    else:
        raise TrainkitError(f"{run_dir} holds no weights (model.pt or last.pt)")
    ckpt.load_weights_into(model, state, str(source))
    model.eval()
    outputs = (_model_section(run_dir / "config.json") or {}).get("outputs") or output_kind(
        model, shape, len(classes), cfg.model)
    return TrainedModel(model, cfg, classes, mean, std, shape, outputs, _deep_rule(run_dir))


def _deep_rule(run_dir: Path):
    """The rule the run's 32-bit and float images were read by (data.json), None without one."""
    from ..data.images import DeepRange
    from ..data.manifest import read_manifest

    return DeepRange.from_dict((read_manifest(run_dir) or {}).get("deep_images"))


def _load_from_args(args) -> TrainedModel:
    return load_run(args.run_dir, model_spec=getattr(args, "model", None), trust_code=args.trust_code)


def cmd_eval(args) -> int:
    from ..data.manifest import check_same_data, read_manifest
    from ..run.experiment import evaluation_loader, get_data, warn_unchecked_data
    from ..run.reports import test_line

    trained = _load_from_args(args)
    if args.score_on:
        return eval_other(trained, args)
    if trained.cfg.dataset.startswith("python:"):
        raise TrainkitError(f"{args.run_dir} was trained on data given from Python ({trained.cfg.dataset[7:]}); "
                            f"trainkit eval cannot load it again, and will not evaluate another dataset in its place")
    cfg = trained.cfg.replace(**{k: v for k, v in config_flags(args).items() if k != "model"}, limit_train=1)
    # The run's recorded channels and size, so that an RGB 64x64 run reads its data as it trained.
    # a run made before data.json: its data read as it was then (experiment.get_data), unchecked
    before_manifests = read_manifest(Path(args.run_dir)) is None
    data = get_data(cfg, channels=trained.image_shape[0], size=trained.image_shape[1:], before_manifests=before_manifests)
    if before_manifests:
        warn_unchecked_data(cfg)
    if tuple(data.image_shape) != trained.image_shape or len(data.classes) != len(trained.classes):
        raise TrainkitError(f"the data found for {cfg.dataset} ({list(data.image_shape)}, {len(data.classes)} classes) "
                            f"is not what {args.run_dir} was trained on ({list(trained.image_shape)}, "
                            f"{len(trained.classes)} classes)")
    check_same_data(Path(args.run_dir), data.manifest(), ("test",), "eval")
    loss, correct, total = evaluate_trained(trained, evaluation_loader(data, cfg.test_batch_size, trained.mean,
                                                                       trained.std))
    print(test_line(loss, correct, total))
    return 0


def eval_other(trained: TrainedModel, args) -> int:
    """`eval RUN --dataset SPEC`: the run's model on another labelled set, read at the run's channels
    and size where it is image files (as `predict` reads them), else refused unless its images have
    the run's shape. A set with a test split of its own is scored on it; one split as a whole (a
    flat image folder, one CSV). Its classes must be among the run's (matched by name)."""
    from dataclasses import replace

    from ..config import resolve_data_dir
    from ..data.manifest import first_names
    from ..data.registry import load_dataset, parse_dataset
    from ..run.experiment import evaluation_loader
    from ..run.reports import test_line

    spec = parse_dataset(args.score_on)
    c, h, w = trained.image_shape
    files = spec.entry.reads_size                   # image files: decoded at the run's size, as predict does
    cfg = trained.cfg.replace(**{k: v for k, v in config_flags(args).items() if k != "model"})
    data = load_dataset(spec, resolve_data_dir(cfg), channels=c if files else None, size=(h, w) if files else None,
                        progress=cfg.progress, seed=cfg.seed, bad_files=cfg.bad_files, resize=cfg.resize,
                        deep=trained.deep)
    if tuple(data.image_shape) != trained.image_shape:
        raise TrainkitError(f"{spec} holds images of {'x'.join(map(str, data.image_shape))}, the run "
                            f"{args.run_dir} reads {'x'.join(map(str, trained.image_shape))}")
    index = {name: i for i, name in enumerate(trained.classes)}
    unknown = [name for name in data.classes if name not in index]
    if unknown:
        raise TrainkitError(f"{spec} has classes the run {args.run_dir} does not know ({first_names(unknown)}; "
                            f"it knows {first_names(trained.classes)}): eval --dataset scores a set of the run's classes")
    if data.held_out_test:          # the set is one split: all of it is new to the run
        parts = [(data.train_images, data.train_labels), (data.val_images, data.val_labels),
                 (data.test_images, data.test_labels)]
        images = torch.cat([x for x, y in parts if y is not None])
        labels = torch.cat([y for x, y in parts if y is not None])
    else:
        images, labels = data.test_images, data.test_labels
    labels = torch.tensor([index[name] for name in data.classes], dtype=torch.int64)[labels]
    scored = replace(data, test_images=images, test_labels=labels)
    print(f"Scored on {spec}: {len(labels):,} images ({'all of it' if data.held_out_test else 'its test split'})")
    loss, correct, total = evaluate_trained(trained, evaluation_loader(scored, cfg.test_batch_size, trained.mean,
                                                                       trained.std))
    print(test_line(loss, correct, total))
    return 0


def evaluate_trained(trained: TrainedModel, loader) -> tuple[float, int, int]:
    """(loss, correct, total) of the run's model on `loader`, on the CPU, in the precision and
    memory format the run trained (and evaluated) in, so that its test line comes back: bf16 sums
    and channels-last convolutions round differently."""
    from ..loop.devices import bf16_supported
    from ..loop.engine import evaluate

    cpu = torch.device("cpu")
    amp_dtype = torch.bfloat16 if trained.cfg.precision == "bf16" and bf16_supported(cpu) else None
    if trained.cfg.channels_last == "on":
        trained.model.to(memory_format=torch.channels_last)
        loader.channels_last = True      # the batches too, as the run's loaders made them
    return evaluate(trained.model, loader, device=cpu, amp_dtype=amp_dtype)


def prepare_files(trained: TrainedModel, paths: list[Path]) -> tuple[torch.Tensor, list[list[str]]]:
    """Image files as the run's model takes them (preprocess.prepare_image, as `serve` does), and
    each one's notes (inverted, framed like MNIST, made grayscale, squashed)."""
    from ..data.preprocess import prepare_image

    from ..inputs import regular_file

    prepared = []
    for path in paths:
        path = regular_file(path, "image")     # a pipe or a device is one line, never a hang
        prepared.append(prepare_image(path, trained.cfg.dataset, trained.image_shape, resize=trained.cfg.resize,
                                      deep=trained.deep))
    return torch.stack([image for image, _ in prepared]), [notes for _, notes in prepared]


@torch.no_grad()
def predict_files(trained: TrainedModel, paths: list[Path]) -> torch.Tensor:
    """Class probabilities (N, classes) for image files, preprocessed as in training."""
    return trained.probabilities(prepare_files(trained, paths)[0])


def preprocessing(trained: TrainedModel) -> dict:
    """What a caller must do to an image before the model sees it, as plain data."""
    c, h, w = trained.image_shape
    return {"image_shape": [c, h, w], "channels": c, "color": "grayscale" if c == 1 else "RGB",
            "scale": "pixel / 255", "mean": list(trained.mean), "std": list(trained.std),
            "classes": trained.classes, "outputs": trained.outputs}


def with_onnx_metadata(data: bytes, trained: TrainedModel) -> bytes:
    """The ONNX model with its preprocessing and class names as metadata (read back by `predict`)."""
    import onnx

    proto = onnx.load_from_string(data)
    for key, value in preprocessing(trained).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"trainkit.{key}", json.dumps(value)
    return proto.SerializeToString()


def _check_output(output: Path) -> Path:
    """Refuse, before any work, an output that cannot be written or must not be overwritten
    (outputs.check_output: the rule every file a command writes follows)."""
    from ..outputs import check_output

    return check_output(output, "--output")


def export(trained: TrainedModel, fmt: str, output: Path) -> Path:
    """Write the model as `fmt` to `output`: whole or not at all (a temporary file, then a rename)."""
    output = Path(output)
    _check_output(output)
    example = torch.zeros(1, *trained.image_shape)
    buffer = io.BytesIO()  # exported in memory first, so a failed write is one OSError, below
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in trained.model.state_dict().items()})
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # torch's deprecation notices would bury an error line
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
            try:
                scripted = torch.jit.trace(trained.model, example)
            except Exception as exc:
                raise TrainkitError(f"the model could not be traced to TorchScript: {exc}") from None
            torch.jit.save(scripted, buffer)
        data = buffer.getvalue()
    else:
        if importlib.util.find_spec("onnx") is None:
            raise TrainkitError("ONNX export needs the onnx package: pip install trainkit[onnx]")
        name = trained.outputs       # "log_probs" or "logits": what the numbers are
        torch.onnx.export(trained.model, (example,), buffer, input_names=["images"], output_names=[name],
                          dynamic_axes={"images": {0: "batch"}, name: {0: "batch"}}, dynamo=False)
        data = with_onnx_metadata(buffer.getvalue(), trained)
    from ..outputs import write_output

    write_output(output, data, "--output")   # read-only folder, full disk, quota: one line, nothing left behind
    return output


def cmd_export(args) -> int:
    run_dir = Path(args.run_dir)
    suffix = {"onnx": "model.onnx", "torchscript": "model.ts", "safetensors": "model.safetensors"}[args.format]
    output = Path(args.output) if args.output else run_dir / suffix
    if output.name in RUN_FILES and output.resolve().parent == run_dir.resolve():  # rundir.FILES
        raise TrainkitError(f"{output} is part of the run; it is not overwritten, choose another --output")
    _check_output(output)  # before the model is loaded: any run folder's files, links, read-only folders...
    trained = _load_from_args(args)
    export(trained, args.format, output)
    print(f"Exported {args.format} to {output}")
    return 0


def _add_model_flags(parser) -> None:
    # not add_config_flags: its help would say "(default: s5net)", where the default is the run's own model
    parser.add_argument("--model", default=argparse.SUPPRESS,
                        help="build this model instead of the one the run's config.json names: a registered "
                             "model, module:factory or file.py:factory (default: the run's own)")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the model code that the run's config.json names (module:factory or file.py)")


def add_command(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run's model on its test set, or on another labelled set")
    ev.add_argument("run_dir")
    add_config_flags(ev, only=("data_dir",))
    ev.add_argument("--dataset", dest="score_on", metavar="SPEC",
                    help="score the run on another labelled set of its classes (imagefolder:DIR, csv:FILE, ...): "
                         "its test split, or all of it when it is one split (default: the run's own test set)")
    _add_model_flags(ev)
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export a run's model to ONNX, TorchScript or safetensors")
    ex.add_argument("run_dir")
    _add_model_flags(ex)
    ex.add_argument("--format", choices=["onnx", "torchscript", "safetensors"], default="onnx")
    ex.add_argument("--output", help="output file (default: model.onnx / model.ts / model.safetensors in the run)")
    ex.set_defaults(func=cmd_export)
