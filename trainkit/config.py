"""Run settings as plain data: one frozen dataclass, named recipes, and file/JSON round trips.

The CLI builds its flags from the fields of `TrainConfig`, so a setting is declared once, here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrainkitError


# The facts each setting carries in its field's metadata, beside its help and its checks. The code
# that needs a fact reads it from here (`fact`, `settings_that`), never from a list of names of its own.
#
# `part`: the part of a run that reads the setting. A command that runs only some parts (lr-find:
# training steps, no epochs) offers only their flags, and refuses the others in one line (flags.py).
PARTS = {
    "data": "reading, splitting and batching the images",
    "model": "the network and its first weights",
    "step": "a training step: the optimizer's update, its batch, precision and device",
    "schedule": "the learning-rate schedule over the epochs",
    "loop": "the epochs: evaluation, stop rules, and the callbacks around the steps",
    "console": "what is shown while it runs",
    "tracking": "records kept beside the run's own files, in TensorBoard and MLflow",
}
# `on_resume`: what `train --resume` does with a flag that differs from the saved run.
ON_RESUME = {
    "fixed": "refused: the resumed run keeps its saved value",
    "free": "taken: the run goes on with the new value",
    "extend": "taken when it adds epochs to a run whose schedule is not planned for a fixed length",
}
_UNSET = object()


def _opt(default, help: str, *, part: str, choices=None, positive: bool = False, nonneg: bool = False,
         maximum=None, below=None, registry: str | None = None, computes: bool = True, on_resume: str = "fixed",
         env: str | None = None, fallback=None, older_runs=_UNSET):
    """A setting: its help, the rules `validate` checks (`maximum` inclusive, `below` exclusive), and
    its facts. `registry` names the registry its value is looked up in (the CLI lists the registered
    names). `part` (PARTS) reads it. `computes`: a change of it changes what the run computes (its
    weights and numbers), so `compare` shows it. `on_resume` (ON_RESUME). `env`: the environment
    variable that gives its value when it is not set (then `fallback`; `resolved`). `older_runs`: the
    value a run made before the setting existed ran with (its config.json lacks the key)."""
    if part not in PARTS or on_resume not in ON_RESUME:
        raise ValueError(f"part {part!r} or on_resume {on_resume!r} is not one of {list(PARTS)}, {list(ON_RESUME)}")
    meta = {"help": help, "choices": choices, "positive": positive, "nonneg": nonneg,
            "maximum": maximum, "below": below, "registry": registry,
            "part": part, "computes": computes, "on_resume": on_resume, "env": env, "fallback": fallback}
    if older_runs is not _UNSET:
        meta["older_runs"] = older_runs
    return field(default=default, metadata=meta)


INT64_MAX = 2**63 - 1     # torch and numpy hold integers in 64 bits
FLOAT32_MAX = 3.4028234663852886e38   # the optimizers apply lr, momentum, decay to float32 weights
MAX_TEXT = 4096           # no name or path is longer (PATH_MAX)
MAX_CONFIG_BYTES = 1 << 20


def show(value: Any, limit: int = 80) -> str:
    """A value for an error message, at most about `limit` characters. Containers are named, never
    printed: a YAML alias bomb is a small file whose repr runs to gigabytes."""
    if value is None or isinstance(value, (bool, float)):
        text = repr(value)
    elif isinstance(value, int):
        if value.bit_length() > 256:  # str() of a huge int is slow, and refused past 4300 digits
            digits = int((value.bit_length() - 1) * math.log10(2)) + 1  # exact, or one short
            digits += abs(value) >= 10**digits
            return f"an integer of {digits} digits"
        text = str(value)
    elif isinstance(value, str):
        text = repr(value[:limit])
        if len(text) <= limit + 2:  # escapes can make the repr of `limit` characters longer
            return text + ("..." if len(value) > limit else "")
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run: what it computes, and where and how it runs. Saved as config.json in
    every run. Each field carries its facts (`_opt`); docs/settings.md is their table."""

    model: str = _opt("s5net", "a registered model, or module:factory, or file.py:factory", part="model",
                      registry="model")
    dataset: str = _opt("mnist", "a registered dataset; imagefolder:PATH for a folder of images, csv:FILE, "
                                 "npz:FILE, hf:DIR, cifar10:DIR, cifar100:DIR or idx:DIR for your own files in "
                                 "those formats", part="data",
                        registry="dataset")
    # Where the files are, not what they are: data.json records and checks the data itself.
    data_dir: str | None = _opt(None, "data folder", part="data", computes=False, on_resume="free",
                                env="TRAINKIT_DATA_DIR", fallback="data")
    pretrained: bool = _opt(False, "start a torchvision:NAME or timm:NAME model from its published weights "
                                   "(downloaded, so not offline)", part="model")
    init_from: str | None = _opt(None, "start from the weights of a run folder (its model.pt) or a weights file",
                                 part="model")
    epochs: int = _opt(20, "number of epochs", part="loop", positive=True, on_resume="extend")
    batch_size: int = _opt(512, "images per training step", part="step", positive=True)
    test_batch_size: int = _opt(1000, "images per evaluation step", part="loop", positive=True)
    optimizer: str = _opt("sgd", "optimizer", part="step", registry="optimizer")
    lr: float = _opt(0.01, "learning rate (the peak for onecycle)", part="step", positive=True)
    momentum: float = _opt(0.9, "SGD momentum", part="step", nonneg=True)
    weight_decay: float = _opt(0.0, "weight decay", part="step", nonneg=True)
    nesterov: bool = _opt(False, "Nesterov momentum for SGD", part="step")
    scheduler: str = _opt("step", "learning-rate schedule", part="schedule", registry="scheduler")
    step_size: int = _opt(15, "StepLR: epochs between decays", part="schedule", positive=True)
    gamma: float = _opt(0.1, "StepLR: decay factor", part="schedule", positive=True)
    pct_start: float = _opt(0.25, "onecycle: fraction of steps spent warming up", part="schedule", positive=True,
                            below=1)
    label_smoothing: float = _opt(0.0, "label smoothing of the loss", part="step", nonneg=True, below=1)
    channels: int | None = _opt(None, "image channels: 1 (grayscale) or 3 (RGB); default: the dataset's own "
                                      "(an image folder is RGB if any image is in colour)", part="data",
                                choices=[1, 3])
    image_size: str | None = _opt(None, "image size, N or HxW (e.g. 32 or 48x64); default: the dataset's own "
                                        "(an image folder's most common size)", part="data")
    # Runs made before --resize were stretched: their config.json reads so (run_settings).
    resize: str = _opt("fit", "image files of another shape than --image-size (image folders, predict, serve): "
                              "fit (the shorter side to the size, the centre cropped: the aspect ratio kept) or "
                              "stretch", part="data", choices=["fit", "stretch"], older_runs="stretch")
    bad_files: str = _opt("skip", "image folders: files that are not images or cannot be read are left out and "
                                  "reported in one line (skip), or refused (error)", part="data",
                          choices=["skip", "error"])
    augment: str = _opt("auto", "training augmentation: seed (zoom and rotation, as the seed), flip-crop "
                                "(horizontal flips, 4-pixel padded crops), none; auto: seed for 1-channel "
                                "images, flip-crop for 3-channel ones", part="data",
                        choices=["auto", "seed", "flip-crop", "none"])
    pipeline: str = _opt("auto", "data path: tensor (held in memory, batched on the device), stream (an image "
                                 "folder read in batches by DataLoader workers, for folders larger than memory), "
                                 "torchvision (the seed's); auto: stream an image folder whose decoded images "
                                 "would pass half the available memory ($TRAINKIT_MEMORY_BUDGET), else tensor",
                         part="data", choices=["auto", "tensor", "stream", "torchvision"])
    precision: str = _opt("auto", "fp32, bf16 autocast, or auto (the faster on this device, timed on the run's "
                                  "model and batch; bf16 only where it is native)", part="step",
                          choices=["auto", "fp32", "bf16"])
    channels_last: str = _opt("auto", "channels_last memory format for 4-D activations: on, off, or auto "
                                      "(the faster, timed with --precision)", part="step",
                              choices=["auto", "on", "off"])
    compile: str = _opt("auto", "torch.compile the training step (with a fused optimizer): on, off, or auto "
                                "(timed after its compile, with --precision, and chosen only when it pays back "
                                "its compile time within the run's planned steps); --compile alone: on",
                        part="step", choices=["auto", "on", "off"])
    seed: int = _opt(1, "random seed (also of the --limit-train/--limit-test subsets and of a flat image folder's "
                        "test split)", part="data", nonneg=True, maximum=INT64_MAX)
    # Another device runs other kernels, so other floats (and auto's choices differ): it computes. A
    # run may still move to another machine when it is resumed.
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", part="step",
                       on_resume="free")
    # The torchvision pipeline seeds each worker on its own and deals them batches in turn, so the
    # count changes its augmentation (the other pipelines do not read it); it may change on resume.
    workers: int = _opt(2, "DataLoader workers (torchvision pipeline only)", part="data", nonneg=True,
                        on_resume="free")
    limit_train: int | None = _opt(None, "use only N training images, drawn from --seed class by class (as many of "
                                         "each class as the data has)", part="data", positive=True)
    limit_test: int | None = _opt(None, "use only N test images, drawn from --seed class by class; a class left "
                                        "out is named in a warning", part="data", positive=True)
    val_split: float | None = _opt(None, "hold out this fraction (or, from 1 up, this many) of the training "
                                         "images for validation: checks, best.pt, --patience and --target-acc "
                                         "then use it, and the test set is evaluated once at the end", part="data",
                                   positive=True)
    final: str = _opt("best", "with a validation split, the weights the run ends with (the final test, model.pt, "
                              "eval, export, serve): best (those of the best validation epoch) or last",
                      part="loop", choices=["best", "last"])
    target_acc: float | None = _opt(None, "stop once test accuracy (percent) reaches this", part="loop",
                                    positive=True, maximum=100)
    evals_per_epoch: int = _opt(1, "test-set evaluations per epoch, evenly spaced; with --target-acc "
                                   "training stops at the first that reaches it", part="loop", positive=True)
    patience: int | None = _opt(None, "stop when test accuracy has not improved for N epochs", part="loop",
                                positive=True)
    clip_grad_norm: float | None = _opt(None, "clip the gradients' total norm to this", part="step", positive=True)
    ema: float | None = _opt(None, "evaluate an exponential moving average of the weights with this decay "
                                   "(e.g. 0.999)", part="loop", positive=True, below=1)
    tensorboard: bool = _opt(False, "also write TensorBoard event files", part="tracking", computes=False,
                             on_resume="free")
    # Fixed on resume: a resumed run continues the MLflow run that last.pt names, at the saved URI.
    mlflow: str | None = _opt(None, "log the run to MLflow at this tracking URI; --mlflow alone: "
                                    "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder",
                              part="tracking", computes=False)
    mlflow_register: str | None = _opt(None, "with --mlflow: also register the logged model under this name in "
                                             "MLflow's model registry (a new version each run)", part="tracking",
                                       computes=False)
    progress: bool = _opt(True, "show progress bars", part="console", computes=False, on_resume="free")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, dict[str, Any]] = {
    # The course assignment's recipe, exactly.
    "seed": {},
    # The same network trained to a higher accuracy in a few epochs (see docs/results.md).
    # Test batches of 128 evaluate S5Net about 1.7x faster than 1000 on a 2-core CPU (step_probe.py).
    "fast": dict(epochs=2, batch_size=64, lr=0.1, scheduler="onecycle", pct_start=0.25,
                 label_smoothing=0.1, nesterov=True, weight_decay=5e-4, test_batch_size=128),
    # The compact network (batch norm, dropout, GAP, 15,730 parameters) to 99.4% (docs/results.md).
    "compact": dict(model="compact", epochs=20, batch_size=128, lr=0.1, scheduler="onecycle", pct_start=0.25,
                    nesterov=True),
    # A small network trained to 99.0% as quickly as possible (docs/results.md).
    "speedrun": dict(model="speednet", epochs=2, batch_size=128, lr=0.2, scheduler="onecycle",
                     pct_start=0.25, label_smoothing=0.1, nesterov=True, weight_decay=5e-4,
                     augment="none", target_acc=99.0, evals_per_epoch=2, test_batch_size=256),
}


def field_specs() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def flag_name(setting: str) -> str:
    """The command-line flag of a setting: batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")


def fact(setting: str, key: str) -> Any:
    """One fact of a setting: fact("epochs", "on_resume") -> "extend"."""
    specs = {f.name: f for f in field_specs()}
    if setting not in specs:
        raise TrainkitError(f"unknown setting {show(setting)}")
    return specs[setting].metadata[key]


def settings_that(**facts: Any) -> list[str]:
    """The settings (in TrainConfig's order) whose facts are as given; a set or tuple of values means
    any of them: settings_that(computes=False), settings_that(part=("data", "model"))."""
    def matches(value, wanted):
        return value in wanted if isinstance(wanted, (set, frozenset, tuple, list)) else value == wanted
    return [f.name for f in field_specs() if all(matches(f.metadata[k], v) for k, v in facts.items())]


def may_change_on_resume() -> set[str]:
    """The settings a flag may change when a run is resumed (on_resume "free" or "extend")."""
    return set(settings_that(on_resume=("free", "extend")))


def resolved(cfg: "TrainConfig", setting: str) -> Any:
    """A setting's value: as set, else its environment variable's (`env`), else its `fallback`.
    The one place where a setting's environment variable is read."""
    spec = next(f for f in field_specs() if f.name == setting)
    value = getattr(cfg, setting)
    if value in (None, "") and spec.metadata["env"]:     # empty: unset, as a shell's VAR= is
        value = _coerce(spec, os.environ.get(spec.metadata["env"]) or None)
    return spec.metadata["fallback"] if value in (None, "") else value


def kind_of(f: dataclasses.Field) -> str:
    """"int", "float", "str" or "bool": the field's type, without "| None"."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind.split(" ")[0]


_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value against its field's type and rules; raise TrainkitError naming the setting."""
    for f in field_specs():
        value = getattr(cfg, f.name)
        if value is None:
            continue
        flag = flag_name(f.name)
        kind, meta = kind_of(f), f.metadata
        if not _type_ok(kind, value):
            raise TrainkitError(f"{flag} must be {_KIND_NAMES[kind]}, got {show(value)}")
        if kind == "float" and not math.isfinite(value):
            raise TrainkitError(f"{flag} must be a finite number, got {show(value)}")
        if kind == "float" and abs(value) > FLOAT32_MAX:
            raise TrainkitError(f"{flag} must be at most {FLOAT32_MAX:.4g} in size (a 32-bit float), got {show(value)}")
        if kind == "int" and abs(value) > INT64_MAX:
            raise TrainkitError(f"{flag} must be at most {INT64_MAX}, got {show(value)}")
        if kind == "str" and (len(value) > MAX_TEXT or "\0" in value):
            raise TrainkitError(f"{flag} must be at most {MAX_TEXT} characters without NUL bytes, got {show(value)}")
        if meta.get("choices") and value not in meta["choices"]:
            raise TrainkitError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {show(value)}")
        if meta.get("positive") and not value > 0:
            raise TrainkitError(f"{flag} must be greater than 0, got {show(value)}")
        if meta.get("nonneg") and value < 0:
            raise TrainkitError(f"{flag} must not be negative, got {show(value)}")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise TrainkitError(f"{flag} must be at most {meta['maximum']}, got {show(value)}")
        if meta.get("below") is not None and not value < meta["below"]:
            raise TrainkitError(f"{flag} must be less than {meta['below']}, got {show(value)}")
    if cfg.val_split is not None and cfg.val_split >= 1 and not float(cfg.val_split).is_integer():
        # 1.5 was taken as a count and became 1 image: a fraction must be below 1, a count whole.
        raise TrainkitError(f"--val-split must be a fraction between 0 and 1 (0.1) or a whole number of images "
                            f"(5000), got {show(cfg.val_split)}")
    parse_image_size(cfg.image_size)
    return cfg


MAX_IMAGE_SIDE = 4096


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """--image-size "32" -> (32, 32), "48x64" -> (48, 64) (height x width); None stays None."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise TrainkitError(f"--image-size must be N or HxW (e.g. 32 or 48x64), got {show(text)}")
    h, w = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise TrainkitError(f"--image-size sides must be between 1 and {MAX_IMAGE_SIDE}, got {show(text)}")
    return h, w


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a value read from a file to the field's type, or raise TrainkitError."""
    if value is None:
        return None
    kind = kind_of(f)
    if kind == "str" and isinstance(value, bool) and "on" in (f.metadata.get("choices") or ()):
        return "on" if value else "off"     # --channels-last and --compile were true/false before auto
    if not isinstance(value, (str, int, float)):  # bool is an int
        # A list, a mapping, a date: named, never printed (see `show`).
        raise TrainkitError(f"setting {f.name!r} must be {_KIND_NAMES[kind]}, got {show(value)}")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise TrainkitError(f"setting {f.name!r}: {show(value)} is not a valid {kind}") from None


def run_settings(settings: dict[str, Any]) -> TrainConfig:
    """A run's recorded settings (config.json's "config") as the config it ran with. A setting added
    after the run was made takes the value runs ran with then (`older_runs`), not today's default."""
    older = {f.name: f.metadata["older_runs"] for f in field_specs() if "older_runs" in f.metadata}
    return from_mapping({**{k: v for k, v in older.items() if k not in settings}, **settings})


def from_mapping(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply a mapping of settings (from a file or JSON) on top of `base`; unknown keys are errors."""
    base = base or TrainConfig()
    if not isinstance(values, dict):
        raise TrainkitError(f"settings must be a mapping of names to values, got {show(values)}")
    fields = {f.name: f for f in field_specs()}
    changes = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TrainkitError(f"setting names must be strings, got {show(key)}")
        name = key.replace("-", "_")
        if name not in fields:
            raise TrainkitError(f"unknown setting {show(key)} (known: {', '.join(sorted(fields))})")
        changes[name] = _coerce(fields[name], value)
    return base.replace(**changes)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read settings from a YAML, TOML or JSON file (a run's config.json included)."""
    from .inputs import regular_file

    path = regular_file(path, "config file")    # a named pipe would block the open for ever
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:  # settings take a few hundred bytes; this is another file
            raise TrainkitError(f"config file {path} is {size} bytes, too large for a file of settings "
                                f"(at most {MAX_CONFIG_BYTES})")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise TrainkitError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TrainkitError(f"config file {path} is not UTF-8 text (byte {exc.start}); "
                            f"is it a file of settings?") from None
    if not text.strip():
        raise TrainkitError(f"config file {path} is empty; it should hold a mapping of settings")
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # every parser has its own error type
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TrainkitError(f"config file {path} could not be parsed: {reason}") from None
    if not isinstance(data, dict):
        raise TrainkitError(f"config file {path} must hold a mapping of settings, not {show(data)}")
    # A run's config.json keeps the settings under "config" beside the environment it ran in.
    if "config" in data:
        data = data["config"]
        if not isinstance(data, dict):
            raise TrainkitError(f"config file {path}: \"config\" must hold a mapping of settings (as in a "
                                f"run's config.json), not {show(data)}")
    return data


def resolve_data_dir(cfg: TrainConfig) -> Path:
    return Path(resolved(cfg, "data_dir"))


# Environment variables that are not settings: they change where files are kept or how fast they
# are read, never what a run computes, so config.json has nothing to record about them. Each is read
# by the module named (its file name). (A setting's own variable is its field's `env`.)
ENVIRONMENT = {
    "TRAINKIT_CACHE_DIR": ("cachedir.py", "where auto's measurements and the image caches are kept (default: "
                                          "$XDG_CACHE_HOME/trainkit, else ~/.cache/trainkit)"),
    "TRAINKIT_MEMORY_BUDGET": ("stream.py", "what a dataset held whole may take, e.g. 2G (default: half the "
                                            "available memory); --pipeline auto streams an image folder past it"),
    "TRAINKIT_STREAM_WORKERS": ("stream.py", "processes that decode a streamed image folder (default: one per "
                                             "usable core)"),
    "TRAINKIT_IMAGE_CACHE": ("stream.py", "on (the default) or off: a streamed folder's decoded image cache"),
    "TRAINKIT_MIRROR": ("fetch.py", "a mirror to download the datasets' files from instead of their "
                                         "published addresses (offline sites, tests)"),
    "TRAINKIT_DOWNLOAD_TIMEOUT": ("fetch.py", "seconds for one file's download, all mirrors together "
                                                   "(default: 120)"),
    "TRAINKIT_FAULT_AFTER_WRITES": ("checkpoint.py", "tests only: exit as SIGKILL would after this many "
                                                     "atomic writes"),
    "TRAINKIT_FAULT_TORN": ("checkpoint.py", "tests only: with the above, stop with the next temporary file "
                                             "written but not renamed"),
    "TRAINKIT_WRITE_LOG": ("checkpoint.py", "tests only: append the name of every file written to this file"),
}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def settings_markdown() -> str:
    """docs/settings.md: every setting with its facts, and the environment variables (a test checks
    that the file is this text; scripts/make_settings_doc.py writes it)."""
    lines = ["# Settings and their facts", "",
             "Generated from `TrainConfig`'s fields (trainkit/config.py) by `python scripts/make_settings_doc.py`;",
             "`tests/test_settings.py` checks that it is up to date. Each setting is a field of `TrainConfig`, a",
             "key of config.json and a flag of `train`.", "",
             "- **default**: a setting with an environment variable takes its value from it when it is not",
             "  set (`$VARIABLE, else ...`); the one place that reads it is `config.resolved`.",
             "- **computes**: a change of it changes what the run computes (its weights and numbers); `compare`",
             "  shows a setting that computes when runs differ in it, and hides the others.",
             "- **on --resume**: what `train --resume RUN_DIR` does with a flag that differs from the saved run:",
             *(f"  - {k}: {v}" for k, v in ON_RESUME.items()),
             "- **part**: the part of a run that reads it; a command that does not run that part (`lr-find`",
             "  runs no epochs) does not take its flag, and says so in one line:",
             *(f"  - {k}: {v}" for k, v in PARTS.items()),
             "", "| setting | flag | default | computes | on --resume | part | what it is |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in field_specs():
        m = f.metadata
        default = f"${m['env']}, else {m['fallback']}" if m["env"] else f.default
        lines.append(f"| {f.name} | `{flag_name(f.name)}` | {_cell(default)} | {'yes' if m['computes'] else 'no'} | "
                     f"{m['on_resume']} | {m['part']} | {_cell(m['help'])} |")
    lines += ["", "## Environment variables that are not settings", "",
              "They change where files are kept or how fast they are read, never what a run computes.", "",
              "| variable | read by | what it does |", "| --- | --- | --- |"]
    lines += [f"| {name} | {where} | {_cell(what)} |" for name, (where, what) in ENVIRONMENT.items()]
    return "\n".join(lines) + "\n"
