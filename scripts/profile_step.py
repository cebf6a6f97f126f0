"""Where the time of one training step goes: torch.profiler's top ops (self CPU time) of the S5Net
fast-recipe step (batch 64, SGD with Nesterov momentum and weight decay, label smoothing,
channels_last), eager and then compiled (torch.compile and the fused optimizer, as --compile on
trains), with the time per step of each, the compile time, and whether compiling pays back within
the fast recipe's planned steps on MNIST (devices.payback, as --compile auto decides).

Run it on quiet cores; it takes a minute or two (most of it compiling).
python scripts/profile_step.py [--precision fp32|bf16] [--batch 64] [--steps 20] [--device cpu|cuda] [--top 10]
"""
import argparse
import math
import time

import torch
from torch.profiler import ProfilerActivity, profile

from trainkit.config import RECIPES, TrainConfig
from trainkit.loop.devices import autocast, bf16_native, compiled, payback, resolve_device
from trainkit.loop.optim import build_optimizer
from trainkit.models import build_model
from trainkit.run.experiment import make_loss

MNIST_TRAIN = 60_000


def make_step(cfg: TrainConfig, device: torch.device, dtype, compile: bool):
    """A step function of a fresh S5Net on one random batch: forward, backward, optimizer step."""
    torch.manual_seed(0)
    model = build_model("s5net", in_channels=1, num_classes=10).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg, fused=compile)
    trained = compiled(model) if compile else model
    loss_fn = make_loss(cfg, "log_probs")
    x = torch.randn(cfg.batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with autocast(device, dtype):
            loss = loss_fn(trained(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
    return step


def seconds_per_step(step, steps: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 where it is native, else fp32")
    parser.add_argument("--batch", type=int, default=RECIPES["fast"]["batch_size"])
    parser.add_argument("--steps", type=int, default=20, help="steps timed (best of 3 rounds) and profiled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if bf16_native(device) else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else None
    cfg = TrainConfig(**{**RECIPES["fast"], "batch_size": args.batch})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    print(f"S5Net fast-recipe step, batch {args.batch}, {precision}, channels_last, on {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    per_step = {}
    for name, compile in (("eager", False), ("compiled", True)):
        step = make_step(cfg, device, dtype, compile)
        start = time.perf_counter()
        step()                                   # compiled: the forward's and the backward's compile
        first = time.perf_counter() - start
        step()
        per_step[name] = seconds_per_step(step, args.steps)
        if compile:
            per_step["compile"] = max(first - per_step[name], 0.0)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
        print(f"\n{name}: {per_step[name] * 1e3:.1f} ms/step"
              + (f" after {per_step['compile']:.1f} s of compiling" if compile else "")
              + f"; top {args.top} ops by self CPU time over {args.steps} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    steps = cfg.epochs * math.ceil(MNIST_TRAIN / args.batch)
    shapes = 1 if MNIST_TRAIN % args.batch == 0 else 2
    found = payback(per_step["eager"], per_step["compiled"], per_step["compile"], steps, shapes)
    print(f"payback over the fast recipe's {steps:,} steps on MNIST ({shapes} batch shape(s), each compiled once): "
          f"saves {found['saved_per_step'] * 1e3:.1f} ms/step = {found['saved_seconds']:.0f} s against "
          f"{found['compile_seconds']:.0f} s of compiling: --compile auto would choose "
          f"{'on' if found['pays'] else 'off'}")


if __name__ == "__main__":
    main()
