"""Time one S5Net training step (batch 512, random data) in fp32 and bf16 autocast, with and
without channels_last: the measurement behind --precision auto. Then the fp32 channels_last step
at other batch sizes (time per image), a plain matrix product in fp32 and bf16, which shows
what the CPU's bf16 instructions give, and one evaluation of 10,000 images at several test batch
sizes (the recipes' --test-batch-size). bf16 is timed only where the CPU computes it natively
(AVX512-BF16 or AMX): emulated bf16 is many times slower and --precision auto never picks it.
python scripts/step_probe.py"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from trainkit.loop.devices import bf16_native
from trainkit.loop.engine import train_one_epoch
from trainkit.models import S5Net, build_model


def read_every_step(model, batches, optimizer):
    """The loop before the sums stayed on the device: a NaN check and two reads every step."""
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y in batches:
        out = model(x)
        loss = F.nll_loss(out, y)
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = y.shape[0]
        sums += torch.tensor([loss.item() * n, (out.argmax(1) == y).sum().item(), n], dtype=torch.float64)
    return sums


def sync_ab(device: torch.device, name: str, batch: int, steps: int = 60, rounds: int = 5) -> None:
    """Milliseconds per training step with a host read every step (A) and with the engine's
    on-device sums, read once at the end (B), alternated `rounds` times; medians."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(batch, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (batch,), device=device)) for _ in range(steps)]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timed = {"A: read every step": lambda: read_every_step(model, batches, optimizer),
             "B: on-device sums": lambda: train_one_epoch(model, batches, optimizer, F.nll_loss, device=device)}
    for run in timed.values():
        run()                                                   # warm-up
    seconds = {label: [] for label in timed}
    for _ in range(rounds):
        for label, run in timed.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[label].append((time.perf_counter() - start) / steps * 1e3)
    a, b = (statistics.median(v) for v in seconds.values())
    a_min, b_min = (min(v) for v in seconds.values())
    print(f"{device.type} {name} batch {batch}, {rounds} rounds of {steps} steps: median A {a:.3f} ms/step, "
          f"B {b:.3f} ms/step (B saves {100 * (a - b) / a:.1f}%); best A {a_min:.3f}, B {b_min:.3f} "
          f"({100 * (a_min - b_min) / a_min:.1f}%)", flush=True)


if len(sys.argv) > 1 and sys.argv[1] == "sync":
    # python scripts/step_probe.py sync [cpu|cuda]: the gain of keeping the sums on the device
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    for name, batch in (("speednet", 128), ("s5net", 64)) + ((("s5net", 512),) if cuda else ()):
        sync_ab(device, name, batch, steps=100 if cuda else 20, rounds=9)
    sys.exit(0)

BF16 = bf16_native(torch.device("cpu"))
if not BF16:
    print("bf16: emulated on this CPU (no avx512_bf16 or amx_bf16), so not timed")



def seconds_per_step(batch: int, channels_last: bool, dtype: torch.dtype | None, steps: int = 5) -> float:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    model = S5Net()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = F.nll_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


for channels_last in (False, True):
    for dtype in (None, torch.bfloat16) if BF16 else (None,):
        print(f"batch 512 channels_last={channels_last} bf16={dtype is not None}: "
              f"{seconds_per_step(512, channels_last, dtype):.3f} s per step")
for batch in (64, 128, 256, 512):
    steps = 5 * 512 // batch
    print(f"batch {batch} fp32 channels_last: "
          f"{seconds_per_step(batch, True, None, steps) / batch * 1e3:.2f} ms per image")

n = 2048
for dtype in (torch.float32, torch.bfloat16) if BF16 else (torch.float32,):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    print(f"matmul {n}x{n} {dtype}: {2 * n ** 3 * 10 / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s")

images = torch.randn(10000, 1, 28, 28)
for name in ("s5net", "speednet"):
    model = build_model(name, in_channels=1, num_classes=10).to(memory_format=torch.channels_last).eval()
    for batch in (1000, 256, 128, 64):
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                start = time.perf_counter()
                for i in range(0, len(images), batch):
                    model(images[i:i + batch].contiguous(memory_format=torch.channels_last))
                best = min(best, time.perf_counter() - start)
        print(f"evaluate {name} on 10,000 images, test batch {batch}: {best:.2f} s")
