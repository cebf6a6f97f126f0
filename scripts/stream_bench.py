"""Throughput and peak memory of --pipeline stream (with its image cache) against the in-memory path.

    python scripts/make_image_folder.py /data/big --count 200000 --size 64
    python scripts/make_image_folder.py /data/small --count 20000 --size 64
    python scripts/stream_bench.py --big /data/big --small /data/small [--steps 60] [--out bench.json]

Each case runs in a fresh process, with the image cache in a folder of its own (--cache-dir, else
a temporary folder removed at the end). Per folder: "stream, first run" starts without a cache, so
its setup decodes every file once into it; "stream, later run" is a second run on the same folder,
which finds the cache and reads it (what every epoch after the first reads too); then, on the
small folder (and on the big one with --memory-big), "memory": the whole folder held as a tensor.
Each case builds the run as `trainkit train` does (build_experiment: scan, digests, cache, stats,
loaders) and trains --steps steps of a small model after a few warm-up steps, then reads --steps
batches without the model. Throughput is training images per second over the timed steps, and
the loader's own rate; setup is the time to build the run. Peak memory is sampled every 0.1 s
over the whole case, summed over the process and its children (the pool that builds the cache,
DataLoader workers): PSS (shared pages counted once, split between the processes that share them:
the real footprint) and RSS (shared pages counted in every process: an upper bound).

The table at the end says per folder: the cache's build (the first run's setup less the later
run's), the first epoch's images/s (training images / (build + training images at the later
epochs' rate): the cache is built before the first epoch, which then reads it), the later epochs'
images/s, the in-memory path's, their ratio, and the peak PSS of the streamed runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 2**20


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/*/stat."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return found


def memory(pids: list[int]) -> tuple[list[int], int]:
    """(PSS of each pid, RSS summed) in bytes."""
    each, rss = [], 0
    for pid in pids:
        pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            pass
        each.append(pss)
    return each, rss


def run_case(args, name: str, folder: str, pipeline: str, cache_dir: str) -> dict:
    """One case in a child process, its process tree's memory sampled meanwhile."""
    command = [sys.executable, __file__, "--case", folder, pipeline, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--model", args.model, "--device", args.device,
               "--precision", args.precision, "--channels-last", args.channels_last]
    env = {**os.environ, "TRAINKIT_CACHE_DIR": cache_dir}
    env.pop("TRAINKIT_IMAGE_CACHE", None)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak = {"pss": 0, "rss": 0, "processes": 0, "each": []}

    def watch():
        while child.poll() is None:
            pids = tree(child.pid)
            each, rss = memory(pids)
            if sum(each) > peak["pss"]:
                peak.update(pss=sum(each), each=[round(m / MB) for m in each])
            peak.update(rss=max(peak["rss"], rss), processes=max(peak["processes"], len(pids)))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = child.communicate()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"stream_bench: the case {name} failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(case=name, folder=folder, peak_pss_mb=round(peak["pss"] / MB),
                  peak_rss_sum_mb=round(peak["rss"] / MB), processes=peak["processes"], peak_pss_mb_each=peak["each"])
    print(f"{name:<34} {result['images']:>7} images  setup {result['setup_s']:6.1f} s  "
          f"train {result['images_per_s']:6.0f} images/s  loader alone {result['loader_images_per_s']:6.0f} images/s  peak PSS {result['peak_pss_mb']:5d} MB  "
          f"(main process, then workers: {result['peak_pss_mb_each']} MB; RSS summed {result['peak_rss_sum_mb']} MB)",
          flush=True)
    return result


def one_case(folder: str, pipeline: str, steps: int, batch_size: int, model: str, device: str, precision: str,
             channels_last: str) -> dict:
    """Build the run and time `steps` training steps; runs in the child process."""
    import torch

    from trainkit import TrainConfig
    from trainkit.loop.engine import train_step
    from trainkit.run.experiment import build_experiment

    cfg = TrainConfig(dataset=f"imagefolder:{folder}", pipeline=pipeline, model=model, image_size="64",
                      channels=3, batch_size=batch_size, lr=0.05, epochs=1, progress=False, device=device,
                      precision=precision, channels_last=channels_last)
    start = time.perf_counter()
    exp = build_experiment(cfg)
    setup = time.perf_counter() - start

    def batches():
        while True:
            yield from exp.train_loader

    warmup, seen = 5, 0
    stream = batches()
    for step in range(warmup + steps):
        if step == warmup:
            if exp.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = next(stream)
        loss, _ = train_step(exp.train_model, x.to(exp.device), y.to(exp.device), exp.optimizer, exp.loss_fn,
                             amp_dtype=exp.amp_dtype)
        seen += len(y) if step >= warmup else 0
    final_loss = loss.item()
    seconds = time.perf_counter() - start
    # the loader alone, without the model: how fast this path can deliver batches
    start, read = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(stream)
        read += len(y)
    if exp.device.type == "cuda":
        torch.cuda.synchronize()
    read_rate = read / (time.perf_counter() - start)
    cached = bool(exp.data.streamed and exp.data.train_images.cached)
    return {"pipeline": exp.cfg.pipeline, "images": len(exp.data.train_labels) + len(exp.data.test_labels),
            "setup_s": round(setup, 2), "steps": steps, "batch_size": batch_size, "seconds": round(seconds, 2),
            "images_per_s": round(seen / seconds, 1), "loader_images_per_s": round(read_rate, 1),
            "final_loss": round(final_loss, 4),
            "device": str(exp.device), "precision": exp.cfg.precision, "channels_last": exp.cfg.channels_last,
            "workers": os.environ.get("TRAINKIT_STREAM_WORKERS", "auto"), "train_images": len(exp.data.train_labels),
            "cached": cached, "cache_mtime_ns": os.stat(exp.data.train_images.cache.path).st_mtime_ns if cached else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", help="a folder larger than memory should take (e.g. 200,000 images)")
    parser.add_argument("--small", help="a folder that fits in memory (e.g. 20,000 images)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per case (default 60)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="speednet")
    parser.add_argument("--device", default="cpu")
    # fixed, so that every case runs the same kernels (auto would time candidates in each case)
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (on a GPU)")
    parser.add_argument("--channels-last", default="off", help="off (default) or on")
    parser.add_argument("--out", help="also write the results to this JSON file")
    parser.add_argument("--cache-dir", help="the image caches' folder (default: a temporary one, removed after)")
    parser.add_argument("--memory-big", action="store_true", help="also hold the big folder in memory")
    parser.add_argument("--case", nargs=2, metavar=("FOLDER", "PIPELINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(one_case(*args.case, args.steps, args.batch_size, args.model, args.device, args.precision,
                                  args.channels_last)))
        return 0
    if not (args.big or args.small):
        parser.error("give --big and/or --small")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="stream-bench-cache-")
    try:
        folders = [(label, folder) for label, folder in (("big", args.big), ("small", args.small)) if folder]
        rows, results = [], []
        for label, folder in folders:
            shutil.rmtree(Path(cache_dir) / "images", ignore_errors=True)      # the first run builds it
            first = run_case(args, f"stream, first run, {label} folder", folder, "stream", cache_dir)
            later = run_case(args, f"stream, later run, {label} folder", folder, "stream", cache_dir)
            memory = (run_case(args, f"memory, {label} folder", folder, "tensor", cache_dir)
                      if label == "small" or args.memory_big else None)
            results += [r for r in (first, later, memory) if r is not None]
            rows.append((label, first, later, memory))
        print_table(rows)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"cpus": len(os.sched_getaffinity(0)), "results": results}, indent=2))
    return 0


def print_table(rows) -> None:
    """One line per folder: the cache's build, first and later epochs, in memory, peak PSS."""
    memory_rate = next((m["images_per_s"] for _, _, _, m in rows if m is not None), None)
    print("\n| folder | images | cache build | first epoch | later epochs | in memory | later / memory "
          "| peak PSS, streamed |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, first, later, memory in rows:
        if not later["cached"] or later["cache_mtime_ns"] != first["cache_mtime_ns"]:
            print(f"stream_bench: the later run on the {label} folder did not reuse the first run's cache")
        build = max(first["setup_s"] - later["setup_s"], 0.0)
        n, rate = first["train_images"], later["images_per_s"]
        first_epoch = n / (build + n / rate)
        reference = memory["images_per_s"] if memory is not None else memory_rate
        ratio = f"{rate / reference:.2f}" if reference else "-"
        held = f"{memory['images_per_s']:,.0f}/s" if memory is not None else \
            (f"({memory_rate:,.0f}, small folder)" if memory_rate else "-")
        print(f"| {label} | {first['images']:,} | {build:.1f} s | {first_epoch:,.0f}/s | {rate:,.0f}/s | {held} | "
              f"{ratio} | {max(first['peak_pss_mb'], later['peak_pss_mb']):,} MB |")


if __name__ == "__main__":
    sys.exit(main())
