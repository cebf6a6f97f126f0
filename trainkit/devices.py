"""Devices and precision: which device a run uses, whether it trains under bf16 autocast and in
channels_last, and (for `auto`) the measurement that decides it."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

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
    # auto without a measurement (`choose` resolves it for a run): bf16 on CUDA, fp32 elsewhere.
    if precision == "auto" and device.type == "cuda" and bf16_supported(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Choices made by measurement: --precision auto and --channels-last auto time a few training steps
# of each candidate (the run's model and batch, on this device) and keep the fastest.

MEASURE_SECONDS = 4.0     # all candidates together; each still gets one warm-up and one timed step
MAX_TIMED_STEPS = 3
MEASURE_CAP_SECONDS = 30.0  # past this, the candidates not yet timed are left out (a step can take seconds)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # CPU instructions that compute in bf16 (else emulated)
CPU_KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CACHE_FILE = "choices.json"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 runs on hardware made for it here: a CUDA GPU with bf16 units, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated (much slower than fp32) and not worth timing."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:   # torch before 2.3
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and bf16_supported(device):
        capability = torch.backends.cpu.get_cpu_capability().upper()
        return bool(cpu_flags() & set(CPU_BF16_FLAGS)) or "AMX" in capability or "BF16" in capability
    return False


@dataclass(frozen=True)
class Choice:
    precision: str          # "fp32" or "bf16"
    channels_last: str      # "on" or "off"

    @property
    def label(self) -> str:
        return f"{self.precision}, channels_last {self.channels_last}"


def candidates(precision: str, channels_last: str, device: torch.device) -> list[Choice]:
    """What `auto` chooses among; fp32 with channels_last first (the choice when nothing can be timed)."""
    precisions = [precision] if precision != "auto" else ["fp32", "bf16"] if bf16_native(device) else ["fp32"]
    layouts = [channels_last] if channels_last != "auto" else ["on", "off"]
    return [Choice(p, c) for p in precisions for c in layouts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on `device`: free GPU memory, or the host's available
    memory (less where a cgroup limits this process); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:   # cgroup v2: the limit, less what the group uses already
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def activation_bytes(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> int:
    """The bytes that one training forward of the batch `x` keeps for its backward (the tensors
    autograd saves, each storage counted once): the part of a step's memory that grows with the
    batch. The model's weights, buffers (a copy: batch norm's statistics stay) and the random
    number generators are left as they were."""
    from torch.func import functional_call

    seen: dict[tuple, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}   # saved too, but not per image

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[(id(t), t.device)] = t.numel() * t.element_size()
        return t

    state = {**dict(model.named_parameters()), **{k: v.clone() for k, v in model.named_buffers()}}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()
            loss = loss_fn(functional_call(model, state, (x,)), y)
        del loss
    finally:
        model.train(was_training)
    return sum(seen.values())


def check_memory(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, batch: int,
                 what: str) -> int | None:
    """Refuse, in one line, a batch whose training step cannot fit in the memory left on the device
    (it would be killed, or swap for minutes): an estimate from one forward of the few images in `x`,
    scaled to `batch`, plus the weights, their gradients and two optimizer states. Returns the
    estimate in bytes (None where the memory left cannot be told)."""
    free = available_memory(x.device)
    if free is None:
        return None
    try:
        per_image = activation_bytes(model, loss_fn, x, y) / len(x)
    except Exception:    # noqa: BLE001 - a model functional_call cannot run: no estimate, training will tell
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = int(per_image * batch + 4 * weights + x[:1].numel() * x.element_size() * batch)
    if needed > free:
        raise TrainkitError(f"{what}: one training step needs about {needed / 2**30:.1f} GiB "
                            f"({per_image / 2**20:.1f} MiB of activations per image), more than the "
                            f"{free / 2**30:.1f} GiB free on {x.device}; use a smaller --batch-size")
    return needed


def time_choice(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                choice: Choice, seconds: float, max_steps: int = MAX_TIMED_STEPS) -> tuple[list[float], bool]:
    """(seconds of each timed step, whether every loss was finite): one warm-up step, then timed
    steps while `seconds` last (at least one), on a copy of `model` with its own optimizer."""
    device = x.device
    model = copy.deepcopy(model).train()
    if choice.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters())
    dtype = torch.bfloat16 if choice.precision == "bf16" else None

    def step() -> float:
        with autocast(device, dtype):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()      # waits for the step

    begin = time.perf_counter()
    finite = math.isfinite(step())
    _sync(device)
    if time.perf_counter() - begin > seconds:    # one step is already over the budget: it stands as the timing
        return [time.perf_counter() - begin], finite
    times: list[float] = []
    begin = time.perf_counter()
    while not times or (len(times) < max_steps and time.perf_counter() - begin < seconds):
        start = time.perf_counter()
        finite = math.isfinite(step()) and finite
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, finite


def measure(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
            options: list[Choice], seconds: float = MEASURE_SECONDS, cap: float = MEASURE_CAP_SECONDS) -> dict:
    """Time each option and pick the fastest whose loss stayed finite (the first when none did).
    The run's model, optimizer and random number generators are left as they were."""
    device = x.device
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    timings = {}
    start = time.perf_counter()
    try:
        for option in options:
            if timings and time.perf_counter() - start > cap:   # the time cap: the rest are not timed
                timings[option.label] = {"seconds": None, "finite": False, "error": f"not timed: the measurement "
                                         f"passed its cap of {cap:g} s"}
                continue
            try:
                steps, finite = time_choice(model, make_optimizer, loss_fn, x, y, option, seconds / len(options))
            except Exception as exc:    # an operation without bf16 kernels, out of memory, ...: not a candidate
                timings[option.label] = {"seconds": None, "finite": False, "error": str(exc).split("\n")[0][:200]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            timings[option.label] = {"seconds": min(steps), "steps": [round(s, 6) for s in steps], "finite": finite}
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    usable = [o for o in options if timings[o.label]["finite"]]
    best = min(usable, key=lambda o: timings[o.label]["seconds"]) if usable else options[0]
    return {"choice": asdict(best), "timings": timings}


def cache_dir() -> Path:
    """$TRAINKIT_CACHE_DIR, else $XDG_CACHE_HOME/trainkit, else ~/.cache/trainkit."""
    if os.environ.get("TRAINKIT_CACHE_DIR"):
        return Path(os.environ["TRAINKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainkit"


def cache_key(device: torch.device, model: str, parameters: int, input_shape: tuple, options: list[Choice]) -> str:
    """What a measurement depends on: the machine, torch, the model and the batch (B, C, H, W)."""
    if device.type == "cuda":
        machine = {"gpu": torch.cuda.get_device_name(device)}
    else:
        machine = {"cpu": cpu_name(), "flags": sorted(cpu_flags() & set(CPU_KEY_FLAGS)),
                   "threads": torch.get_num_threads()}
    return json.dumps({"device": device.type, **machine, "torch": torch.__version__, "model": model,
                       "parameters": parameters, "input": list(input_shape),
                       "options": [o.label for o in options]}, sort_keys=True)


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_choice(key: str, options: list[Choice]) -> dict | None:
    """The cached measurement for `key`, or None (none, or a damaged file or entry: measured again)."""
    entry = _read_cache(cache_dir() / CACHE_FILE).get(key)
    try:
        if Choice(**entry["choice"]) in options and isinstance(entry["timings"], dict):
            return {"choice": dict(entry["choice"]), "timings": entry["timings"]}
    except (TypeError, KeyError):
        pass
    return None


def store_choice(key: str, entry: dict) -> None:
    """Keep a measurement in the cache; a cache that cannot be written is skipped, never an error."""
    path = cache_dir() / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def choose(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *,
           precision: str, channels_last: str, name: str) -> dict:
    """Resolve `auto` in --precision and --channels-last for `model` on batches like (x, y).

    Returns {"choice": {"precision", "channels_last"}, "timings": {label: seconds...}, "cached": bool}
    ("timings" is empty when there was nothing to choose). Under torchrun rank 0 measures and every
    rank takes its choice, so that all ranks train alike.
    """
    device = x.device
    options = candidates(precision, channels_last, device)
    if len(options) == 1:
        return {"choice": asdict(options[0]), "timings": {}, "cached": False}
    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        parameters = sum(p.numel() for p in model.parameters())
        key = cache_key(device, name, parameters, tuple(x.shape), options)
        result = cached_choice(key, options)
        if result is not None:
            result["cached"] = True
        else:
            result = measure(model, make_optimizer, loss_fn, x, y, options)
            store_choice(key, result)
            result["cached"] = False
        if precision == "auto" and not bf16_native(device) and device.type in ("cpu", "cuda"):
            result["not_timed"] = "bf16: emulated on this device, so not a candidate"
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return result
