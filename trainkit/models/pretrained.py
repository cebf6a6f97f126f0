"""Published weights (`--pretrained` for torchvision:NAME and timm:NAME): fail in seconds, in one
line, where there is no network, rather than after a minute of retries.

    prepare("timm:resnet18")      # before build_model(..., pretrained=True)

Weights already in the local cache are used offline. Imports only the error type and the stdlib
(torchvision when a torchvision model's weights are looked up).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import TrainkitError

HUB_HOST = "huggingface.co"    # where timm's weights come from (the Hugging Face Hub)
TIMEOUT_S = 3.0


def reachable(host: str, port: int = 443, timeout: float = TIMEOUT_S) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` seconds (an HTTPS proxy counts as
    a way out: the download libraries use it)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def prepare(model: str) -> None:
    """Make the weights of `model` loadable without waiting on a network that is not there."""
    zoo, _, arch = model.partition(":")
    if zoo == "timm" and arch:
        if os.environ.get("HF_ENDPOINT") is None and not os.environ.get("HF_HUB_OFFLINE") and not reachable(HUB_HOST):
            # huggingface_hub then reads its cache only: cached weights load, others fail at once
            # (instead of five retries per file, each with a warning).
            os.environ["HF_HUB_OFFLINE"] = "1"
    elif zoo == "torchvision" and arch:
        _torchvision_weights(arch)


def _torchvision_weights(arch: str) -> None:
    import torch.hub
    import torchvision

    try:
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return                      # no published weights: build_model says so
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    host = urlparse(url).hostname or ""
    if not cached.is_file() and not reachable(host):
        raise TrainkitError(f"torchvision:{arch} --pretrained needs its weights from {host}, which cannot be reached "
                            f"within {TIMEOUT_S:g} s, and they are not in the cache ({cached}); copy the file "
                            f"there, or train without --pretrained")
