"""Devices and precision: which device a run uses, and whether it trains under bf16 autocast."""
from __future__ import annotations

import contextlib

import torch

from .errors import TrainkitError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainkitError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainkitError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainkitError("--device mps was asked for but MPS is not available here; use --device cpu")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "bf16":
        if not bf16_supported(device):
            raise TrainkitError(f"--precision bf16 is not supported on {device}; use --precision fp32")
        return torch.bfloat16
    # auto: bf16 where it is faster. On CUDA it is; on the 2-core AVX-512 CPU we measured, bf16
    # autocast made an S5Net step slower (0.79 s against 0.54 s in fp32), so CPUs stay in fp32.
    if precision == "auto" and device.type == "cuda" and bf16_supported(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
