"""Devices and precision: which device a run uses, whether it trains under bf16 autocast and in
channels_last, and (for `auto`) the measurement that decides it."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..cachedir import cache_dir
from ..errors import TrainkitError


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
# Choices made by measurement: --precision auto and --channels-last auto time training steps of
# each candidate (the run's model and batch, on this device) as a benchmark does: every candidate
# is warmed up first, then timed in interleaved rounds (A B C, A B C, ...) so that a change in the
# machine's speed falls on all of them alike. The default (the first candidate) stays unless
# another beats it by more than the spread of the rounds (`pick`).

WARMUP_STEPS = 2          # per candidate, untimed: the first allocates, picks kernels (or compiles),
                          # makes the optimizer's state; the second shows it all done
MIN_ROUNDS, MAX_ROUNDS = 3, 15
ROUND_SECONDS = 0.5       # a try's rounds go on past MIN_ROUNDS while they last under this
MEASURE_SECONDS = 10.0    # a noisy try is repeated only while the tries stay under this in all
MAX_TRIES = 3
MEASURE_CAP_SECONDS = 30.0  # past this, the candidates not yet warmed up are left out (a step can take seconds)
NOISY_SPREAD = 0.10       # rounds that vary more than this (interquartile range / median) cannot be trusted
BUSY_WAIT = 0.10          # nor can rounds in which our threads waited this share of their time for a core
MIN_MARGIN, NOISY_MARGIN = 0.05, 0.25   # the least a non-default must win by (of the default's median)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # CPU instructions that compute in bf16 (else emulated)
CPU_KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CACHE_FILE = "choices.json"
TIMING_METHOD = "warm interleaved rounds"   # in the cache key: entries timed by earlier rules are not reused


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
    compile: str = "off"    # "on": the step under torch.compile, with a fused (or foreach) optimizer

    @property
    def label(self) -> str:
        return f"{self.precision}, channels_last {self.channels_last}" + (", compiled" if self.compile == "on" else "")


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


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot compile for `device` here, or None: on a CPU its code generator
    builds C++ and needs a compiler ($CXX, else g++), which a slim image may lack."""
    if device.type != "cpu":
        return None
    try:
        from torch._inductor import cpp_builder
    except ImportError:         # another torch layout: compiling will say for itself
        return None
    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:    # noqa: BLE001 - InvalidCxxCompiler, and whatever the search raises
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"torch.compile found no C++ compiler to build its CPU code with ({reason[:160]})"
    return None


def compiled(model: nn.Module) -> nn.Module:
    """`model` under torch.compile, one graph per batch shape (dynamic=False): a run has at most two
    (its batch and a shorter last one), and static shapes make the faster kernels."""
    # Inductor's C++ builder warns "No CUDA runtime is found" on every CPU-only machine: not news.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(model, dynamic=False)


def stepper(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
            choice: Choice) -> Callable[[], tuple[float, bool]]:
    """A training step of `choice` on its own copy of `model` with its own optimizer: each call
    runs one step and returns (its seconds, whether the loss was finite)."""
    device = x.device
    model = copy.deepcopy(model).train()
    if choice.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), fused=True) if choice.compile == "on" else \
        make_optimizer(model.parameters())
    if choice.compile == "on":
        model = compiled(model)
    dtype = torch.bfloat16 if choice.precision == "bf16" else None

    def step() -> tuple[float, bool]:
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)    # gradients freed while the other candidates step
        finite = math.isfinite(loss.item())      # waits for the step
        _sync(device)
        return time.perf_counter() - start, finite

    return step


def _first_line(exc: Exception) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def cpu_wait() -> tuple[int, int] | None:
    """(nanoseconds on a core, nanoseconds waiting for one) of this process's threads so far, from
    Linux's /proc/self/task/*/schedstat; None where that cannot be read."""
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            fields = Path(f"/proc/self/task/{task}/schedstat").read_text().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
        except (OSError, ValueError, IndexError):
            continue        # a thread that ended meanwhile
    return (run, wait) if run else None


def waited_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of their time this process's threads spent waiting for a core between two
    `cpu_wait` readings: near 0 on quiet cores, large where other processes take them."""
    if before is None or after is None:
        return None
    run, wait = max(after[0] - before[0], 0), max(after[1] - before[1], 0)
    return round(wait / (run + wait), 3) if run + wait else None


def spread(times: list[float]) -> float:
    """How much timings of one thing vary: their interquartile range over their median (0.05 is
    5%); 1.0 (unknown) for fewer than two."""
    if len(times) < 2:
        return 1.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return round((q3 - q1) / statistics.median(times), 4)


def judge_rounds(times: dict[str, list[float]], waited: float | None = None) -> dict:
    """Rounds of timings ({label: [seconds, ...]}) judged: {"rounds", "spread": {label: spread},
    "waited", "noisy"}. Noisy: a spread past NOISY_SPREAD, or our threads waited for a core more
    than BUSY_WAIT of the time (another process took the cores)."""
    spreads = {label: spread(t) for label, t in times.items()}
    noisy = max(spreads.values()) > NOISY_SPREAD or (waited or 0.0) > BUSY_WAIT
    return {"rounds": times, "spread": spreads, "waited": waited, "noisy": noisy}


def timed_rounds(steps: dict[str, Callable], seconds: float = ROUND_SECONDS) -> dict:
    """Interleaved rounds: each runs one step of every candidate in turn (A B C, A B C, ...), so
    that a change in the machine's speed falls on all alike; at least MIN_ROUNDS, more while
    `seconds` last, at most MAX_ROUNDS. Returns `judge_rounds`'s dict with "finite": {label: bool}
    and "seconds" (how long the rounds took) added."""
    times: dict[str, list[float]] = {label: [] for label in steps}
    finite = dict.fromkeys(steps, True)
    before, start = cpu_wait(), time.perf_counter()
    done = 0
    while done < MIN_ROUNDS or (done < MAX_ROUNDS and time.perf_counter() - start < seconds):
        for label, step in steps.items():
            took, ok = step()
            times[label].append(round(took, 6))
            finite[label] = finite[label] and ok
        done += 1
    return {**judge_rounds(times, waited_share(before, cpu_wait())), "finite": finite,
            "seconds": round(time.perf_counter() - start, 3)}


def timed_tries(steps: dict[str, Callable], seconds: float = ROUND_SECONDS,
                budget: float = MEASURE_SECONDS) -> list[dict]:
    """`timed_rounds` of `steps`, tried again while noisy: at most MAX_TRIES, and only while one
    more try (as long as the last) keeps the tries within `budget` seconds."""
    tries = [timed_rounds(steps, seconds)]
    while tries[-1]["noisy"] and len(tries) < MAX_TRIES and \
            sum(t["seconds"] for t in tries) + tries[-1]["seconds"] <= budget:
        tries.append(timed_rounds(steps, seconds))
    return tries


def summarize(tries: list[dict], warmups: dict[str, list[float]]) -> tuple[dict, dict]:
    """({label: {"seconds": median, "spread", "finite", "rounds": [[...] of each try], "warmup"}},
    {"tries": [{"rounds", "spread", "waited", "noisy"}], "noisy", "spread": the widest of the
    candidates', "waited": the least share of any try}). The medians and spreads are those of the
    first quiet try; when every try was noisy, those of all their rounds together."""
    quiet = [t for t in tries if not t["noisy"]]
    rounds = {label: quiet[0]["rounds"][label] if quiet else [s for t in tries for s in t["rounds"][label]]
              for label in warmups}
    timings = {label: {"seconds": round(statistics.median(rounds[label]), 6), "spread": spread(rounds[label]),
                       "finite": all(t.get("finite", {}).get(label, True) for t in tries),
                       "rounds": [t["rounds"][label] for t in tries], "warmup": warmup}
               for label, warmup in warmups.items()}
    summary = [{"rounds": len(next(iter(t["rounds"].values()))), "spread": max(t["spread"].values()),
                "waited": t["waited"], "noisy": t["noisy"]} for t in tries]
    waits = [t["waited"] for t in tries if t["waited"] is not None]
    return timings, {"tries": summary, "noisy": not quiet, "spread": max(t["spread"] for t in timings.values()),
                     "waited": min(waits, default=None)}


def margin(timing: dict, default: dict, noisy: bool = False) -> float:
    """The share of the default's median that `timing` must beat it by: the larger spread of the
    two, and at least MIN_MARGIN (NOISY_MARGIN for a noisy measurement; a spread not recorded
    counts as 100%)."""
    return max(timing.get("spread", 1.0), default.get("spread", 1.0), NOISY_MARGIN if noisy else MIN_MARGIN)


def pick(timings: dict[str, dict], default: str, noisy: bool = False) -> str:
    """The decision rule, on recorded timings ({label: {"seconds": median, "spread", "finite"}}):
    the default stays unless another candidate's median beats it by more than the larger of their
    two spreads and at least MIN_MARGIN (NOISY_MARGIN when the measurement was noisy) of the
    default's median; of those that do, the fastest. A default that did not time (an error, a loss
    not finite) yields to the fastest that did."""
    usable = {label: t for label, t in timings.items()
              if t.get("finite") and isinstance(t.get("seconds"), (int, float))}
    if default not in usable:
        return min(usable, key=lambda label: usable[label]["seconds"]) if usable else default
    base = usable[default]
    winners = [label for label, t in usable.items()
               if label != default and base["seconds"] - t["seconds"] > margin(t, base, noisy) * base["seconds"]]
    return min(winners, key=lambda label: usable[label]["seconds"]) if winners else default


def _warm_up(steps: dict[str, Callable], label: str, step: Callable) -> dict:
    """Run `step`'s untimed warm-up steps and add it to `steps`: {"warmup": [seconds], "finite"}."""
    warm = [step() for _ in range(WARMUP_STEPS)]
    steps[label] = step
    return {"warmup": [round(t, 6) for t, _ in warm], "finite": all(ok for _, ok in warm)}


def measure(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
            options: list[Choice], seconds: float = ROUND_SECONDS, cap: float = MEASURE_CAP_SECONDS,
            budget: float = MEASURE_SECONDS) -> dict:
    """Warm up every option, time them in interleaved rounds (again while noisy) and `pick`, the
    first option being the default. Returns {"choice": {"precision", "channels_last"}, "timings":
    {label: see `summarize`, or {"seconds": None, "finite": False, "error"}}, "tries", "noisy",
    "measure_seconds"}. The run's model, optimizer and random number generators are left as they were."""
    device = x.device
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    start = time.perf_counter()
    steps: dict[str, Callable] = {}
    warm, failed = {}, {}
    try:
        for option in options:
            if steps and time.perf_counter() - start > cap:   # the time cap: the rest are not timed
                failed[option.label] = f"not timed: the measurement passed its cap of {cap:g} s"
                continue
            try:
                warm[option.label] = _warm_up(steps, option.label,
                                              stepper(model, make_optimizer, loss_fn, x, y, option))
            except Exception as exc:    # an operation without bf16 kernels, out of memory, ...: not a candidate
                failed[option.label] = _first_line(exc)[:200]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        try:
            tries = timed_tries(steps, seconds, budget) if steps else []
        except Exception as exc:    # out of memory with every candidate held at once, ...: the default
            failed.update({label: f"failed in the timed rounds: {_first_line(exc)}"[:200] for label in warm})
            warm, tries = {}, []
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    timings, summary = summarize(tries, {label: w["warmup"] for label, w in warm.items()}) if tries else \
        ({}, {"tries": [], "noisy": False, "spread": None, "waited": None})
    for label, w in warm.items():
        timings[label]["finite"] = timings[label]["finite"] and w["finite"]
    timings.update({label: {"seconds": None, "finite": False, "error": why} for label, why in failed.items()})
    timings = {o.label: timings[o.label] for o in options}     # in the candidates' order
    best = next(o for o in options if o.label == pick(timings, options[0].label, summary["noisy"]))
    # The uncompiled choice, as the cache has always held it: compiling is decided after (decide_compile).
    return {"choice": {"precision": best.precision, "channels_last": best.channels_last}, "timings": timings,
            **summary, "measure_seconds": round(time.perf_counter() - start, 3)}


def measure_compiled(model: nn.Module, make_optimizer: Callable, loss_fn: Callable, x: torch.Tensor,
                     y: torch.Tensor, choice: Choice, seconds: float = ROUND_SECONDS,
                     budget: float = MEASURE_SECONDS) -> dict:
    """The compiled step of `choice` against the uncompiled one, both warmed up (the compile
    happens in the compiled warm-up) and then timed in interleaved rounds, again while noisy:
    {"seconds": median, "spread", "finite", "rounds", "warmup", "compile_seconds" (the first step
    less the median: what compiling cost), "eager": the uncompiled step's {"seconds", "spread",
    "rounds"} from the same rounds, "tries", "noisy"}, or {"seconds": None, "finite": False,
    "error"} where torch.compile fails (no C++ compiler, an operation it cannot trace, ...). The
    run's random number generators are left as they were."""
    missing = compile_unavailable(x.device)
    if missing:
        return {"seconds": None, "finite": False, "error": missing}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if x.device.type == "cuda" else None
    steps: dict[str, Callable] = {}
    try:
        warm = {"eager": _warm_up(steps, "eager", stepper(model, make_optimizer, loss_fn, x, y, choice)),
                "compiled": _warm_up(steps, "compiled", stepper(model, make_optimizer, loss_fn, x, y,
                                                                replace(choice, compile="on")))}
        tries = timed_tries(steps, seconds, budget)
    except Exception as exc:    # noqa: BLE001 - torch.compile raises many types; the candidate is left out
        return {"seconds": None, "finite": False, "error": f"{type(exc).__name__}: {_first_line(exc)}"[:200]}
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    timings, summary = summarize(tries, {label: w["warmup"] for label, w in warm.items()})
    found, eager = timings["compiled"], timings["eager"]
    return {**found, "finite": found["finite"] and warm["compiled"]["finite"],
            "compile_seconds": round(max(found["warmup"][0] - found["seconds"], 0.0), 3),
            "eager": {k: eager[k] for k in ("seconds", "spread", "rounds")}, **summary}


# Measuring is done only for a run long enough that it could pay back: a choice saves at best this
# fraction of a step, and compiling costs at least this many seconds per batch shape (a warm
# inductor cache included). Short runs (a smoke test's, most tests') keep the defaults.
MAX_SAVING = 0.5
MIN_COMPILE_SECONDS = 15.0


def worth_measuring(options: int, steps: int) -> bool:
    """Whether a run of `steps` could win back the steps that timing `options` candidates takes
    (each warmed up and timed for MIN_ROUNDS rounds, at the least)."""
    return steps * MAX_SAVING >= options * (WARMUP_STEPS + MIN_ROUNDS)


def could_pay_back(step_seconds: float, steps: int, shapes: int = 1) -> bool:
    return step_seconds * steps * MAX_SAVING > MIN_COMPILE_SECONDS * shapes


def payback(eager: float, compiled_step: float, compile_seconds: float, steps: int, shapes: int = 1) -> dict:
    """Whether compiling pays back within the run: the time it saves per step over the run's
    planned steps against the compile time, paid once per batch shape the run trains on."""
    saved = (eager - compiled_step) * steps
    cost = compile_seconds * shapes
    return {"steps": steps, "shapes": shapes, "saved_per_step": round(eager - compiled_step, 6),
            "saved_seconds": round(saved, 3), "compile_seconds": round(cost, 3), "pays": saved > cost}


def _timing(timings: dict, choice: Choice) -> dict:
    """The timing of `choice`, or {} (none, or a damaged cache entry)."""
    found = timings.get(choice.label)
    return found if isinstance(found, dict) else {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def decide_compile(result: dict, compile: str, steps: int, shapes: int = 1) -> dict:
    """`result` (a measurement of the uncompiled candidates, with the compiled one of its choice
    timed or not) with --compile resolved: "on"/"off" as asked; auto: on only when the compiled
    step beats the uncompiled one timed in the same rounds (`pick`, the uncompiled the default)
    and the time that saves over the run's `steps` pays for the compile (`payback`)."""
    best = Choice(**result["choice"])
    result = {**result, "choice": asdict(replace(best, compile=compile if compile != "auto" else "off"))}
    if compile != "auto":
        return result
    timed = _timing(result["timings"], replace(best, compile="on"))
    eager = timed.get("eager") if isinstance(timed.get("eager"), dict) else _timing(result["timings"], best)
    if not timed or not _number(eager.get("seconds")):
        why = "the uncompiled steps' timing was noisy" if result.get("noisy") else \
            f"{steps} steps cannot pay back a compile"
        result["compile"] = {"chosen": "off", "why": f"not timed: {why}"}
    elif not _number(timed.get("seconds")) or not _number(timed.get("compile_seconds")) or not timed.get("finite"):
        result["compile"] = {"chosen": "off", "why": f"torch.compile failed: {timed.get('error', 'a loss not finite')}"}
    elif pick({"eager": {**eager, "finite": True}, "compiled": timed}, "eager", bool(timed.get("noisy"))) != "compiled":
        needed = margin(timed, eager, bool(timed.get("noisy")))
        result["compile"] = {"chosen": "off", "why": f"compiled {timed['seconds']:.3f} s/step against "
                             f"{eager['seconds']:.3f}: not faster by more than {needed:.0%}"}
    else:
        found = payback(eager["seconds"], timed["seconds"], timed["compile_seconds"], steps, shapes)
        result["compile"] = {"chosen": "on" if found["pays"] else "off", "payback": found}
        if found["pays"]:
            result["choice"]["compile"] = "on"
    return result


def cache_key(device: torch.device, model: str, parameters: int, input_shape: tuple, options: list[Choice],
              compile: str = "off") -> str:
    """What a measurement depends on: the machine, torch, the model, the batch (B, C, H, W) and
    what was asked of compiling (auto's entry also holds the compiled step's timing)."""
    if device.type == "cuda":
        machine = {"gpu": torch.cuda.get_device_name(device)}
    else:
        machine = {"cpu": cpu_name(), "flags": sorted(cpu_flags() & set(CPU_KEY_FLAGS)),
                   "threads": torch.get_num_threads()}
    return json.dumps({"device": device.type, **machine, "torch": torch.__version__, "model": model,
                       "parameters": parameters, "input": list(input_shape),
                       "options": [o.label for o in options], "compile": compile, "timing": TIMING_METHOD},
                      sort_keys=True)


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
        if Choice(**entry["choice"]) in options and isinstance(entry["timings"], dict) and not entry.get("noisy"):
            return {**entry, "choice": dict(entry["choice"])}
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
           precision: str, channels_last: str, name: str, compile: str = "off", steps: int = 1,
           shapes: int = 1) -> dict:
    """Resolve `auto` in --precision, --channels-last and --compile for `model` on batches like (x, y).

    Precision and memory format: `measure` (warm-up, interleaved rounds, `pick`), uncompiled;
    the defaults (the first candidate) for a run too short to win back the measuring
    (`worth_measuring`, "not_measured" says so). Compile auto: `measure_compiled` times the
    compiled step of that choice against the uncompiled one, and it is chosen only when it is
    faster and pays back within the run's `steps` (`decide_compile`; `shapes`: the batch shapes
    it trains on, each compiled once); it is not timed at all for a run too short to pay back
    any compile, nor after a noisy measurement. `make_optimizer(params,
    fused=True)` makes the compiled step's optimizer. A measurement is cached per machine, model
    and batch, unless it was noisy (then the next run measures again).

    Returns {"choice": {"precision", "channels_last", "compile"}, "timings": {label: ...},
    "cached": bool, "noisy": bool, "tries", "measure_seconds"} and, for compile auto, "compile":
    {"chosen", "payback" or "why"} ("timings" is empty when there was nothing to choose). Under
    torchrun rank 0 measures and every rank takes its choice, so that all ranks train alike.
    """
    device = x.device
    options = candidates(precision, channels_last, device)
    if len(options) == 1 and compile != "auto":
        return {"choice": asdict(replace(options[0], compile=compile)), "timings": {}, "cached": False}
    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        begin = time.perf_counter()
        parameters = sum(p.numel() for p in model.parameters())
        key = cache_key(device, name, parameters, tuple(x.shape), options, compile)
        result = cached_choice(key, options)
        cached = result is not None
        if not cached and not worth_measuring(len(options), steps):
            result = {"choice": {"precision": options[0].precision, "channels_last": options[0].channels_last},
                      "timings": {}, "not_measured": f"{steps} steps cannot win back timing {len(options)} "
                                                     f"candidate{'s' * (len(options) > 1)}"}
        elif not cached:
            result = measure(model, make_optimizer, loss_fn, x, y, options)
        best = Choice(**result["choice"])
        eager = _timing(result["timings"], best).get("seconds")
        timed = _timing(result["timings"], replace(best, compile="on"))
        # Not on a noisy measurement: a compile takes minutes on busy cores, to be judged on noisy rounds.
        if compile == "auto" and not timed and not result.get("noisy") and _number(eager) \
                and could_pay_back(eager, steps, shapes):
            timed = result["timings"][replace(best, compile="on").label] = \
                measure_compiled(model, make_optimizer, loss_fn, x, y, best)
            cached = False
        if not cached and "not_measured" not in result and not result.get("noisy") and not timed.get("noisy"):
            # a noisy measurement serves this run only
            store_choice(key, result)
        result = decide_compile(result, compile, steps, shapes)
        result["cached"] = cached
        result["input"] = list(x.shape)     # the batch timed: (B, C, H, W)
        result["measure_seconds"] = round(time.perf_counter() - begin, 3)   # this run's: near 0 when cached
        if precision == "auto" and not bf16_native(device) and device.type in ("cpu", "cuda"):
            result["not_timed"] = "bf16: emulated on this device, so not a candidate"
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return result
