"""Networks and a small registry: `build_model("s5net")`, or your own `module:factory`."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import TrainkitError
from .registry import Registry

MODELS = Registry("model")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory `fn(in_channels=1, num_classes=10)` under its own name."""
    return MODELS.register()(fn)


class S5Net(nn.Module):
    """The seed's network: four 3x3 convolutions, two max-pools, two linear layers (593,200 parameters).

    Input (B, 1, 28, 28); output (B, num_classes) log-probabilities.
    """

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


def check_model_name(name: str) -> None:
    """Fail early (before any data is read) on a model name that is neither registered nor a factory path."""
    if ":" not in name and name not in MODELS:
        raise TrainkitError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}, "
                            f"or give module:factory or file.py:factory")


def build_model(name: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A registered model by name, or a user factory given as module:factory or file.py:factory."""
    if ":" in name:
        factory = _load_factory(name)
    else:
        check_model_name(name)
        factory = MODELS[name]
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes)
    except TypeError:
        model = factory()  # a factory that takes no arguments
    if not isinstance(model, nn.Module):
        raise TrainkitError(f"model {name!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
