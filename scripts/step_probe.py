"""Time one S5Net training step (batch 512, random data) in fp32 and bf16 autocast, with and
without channels_last: the measurement behind --precision auto. Then the fp32 channels_last step
at other batch sizes (time per image), a plain matrix product in fp32 and bf16, which shows
what the CPU's bf16 instructions give, and one evaluation of 10,000 images at several test batch
sizes (the recipes' --test-batch-size). python scripts/step_probe.py"""
import time

import torch
import torch.nn.functional as F

from trainkit.models import S5Net, build_model



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
    for dtype in (None, torch.bfloat16):
        print(f"batch 512 channels_last={channels_last} bf16={dtype is not None}: "
              f"{seconds_per_step(512, channels_last, dtype):.3f} s per step")
for batch in (64, 128, 256, 512):
    steps = 5 * 512 // batch
    print(f"batch {batch} fp32 channels_last: "
          f"{seconds_per_step(batch, True, None, steps) / batch * 1e3:.2f} ms per image")

n = 2048
for dtype in (torch.float32, torch.bfloat16):
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
