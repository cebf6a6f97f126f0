"""The models floor: the networks and the registry they are built from. `MODELS`, `build_model` and
`register_model` are here, with a user's own `module:factory` or `file.py:factory` (imported only
through the code gate); `pretrained.py` reads `--pretrained` weights offline from a cache or refuses
in one line. It imports only the root's base modules: a model knows no data, loop, run or command.

Networks and a small registry: `build_model("s5net")`, or your own `module:factory`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TrainkitError
from ..registry import Registry

MODELS = Registry("model")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory `fn(in_channels=1, num_classes=10)` under its own name."""
    return MODELS.register()(fn)


class S5Net(nn.Module):
    """The seed's network: four 3x3 convolutions, two max-pools, two linear layers (593,200 parameters).

    Input (B, 1, 28, 28); output (B, num_classes) log-probabilities.
    """

    image_size = (28, 28)   # the only size it takes: flatten expects 256 x 4 x 4 = 4096 features

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3)
        self.conv4 = nn.Conv2d(128, 256, kernel_size=3)
        self.fc1 = nn.Linear(4096, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))                      # (B, 32, 26, 26)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))     # (B, 64, 12, 12)
        x = F.relu(self.conv3(x))                      # (B, 128, 10, 10)
        x = F.relu(F.max_pool2d(self.conv4(x), 2))     # (B, 256, 4, 4)
        x = x.flatten(1)                               # (B, 4096)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


@register_model
def s5net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return S5Net(in_channels, num_classes)


def _conv_block(cin: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Dropout2d(dropout))


class CompactNet(nn.Module):
    """A small network in the course's next style: batch norm, dropout, global average pooling.

    Under 20,000 parameters; input (B, C, 28, 28), output log-probabilities.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.05):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, 8, dropout), _conv_block(8, 16, dropout),   # (B, 16, 28, 28)
            nn.MaxPool2d(2),                                                      # (B, 16, 14, 14)
            nn.Conv2d(16, 8, 1, bias=False),                                      # 1x1 squeeze
            _conv_block(8, 16, dropout), _conv_block(16, 16, dropout),
            nn.MaxPool2d(2),                                                      # (B, 16, 7, 7)
            _conv_block(16, 24, dropout), _conv_block(24, 32, dropout),
        )
        self.head = nn.Conv2d(32, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(x))                # (B, classes, 7, 7)
        return F.log_softmax(x.mean((2, 3)), dim=1)    # global average pooling


@register_model
def compact(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return CompactNet(in_channels, num_classes)


class SpeedNet(nn.Module):
    """A small, fast network for the MNIST speed run: three conv-BN-ReLU-pool stages and a linear head.

    Input (B, C, 28, 28); output log-probabilities.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        layers, cin = [], in_channels
        for cout in widths:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(3))        # the identity at 28x28; any size from 28 up
        self.features = nn.Sequential(*layers)        # (B, widths[-1], 3, 3)
        self.head = nn.Linear(widths[-1] * 9, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.features(x).flatten(1)), dim=1)


@register_model
def speednet(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return SpeedNet(in_channels, num_classes)


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    """`package.module:factory` (importable from the current folder) or `path/file.py:factory`."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise TrainkitError(f"model file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"trainkit_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(target)
    except TrainkitError:
        raise
    except Exception as exc:
        raise TrainkitError(f"cannot import model {spec!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TrainkitError(f"model {spec!r}: {target} has no callable named {attr!r}")
    return factory


ZOOS = ("torchvision", "timm")   # --model torchvision:NAME, --model timm:NAME


def check_model_name(name: str) -> None:
    """Fail early (before any data is read) on a model name that is neither registered nor a factory path."""
    if ":" not in name and name not in MODELS:
        raise TrainkitError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, "
                            f"torchvision:NAME, timm:NAME, module:factory or file.py:factory")


def is_code(name: str) -> bool:
    """Whether building this model imports user code (module:factory or file.py:factory)."""
    return ":" in name and name.split(":", 1)[0] not in ZOOS


def _call_factory(name: str, factory: Callable, in_channels: int, num_classes: int) -> nn.Module:
    """Call a factory with the arguments it accepts (in_channels, num_classes); any error is one line."""
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_any = {}, False
    kwargs = {k: v for k, v in (("in_channels", in_channels), ("num_classes", num_classes))
              if takes_any or k in params}
    try:
        model = factory(**kwargs)
    except TrainkitError:
        raise
    except Exception as exc:
        raise TrainkitError(f"model {name!r}: the factory failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise TrainkitError(f"model {name!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Give the first convolution `in_channels` inputs (torchvision's models are made for 3)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        child.dilation, child.groups, child.bias is not None, child.padding_mode))
                return


def _torchvision_model(arch: str, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise TrainkitError(f"torchvision has no model {arch!r} (see torchvision.models.list_models())")
    try:
        if pretrained:
            model = torchvision.models.get_model(arch, weights="DEFAULT")
            _replace_head(model, num_classes)
        else:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as exc:   # offline, or no weights for it
        raise TrainkitError(f"torchvision:{arch} could not be built{' with pretrained weights' * pretrained}: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    _adapt_input_channels(model, in_channels)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """The last linear layer, remade for `num_classes` outputs (pretrained models have 1000)."""
    last = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last is not None and last[2].out_features != num_classes:
        parent, child_name, child = last
        setattr(parent, child_name, nn.Linear(child.in_features, num_classes))


def _timm_model(arch: str, in_channels: int, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise TrainkitError("--model timm:NAME needs timm: pip install trainkit[timm]") from None
    if not timm.is_model(arch):
        raise TrainkitError(f"timm has no model {arch!r} (see timm.list_models())")
    try:
        return timm.create_model(arch, pretrained=pretrained, in_chans=in_channels, num_classes=num_classes)
    except Exception as exc:   # offline (no weights), or a model that cannot take these arguments
        raise TrainkitError(f"timm:{arch} could not be built{' with pretrained weights' * pretrained}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """A registered model by name, torchvision:NAME or timm:NAME, or a user factory given as
    module:factory or file.py:factory. Only the zoos download weights, and only with `pretrained`."""
    zoo, _, arch = name.partition(":")
    if pretrained and zoo in ZOOS and arch:
        from .pretrained import prepare
        prepare(name)           # offline: one line in seconds, not a minute of retries (the Python API too)
    if zoo == "torchvision" and arch:
        return _torchvision_model(arch, in_channels, num_classes, pretrained)
    if zoo == "timm" and arch:
        return _timm_model(arch, in_channels, num_classes, pretrained)
    if pretrained:
        raise TrainkitError(f"--pretrained needs a model from torchvision:NAME or timm:NAME, not {name!r}")
    if ":" in name:
        factory = _load_factory(name)
    else:
        check_model_name(name)
        factory = MODELS[name]
    return _call_factory(name, factory, in_channels, num_classes)


def output_kind(model: nn.Module, image_shape: tuple[int, ...], num_classes: int, name: str,
                device: torch.device | str = "cpu") -> str:
    """Run the model once on a dummy batch of two images: a model that fails, or gives the wrong
    shape, is one line here, before any run folder is made. Returns "log_probs" when its outputs
    are log-probabilities (each row's exp sums to 1), else "logits"."""
    needs = getattr(model, "image_size", None)
    if isinstance(needs, int):      # torchvision's VisionTransformer: one side of a square image
        needs = (needs, needs)
    if needs is not None and tuple(image_shape[1:]) != tuple(needs):
        raise TrainkitError(f"model {name!r} ({type(model).__name__}) needs {needs[0]}x{needs[1]} images, "
                            f"these are {image_shape[1]}x{image_shape[2]}; use another model (compact, speednet, "
                            f"torchvision:NAME, timm:NAME) or --image-size {needs[0]}")
    x = torch.zeros(2, *image_shape, device=device)
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            out = model(x)
    except Exception as exc:
        raise TrainkitError(f"model {name!r} cannot take images of shape {list(image_shape)}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TrainkitError(f"model {name!r} gives outputs of shape {shape} for a batch of 2 images; "
                            f"it must give [2, {num_classes}] (one score per class)")
    out = out.float()
    sums = out.exp().sum(1)
    return "log_probs" if bool((out <= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3)) \
        else "logits"


def model_source(name: str) -> dict:
    """How to build this model again, as config.json records it: a registry name, a zoo name, an
    importable module:factory, or a file with its sha256 (so that a changed file is noticed)."""
    if ":" not in name:
        return {"kind": "registry", "name": name}
    target, _, attr = name.rpartition(":")
    if name.split(":", 1)[0] in ZOOS:
        return {"kind": "zoo", "name": name}
    if target.endswith(".py"):
        path = Path(target).resolve()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        return {"kind": "file", "name": f"{path}:{attr}", "path": str(path), "sha256": digest}
    return {"kind": "module", "name": name}


# ---------------------------------------------------------------------------------------------
# The one gate for models named by a file that trainkit wrote (a run's config.json, a checkpoint's
# settings, a config file made from a run). Such a file is data: opening it never imports code.

_ZOO_ARCH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")   # resnet18, vit_b_16, vit_base_patch16_224.augreg_in1k


def _classify(name: str) -> str:
    """"registry", "zoo", "python" or "code", judged by the name itself, never by what a record claims."""
    if ":" not in name:
        return "registry"
    zoo, _, arch = name.partition(":")
    if zoo in ZOOS:
        return "zoo" if _ZOO_ARCH.fullmatch(arch) else "bad"
    if zoo == "python":
        return "python"
    return "code"


def _file_of(name: str) -> Path | None:
    target = name.rpartition(":")[0]
    return Path(target) if target.endswith(".py") else None


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    except OSError:
        return None


def gated_model_name(origin: str, recorded: str, record: dict | None = None, *, named: str | None = None,
                     trust_code: bool = False, strict_file: bool = False) -> str:
    """The model name to build for a run (or config file) that trainkit wrote, decided before anything
    is imported. `recorded` is the model its settings name, `record` its config.json "model" section
    (model_source's dict) when it has one, `origin` the file read (for messages).

    - A name the user gives again on the command line (`named`) is theirs to build.
    - A registered name is looked up; a torchvision:NAME or timm:NAME is looked up in the zoo; a name
      that only claims to be one (a path, say) is refused, whatever the record's "kind" says.
    - Code (module:factory, file.py:factory) is imported only with `trust_code`, and a file only while
      its sha256 is the one recorded when the run was trained.
    `strict_file`: a named file that changed since training is refused too (a resumed run must go on
    with the network it started with); otherwise it is used, with a warning.
    """
    record = record if isinstance(record, dict) else {}
    recorded_sha = record.get("sha256") if record.get("kind") == "file" else None
    if isinstance(record.get("name"), str) and record.get("kind") in ("file", "module", "registry", "zoo") \
            and record["name"] != recorded and _classify(recorded) != "python":
        # The settings and the model section disagree: trust neither unless the user names the model.
        if named is None:
            raise TrainkitError(f"{origin} names two different models ({recorded!r} in its settings, "
                                f"{record['name']!r} in its model section); give --model to choose one")
    if named is not None:
        file = _file_of(named) if _classify(named) == "code" else None
        recorded_file = _file_of(recorded) if _classify(recorded) == "code" else None
        if file is not None and recorded_file is not None and recorded_sha and \
                file.resolve() == recorded_file.resolve() and _sha256(file) != recorded_sha:
            if strict_file:
                raise TrainkitError(f"{file} is not the file the run was trained with (its sha256 differs from "
                                    f"{origin}'s); restore it, or start a new run from these weights with --init-from")
            print(f"trainkit: warning: {file} changed since the run was trained (its sha256 differs from "
                  f"{origin}'s); using it as --model names it", file=sys.stderr)
        return named
    kind = _classify(recorded)
    if kind == "registry":
        if recorded not in MODELS:
            raise TrainkitError(f"{origin} names a model {recorded!r} that is not registered; give --model")
        return recorded
    if kind == "zoo":
        return recorded
    if kind == "bad":
        raise TrainkitError(f"{origin} names {recorded!r}, which is not a torchvision or timm model name; "
                            f"it is not imported")
    if kind == "python":
        raise TrainkitError(f"{origin}: the model was built in Python ({recorded}); trainkit cannot build it again: "
                            f"give --model, or load it with trainkit.commands.inference.load_run(RUN, model=YourModel())")
    if not trust_code:
        raise TrainkitError(f"{origin} names code ({recorded}); a file trainkit wrote never runs code by being "
                            f"opened: give --model {recorded} again, or --trust-code to import it")
    file = _file_of(recorded)
    if file is not None:
        digest = _sha256(file)
        if digest is None or digest != recorded_sha:
            why = ("is missing" if digest is None else f"has no sha256 recorded in {origin}" if not recorded_sha
                   else f"is not the file the run was trained with (its sha256 differs from {origin}'s)")
            raise TrainkitError(f"{file} {why}; name the model with --model to use it anyway")
    print(f"trainkit: importing {recorded}, as {origin} names it (--trust-code)", file=sys.stderr)
    return recorded


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
