"""A bounded load test of `trainkit serve` on the loopback address.

Starts `python -m trainkit serve RUN_DIR` on 127.0.0.1 (a free port), then POSTs real MNIST test
images to /predict from 1, 8 and 32 concurrent clients (httpx + asyncio) and prints, for each,
predictions per second, p50/p99 latency, the 5xx count and the server's RSS before and after.
Every level is bounded by a request count and a time limit.

    python scripts/load_test.py RUN_DIR                      # 1, 8, 32 clients, 2,000 requests each
    python scripts/load_test.py RUN_DIR --soak 10000         # then 10,000 more at 32 clients (memory)
    python scripts/load_test.py RUN_DIR --max-batch 1        # the server without batching
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mnist_pngs(data_dir: str, count: int) -> list[bytes]:
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from trainkit.datasets import MNIST, load_idx_dataset

    data = load_idx_dataset(MNIST, Path(data_dir), download=False, progress=False)
    out = []
    for image in data.test_images[:count, 0].numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def level(url: str, images: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    """`clients` coroutines, each one request at a time, until `requests` are sent or time is up."""
    latencies, codes = [], {}
    sent = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def worker():
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                image = images[sent % len(images)]
                sent += 1
                start = time.perf_counter()
                try:
                    r = await client.post("/predict?top=1", files={"file": ("digit.png", image, "image/png")})
                    code = r.status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                latencies.append(time.perf_counter() - start)
                codes[code] = codes.get(code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"clients": clients, "requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall,
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "codes": codes,
            "5xx": sum(n for c, n in codes.items() if isinstance(c, int) and c >= 500),
            "errors": sum(n for c, n in codes.items() if c != 200)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="requests per level (default: 2000)")
    ap.add_argument("--soak", type=int, default=0, help="then this many more requests at the last level (memory)")
    ap.add_argument("--max-seconds", type=float, default=120, help="time limit per level (default: 120)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: no batching)")
    ap.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    ap.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", "data"))
    args = ap.parse_args()

    images = mnist_pngs(args.data_dir, 256)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "trainkit", "serve", args.run_dir, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--backend", args.backend], cwd=ROOT)
    try:
        for _ in range(600):
            if server.poll() is not None:
                print(f"load_test: the server exited with {server.returncode}", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        asyncio.run(level(url, images, 8, 200, 30))          # warm-up, not reported
        cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")),
            platform.processor())
        backend = httpx.get(url + "/info").json()["backend"]
        print(f"trainkit serve {args.run_dir}, backend {backend}, --max-batch {args.max_batch}; "
              f"{cpu}, {os.cpu_count()} CPUs; client and server on this machine")
        print("| clients | requests | predictions/s | p50 ms | p99 ms | non-200 | 5xx | server RSS MiB before -> after |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        plan = [(c, args.requests) for c in args.clients] + ([(args.clients[-1], args.soak)] if args.soak else [])
        bad = 0
        for clients, requests in plan:
            before = rss_mib(server.pid)
            r = asyncio.run(level(url, images, clients, requests, args.max_seconds))
            after = rss_mib(server.pid)
            bad += r["5xx"]
            print(f"| {clients} | {r['requests']:,} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['errors']} | {r['5xx']} | {before:.0f} -> {after:.0f} |", flush=True)
            if r["errors"]:
                print(f"  answers: {r['codes']}")
        return 1 if bad else 0
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
