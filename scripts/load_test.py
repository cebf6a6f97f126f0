"""A bounded load test of `trainkit serve` on the loopback address.

For each backend it starts `python -m trainkit serve RUN_DIR` on 127.0.0.1 (a free port), POSTs
real MNIST test images to /predict from 1, 8 and 32 concurrent clients, then soaks it with 10,000
more at 32 clients, and prints predictions per second, p50/p99 latency, non-200 and 5xx answers,
the share predicted right, CPU milliseconds per request (the server's, in brackets its event
loop's thread's, and the client's) and the server's RSS. Every level is bounded by a request
count and a time limit; the exit status is 1 on any 5xx, any failed request or a soak that did
not finish.

The client runs on the same cores as the server, so it is kept cheap: one asyncio task per client
on uvloop (when installed), one keep-alive connection each, and every request pre-encoded as the
bytes it is sent as (the PNG as the body, `Content-Type: image/png`; `--multipart` rows send the
form that the page and `curl -F` send). Responses are read by Content-Length.

    python scripts/load_test.py RUN_DIR        # the issue's figures: both backends, then ONNX with --workers 2
    python scripts/load_test.py RUN_DIR --backends onnx --soak 0 --compare-workers 0 --clients 32 --max-batch 1
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = b"trainkit-load-test-boundary"


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:                     # the server has exited (the rows say how requests failed)
        pass
    return float("nan")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of a process's main thread (the server's event loop) and of all
    its threads (from /proc/PID/task/PID/stat and /proc/PID/stat)."""
    def read(path: str) -> float:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return read(f"/proc/{pid}/task/{pid}/stat"), read(f"/proc/{pid}/stat")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def mnist_pngs(data_dir: str, count: int) -> list[tuple[bytes, str]]:
    """The first `count` MNIST test images as PNG files' bytes, with their labels."""
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from trainkit.data.idx import MNIST, load_idx_dataset

    data = load_idx_dataset(MNIST, Path(data_dir), download=False, progress=False)
    out = []
    for image, label in zip(data.test_images[:count, 0].numpy(), data.test_labels[:count].tolist()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        out.append((buffer.getvalue(), str(label)))
    return out


def encode_request(port: int, image: bytes, multipart: bool) -> bytes:
    """One POST /predict?top=1 exactly as it goes on the wire (HTTP/1.1, keep-alive)."""
    if multipart:
        body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + BOUNDARY + b"--\r\n")
        kind = b"multipart/form-data; boundary=" + BOUNDARY
    else:
        body, kind = image, b"image/png"
    head = b"POST /predict?top=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (port, kind, len(body)) + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server keeps the connection open."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head[9:12])
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        raise ConnectionError("a response without Content-Length")
    start += 17
    body = await reader.readexactly(int(head[start:head.index(b"\r\n", start)]))
    return status, body, b"\r\nconnection: close" not in head


async def level(port: int, requests: list[tuple[bytes, str]], clients: int, count: int, max_seconds: float,
                server_pid: int, rss_every: int = 0) -> dict:
    """`clients` tasks, each with its own connection and one request at a time, until `count`
    requests are answered or `max_seconds` have passed (then the ones in flight are finished)."""
    latencies, codes, rss = [], {}, []
    right = sent = 0
    deadline = time.perf_counter() + max_seconds

    async def client():
        nonlocal right, sent
        reader = writer = None
        while sent < count and time.perf_counter() < deadline:
            request, label = requests[sent % len(requests)]
            sent += 1
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status, body, keep = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status, keep = type(exc).__name__, False
            latencies.append(time.perf_counter() - start)
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                right += json.loads(body)["predicted"] == label
            if rss_every and len(latencies) % rss_every == 0:
                rss.append((len(latencies), rss_mib(server_pid)))
            if not keep and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    cpu_server, cpu_client = cpu_seconds(server_pid), time.process_time()
    rss_before = rss_mib(server_pid)
    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), max_seconds + 60)
    except TimeoutError:                # requests still unanswered a minute after the time limit
        codes["no answer"] = sent - len(latencies)
    wall = time.perf_counter() - start
    done = max(1, len(latencies))
    latencies.sort()
    pick = lambda q: latencies[min(done - 1, int(q * done))] * 1000 if latencies else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall,
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "codes": codes,
            "5xx": sum(n for c, n in codes.items() if isinstance(c, int) and c >= 500),
            "errors": sum(n for c, n in codes.items() if c != 200), "right": right / max(1, codes.get(200, 0)),
            "loop_cpu_ms": (cpu_seconds(server_pid)[0] - cpu_server[0]) * 1000 / done,
            "server_cpu_ms": (cpu_seconds(server_pid)[1] - cpu_server[1]) * 1000 / done,
            "client_cpu_ms": (time.process_time() - cpu_client) * 1000 / done,
            "rss_before": rss_before, "rss_after": rss_mib(server_pid), "rss": rss}


def run(coroutine):
    """asyncio.run, on uvloop when it is installed (as the server is)."""
    if importlib.util.find_spec("uvloop"):
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


def start_server(run_dir: str, backend: str, options: list[str]) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "trainkit", "serve", run_dir, "--port", str(port), "--backend", backend, *options]
    server = subprocess.Popen(command, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"load_test: the server exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("load_test: the server did not answer /health within 120 s")


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['requests']:,} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
            f"{r['5xx']} | {r['right']:.1%} | {r['server_cpu_ms']:.2f} ({r['loop_cpu_ms']:.2f}) | "
            f"{r['client_cpu_ms']:.2f} | {r['rss_before']:.0f} -> {r['rss_after']:.0f} |")


def run_backend(args, backend: str, images: list[tuple[bytes, str]], workers: int | None = None,
                full: bool = True) -> bool:
    """One server, every level (`full`: also the multipart row and the soak); True when nothing failed."""
    settings = {"max_batch": args.max_batch, "threads": args.threads, "workers": workers or args.workers}
    options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items() if value is not None]
    server, port = start_server(args.run_dir, backend, options)
    raw = [(encode_request(port, image, False), label) for image, label in images]
    form = [(encode_request(port, image, True), label) for image, label in images]
    plan = [(f"{c}", raw, c, args.requests, args.max_seconds) for c in args.clients]
    if args.multipart and full:
        plan.append((f"{args.clients[-1]}, multipart", form, args.clients[-1], args.requests, args.max_seconds))
    ok = True
    try:
        run(level(port, raw, 8, 500, 30, server.pid))   # warm-up, not reported
        print(f"\nbackend {backend}, {' '.join(options) or 'default options'}, server threads: "
              f"{len(os.listdir(f'/proc/{server.pid}/task'))}; load average {load_average()}")
        print("| clients | requests | predictions/s | p50 ms | p99 ms | non-200 | 5xx | right "
              "| server CPU ms/req (event loop) | client CPU ms/req | server RSS MiB before -> after |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
        for name, requests, clients, count, seconds in plan:
            r = run(level(port, requests, clients, count, seconds, server.pid))
            print(row(name, r), flush=True)
            ok &= not r["errors"]
            if r["errors"]:
                print(f"  answers: {r['codes']}")
        if args.soak and full:
            clients = args.clients[-1]
            r = run(level(port, raw, clients, args.soak, args.soak_seconds, server.pid,
                          rss_every=max(1, args.soak // 10)))
            print(row(f"{clients}, soak", r), flush=True)
            print("  server RSS MiB after N soak requests: "
                  + ", ".join(f"{n:,}: {m:.1f}" for n, m in r["rss"]), flush=True)
            if r["requests"] < args.soak:
                print(f"  the soak stopped at its time limit ({args.soak_seconds:.0f} s) after {r['requests']:,} of "
                      f"{args.soak:,} requests")
            ok &= not r["errors"] and r["requests"] == args.soak
            if r["errors"]:
                print(f"  answers: {r['codes']}")
    finally:
        server.terminate()
        server.wait(10)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--backends", nargs="+", choices=["onnx", "torch"],
                    default=["onnx", "torch"] if importlib.util.find_spec("onnxruntime") else ["torch"],
                    help="one server each, in turn (default: onnx torch, or torch without onnxruntime)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="requests per level (default: 2000)")
    ap.add_argument("--max-seconds", type=float, default=60, help="time limit per level (default: 60)")
    ap.add_argument("--multipart", action=argparse.BooleanOptionalAction, default=True,
                    help="add a row at the last client count with multipart forms (default: yes)")
    ap.add_argument("--soak", type=int, default=10000,
                    help="then this many requests at the last client count, RSS sampled (default: 10000; 0: none)")
    ap.add_argument("--soak-seconds", type=float, default=300, help="time limit of the soak (default: 300)")
    ap.add_argument("--max-batch", type=int, help="the server's --max-batch (default: its own; 1: no batching)")
    ap.add_argument("--threads", type=int, help="the server's --threads (default: its own)")
    ap.add_argument("--workers", type=int, help="the server's --workers (default: its own)")
    ap.add_argument("--compare-workers", type=int, default=2,
                    help="then the first backend again with this many --workers, levels only (default: 2; 0: not)")
    ap.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", "data"))
    args = ap.parse_args()

    images = mnist_pngs(args.data_dir, 256)
    print(f"trainkit serve {args.run_dir}; {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; client "
          f"({'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio'}) and server on this machine; "
          f"load average {load_average()}", flush=True)
    ok = all([run_backend(args, backend, images) for backend in args.backends])
    if args.compare_workers:
        ok &= run_backend(args, args.backends[0], images, workers=args.compare_workers, full=False)
    print(f"\nload average at the end: {load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
