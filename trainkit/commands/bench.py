"""`trainkit bench`: the seed's pipeline against trainkit's fast path, measured in one run.

quick:    a fixed number of training steps of each side; images/s, their spread, whether the machine
          was quiet, and the speedup.
full:     the time each side takes to reach a test accuracy (99.2% by default); JSON and markdown.
speedrun: the speedrun recipe over several seeds; the time each takes to reach 99.0%.

The timers start once the dataset is in memory (loaded once, shared by both sides) and include
everything after it: building the model and loaders, training, and the evaluations that tell
whether the target was reached.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..config import RECIPES, TrainConfig, validate
from ..data.dataset import ImageData
from ..loop.devices import (BUSY_WAIT, NOISY_SPREAD, autocast_dtype, bf16_native, cpu_wait, resolve_device,
                            spread, waited_share)
from ..loop.engine import Callback, TrainState, train_one_epoch, train_step
from ..run.assembly import build_run
from ..run.experiment import get_data
from ..run.reports import environment
from ..run.training import train
from .flags import add_config_flags, config_from_args, number, positive

PROCESS_START = time.perf_counter()


def sides(device: str, compile: str = "auto") -> dict[str, TrainConfig]:
    """The two sides: the seed's recipe on the seed's pipeline (fp32, uncompiled), and trainkit's
    fast path (compiled as `compile` says: --compile of the bench)."""
    seed = TrainConfig(device=device, progress=False, pipeline="torchvision", precision="fp32",
                       channels_last="off", compile="off")
    fast = TrainConfig(device=device, progress=False, compile=compile).replace(**RECIPES["fast"])
    return {"seed pipeline": seed, "trainkit fast path": fast}


# The full mode checks the fast path's test accuracy four times an epoch, so it stops soon after
# crossing the target; the seed recipe keeps its one evaluation per epoch, as the seed ran it.
# A third side runs the fast recipe evaluated once per epoch too, the like-for-like comparison.
FAST_EVALS_PER_EPOCH = 4
ONCE_PER_EPOCH = "trainkit fast path, evaluated once per epoch"


def full_sides(device: str, compile: str = "auto") -> dict[str, TrainConfig]:
    seed, fast = sides(device, compile).values()
    return {"seed pipeline": seed, "trainkit fast path": fast.replace(evals_per_epoch=FAST_EVALS_PER_EPOCH),
            ONCE_PER_EPOCH: fast}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Steps:
    """Stop an epoch after a fixed number of batches."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, count

    def __len__(self):
        return self.count

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.count:
                return
            yield batch


class _Stamps(Callback):
    """The time at the end of every `every`-th batch, after waiting for the device: the timed
    steps in equal groups, whose spread tells how steady the machine was (a wait after every
    step would slow a GPU's steps)."""

    def __init__(self, device: torch.device, every: int):
        self.device, self.every, self.times = device, every, []

    def on_batch_end(self, state: TrainState) -> None:
        if (state.batch + 1) % self.every == 0:
            _sync(self.device)
            self.times.append(time.perf_counter())


def time_steps(cfg: TrainConfig, data: ImageData, steps: int, warmup: int = 3) -> tuple[float, TrainConfig, dict]:
    """(images per second over `steps` training steps after `warmup` untimed ones, the config with
    --precision, --channels-last and --compile auto resolved as the experiment resolved them, and
    how steady the timing was: {"spread" over equal groups of the steps (about five), "groups" (seconds),
    "waited": the share of the time our threads waited for a core}). The warm-up steps include the
    compile of a compiled step."""
    run = build_run(cfg, data=data, steps_only=True)   # the callbacks of a step alone
    loader = run.train_loader
    stamps = _Stamps(run.device, max(1, steps // 5))
    steps_of = lambda n, extra=(): train_one_epoch(run.train_model, _Steps(loader, n), run.optimizer, run.loss_fn,
                                                   device=run.device, amp_dtype=run.amp_dtype,
                                                   callbacks=[*run.callbacks, *extra])
    steps_of(warmup)
    _sync(run.device)
    before, start = cpu_wait(), time.perf_counter()
    _, _, seen = steps_of(steps, [stamps])
    _sync(run.device)
    took, waited = time.perf_counter() - start, waited_share(before, cpu_wait())
    groups = [round(b - a, 6) for a, b in zip([start] + stamps.times, stamps.times)]
    return seen / took, run.cfg, {"spread": spread(groups), "groups": groups, "waited": waited}


def quick(device: str, data: ImageData, steps: int, batch_size: int = 512,
          compile: str = "auto") -> tuple[dict, dict, dict]:
    """Throughput of both sides on S5Net at the same batch size: ({side: images/s}, {side: config
    as run}, {side: how steady its timing was, see `time_steps`}). The fast path's auto precision
    and memory format are chosen (timed) before its timer."""
    results, configs, steadiness = {}, {}, {}
    for name, cfg in sides(device, compile).items():
        results[name], configs[name], steadiness[name] = time_steps(cfg.replace(batch_size=batch_size), data, steps)
        ran, steady = configs[name], steadiness[name]
        asked = (cfg.precision, cfg.channels_last, cfg.compile)
        asked = f" (auto: {', '.join(asked)})" if "auto" in asked else ""
        print(f"{name}: {results[name]:.0f} images/s ({ran.pipeline} pipeline, "
              f"{ran.precision} precision, channels_last {ran.channels_last}, compile {ran.compile}{asked}); "
              f"spread {steady['spread']:.0%} over {len(steady['groups'])} groups of {max(1, steps // 5)} step(s)",
              flush=True)
    return results, configs, steadiness


def machine_line(load: float, steadiness: dict) -> str:
    """Whether the bench's figures can be trusted: quiet when the 1-minute load average before it
    was below the cores it may use, every side's timings varied by at most devices.NOISY_SPREAD,
    and our threads waited for a core at most devices.BUSY_WAIT of the time (where Linux tells)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worst = max(s["spread"] for s in steadiness.values())
    waits = [s["waited"] for s in steadiness.values() if s["waited"] is not None]
    quiet = load < cores and worst <= NOISY_SPREAD and max(waits, default=0.0) <= BUSY_WAIT
    facts = f"load average {load:.2f} before the bench, {cores} cores; spread up to {worst:.0%}" + \
        (f"; our threads waited for a core {max(waits):.0%} of the time" if waits else "")
    return f"machine: quiet ({facts})" if quiet else \
        f"machine: busy ({facts}): these figures are rough; rerun on quiet cores to trust them"


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """GFLOP/s of square matrix products on this device: the best of repeated timings, about
    `seconds` long in all (the roof that a training step's convolutions and matmuls run under)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b                                   # warm up (and let oneDNN / cuBLAS pick its kernel)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * size ** 3 / best / 1e9


def peaks(device: torch.device) -> dict[str, float]:
    """This machine's matmul peak in fp32, and in bf16 where the hardware has it (not emulated)."""
    found = {"fp32": matmul_peak(device, torch.float32)}
    if bf16_native(device):
        found["bf16"] = matmul_peak(device, torch.bfloat16)
    return found


def step_flops(cfg: TrainConfig, data: ImageData) -> float:
    """Floating-point operations of one training step (forward and backward), counted by torch on
    the uncompiled model (the same operations; a compiled one hides them from the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    exp = build_run(cfg, data=data, steps_only=True)
    x, y = next(iter(exp.train_loader))
    with FlopCounterMode(display=False) as counter:
        train_step(exp.model, x.to(exp.device), y.to(exp.device), exp.optimizer, exp.loss_fn,
                   amp_dtype=exp.amp_dtype)
    return float(counter.get_total_flops())


def roofline(cfg: TrainConfig, data: ImageData, images_per_second: float) -> tuple[float, float, dict]:
    """(achieved GFLOP/s of the training step, fraction of the peak of its precision, the peaks)."""
    device = resolve_device(cfg.device)
    found = peaks(device)
    exp_dtype = autocast_dtype(cfg.precision, device)
    peak = found.get("bf16" if exp_dtype == torch.bfloat16 else "fp32", found["fp32"])
    achieved = step_flops(cfg, data) / cfg.batch_size * images_per_second / 1e9
    return achieved, achieved / peak, found


class _Evaluations(Callback):
    """Keeps every test-set evaluation of a run, in order: its epoch, the batches trained in it
    (None at the epoch's end), the epochs trained so far, the accuracy, and the seconds since `start`."""

    def __init__(self, start: float):
        self.start, self.seen = start, []

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        done = (e.after_batch or state.num_batches) / max(state.num_batches, 1)
        self.seen.append({"epoch": e.epoch, "after_batch": e.after_batch, "epochs_trained": e.epoch - 1 + done,
                          "test_acc": round(e.acc, 2), "seconds": time.perf_counter() - self.start})


class _StopAfter(Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_batch_end(self, state: TrainState) -> None:
        if state.batch + 1 >= self.steps:
            state.stop()


def _first(evaluations: list[dict], target: float | None) -> dict | None:
    return next((e for e in evaluations if target is not None and e["test_acc"] >= target), None)


def time_to_target(cfg: TrainConfig, data: ImageData, target: float | None, *, run_on: bool = False,
                   second: float | None = None, steps: int | None = None) -> dict:
    """Train until the test accuracy reaches `target`, timed to the evaluation that saw it. With
    `run_on` the run goes on to the recipe's last epoch, to see whether (and when) it also reaches
    `second`. `steps`: stop after that many training steps (an untimed warm-up)."""
    cfg = validate(cfg.replace(target_acc=None if run_on else target))
    start = time.perf_counter()
    evaluations = _Evaluations(start)
    result = train(cfg, data=data, write=False, callbacks=[evaluations] + ([_StopAfter(steps)] if steps else []))
    total, history = time.perf_counter() - start, result.history
    ran = result.run.cfg
    reached, later = _first(evaluations.seen, target), _first(evaluations.seen, second)
    return {"reached": reached is not None, "epoch": reached and reached["epoch"],
            "seconds": reached and reached["seconds"], "best_acc": history.best_acc,
            "epochs_run": len(history), "epochs_trained": (reached or evaluations.seen[-1])["epochs_trained"],
            "evals_per_epoch": cfg.evals_per_epoch, "total_seconds": total,
            "second_target": second, "second_epochs_trained": later and later["epochs_trained"],
            "evaluations": evaluations.seen, "accuracy_by_epoch": [round(r.test_acc, 2) for r in history],
            "ran_in": {"precision": ran.precision, "channels_last": ran.channels_last,   # what auto chose
                       "compile": ran.compile},
            "config": cfg.to_dict()}


def _write(out_dir: Path, stem: str, report: dict, table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text(table)
    print(f"Wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")


SECOND_TARGET = 99.3   # the fast recipe's seeds must each reach this within their 2 epochs


def full(device: str, data: ImageData, target: float, out_dir: Path,
         configs: dict[str, TrainConfig] | None = None, seeds: int = 1, compile: str = "auto") -> dict:
    """Time each side to `target`. The first side is the baseline; the second is the headline,
    run with `seeds` seeds (1, 2, ...) to the end of its recipe, to see each one's time to `target`
    and whether it reaches SECOND_TARGET; its mean time gives the speedup."""
    configs = dict(configs or full_sides(device, compile))
    baseline, headline = list(configs)[:2]
    if seeds > 1:
        # Fill the cache of measured choices (precision, memory format, and the compiled step where the
        # whole run could pay it back) on an untimed run of one step, as a second run on this machine
        # would find it.
        time_to_target(configs[headline].replace(target_acc=None), data, None, steps=1)
    runs = {baseline: (configs[baseline], {})}
    for seed in range(1, seeds + 1):
        name = headline if seeds == 1 else f"{headline}, seed {seed}"
        runs[name] = (configs[headline].replace(seed=seed) if seeds > 1 else configs[headline],
                      {"run_on": True, "second": SECOND_TARGET})
    runs.update({name: (cfg, {}) for name, cfg in list(configs.items())[2:]})
    results = {}
    for name, (cfg, how) in runs.items():
        print(f"{name}: training to {target}% ...", flush=True)
        results[name] = r = time_to_target(cfg, data, target, **how)
        print(f"{name}: " + (f"reached {target}% in epoch {r['epoch']} ({r['epochs_trained']:.2f} epochs trained), "
                             f"{r['seconds']:.1f} s" if r["reached"]
                             else f"did not reach {target}% in {r['epochs_run']} epochs (best {r['best_acc']:.2f}%)")
              + (f"; {SECOND_TARGET}% after {r['second_epochs_trained']:.2f} epochs, {r['accuracy_by_epoch'][-1]:.2f}% "
                 f"at the end" if r.get("second_epochs_trained") else ""), flush=True)
    seed = results[baseline]
    speedups = {name: seed["seconds"] / r["seconds"] if seed["reached"] and r["reached"] else None
                for name, r in results.items() if name != baseline}
    heads = [r for name, r in results.items() if name == headline or name.startswith(f"{headline}, seed ")]
    times = [r["seconds"] for r in heads if r["reached"]]
    mean = statistics.mean(times) if len(times) == len(heads) else None
    speedup = seed["seconds"] / mean if seed["reached"] and mean else None
    report = {"target_acc": target, "sides": results, "speedup": speedup, "speedups": speedups,
              "headline": {"name": headline, "seeds": seeds, "mean_seconds": mean,
                           "min_speedup": min((speedups[n] or 0 for n in results if n in speedups
                                               and (n == headline or n.startswith(f"{headline}, seed "))), default=None),
                           "second_target": SECOND_TARGET,
                           "second_reached_within_2_epochs": sum(1 for r in heads if r["second_epochs_trained"]
                                                                 and r["second_epochs_trained"] <= 2)},
              "process_wall_seconds": time.perf_counter() - PROCESS_START,
              "environment": {**environment(resolve_device(device)), "machine": platform.machine()}}
    table = full_table(report, device)
    _write(out_dir, "bench", report, table)
    print(f"speedup: {speedup:.2f}" if speedup else "speedup: n/a")
    return report


def full_table(report: dict, device: str) -> str:
    """The markdown report of the full mode, from its JSON."""
    second = report["headline"]["second_target"]
    rows = ["| side | evaluations per epoch | reached | epoch | epochs trained | seconds to target | speedup "
            f"| epochs to {second}% | test accuracy at each evaluation, in order |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in report["sides"].items():
        gain = report["speedups"].get(name)
        accs = ", ".join(f"{e['test_acc']:.2f}" for e in r["evaluations"])
        later = r.get("second_epochs_trained")
        later = f"{later:.2f}" if later else ("not reached" if r.get("second_target") else "-")
        rows.append(f"| {name} | {r['evals_per_epoch']} | {'yes' if r['reached'] else 'no'} | {r['epoch'] or '-'} | "
                    f"{r['epochs_trained']:.2f} | {r['seconds'] and round(r['seconds'], 1) or '-'} | "
                    f"{f'{gain:.2f}x' if gain else '-'} | {later} | {accs} |")
    head, speedup = report["headline"], report["speedup"]
    ran = {}
    for name, r in report["sides"].items():
        if "ran_in" in r:
            how = r["ran_in"]
            ran.setdefault(f"{how['precision']}, channels_last {how['channels_last']}, compile {how.get('compile', 'off')}",
                           []).append(name)
    verdict = (f"Speedup: {speedup:.2f}x (the seed recipe's time over the mean of the {head['name']}'s "
               f"{head['seeds']} seed(s), {head['mean_seconds']:.1f} s; the slowest seed {head['min_speedup']:.2f}x)"
               if speedup else "Speedup: not measured (a side did not reach the target)")
    return (f"Time to {report['target_acc']}% test accuracy, S5Net, device {device}. Timers start with the "
            "dataset in memory and include building the model and loaders, training, and every evaluation, up to "
            "the evaluation that saw the target. The headline side's runs go on to their recipe's end, to see "
            f"when each reaches {second}%.\n\n"
            + "\n".join(rows) + f"\n\n{verdict}\n"
            + f"{second}% within 2 epochs: {head['second_reached_within_2_epochs']} of {head['seeds']} seed(s).\n"
            + "Ran in (precision, memory format, compile): "
            + "; ".join(f"{how} ({len(names)} side(s): {names[0]}{', ...' if len(names) > 1 else ''})"
                        for how, names in ran.items()) + "\n"
            + f"Whole process wall time: {report['process_wall_seconds']:.0f} s\n")


def speedrun(device: str, data: ImageData, seeds: int, out_dir: Path, compile: str = "auto") -> dict:
    base = TrainConfig(device=device, progress=False, compile=compile).replace(**RECIPES["speedrun"])
    # One untimed short run first, so one-off start-up costs (CUDA context, cuDNN) are not counted.
    time_to_target(base.replace(epochs=1), data.limit(2048, 1000), None)
    runs = [time_to_target(base.replace(seed=seed), data, base.target_acc) for seed in range(1, seeds + 1)]
    for seed, r in enumerate(runs, 1):
        print(f"seed {seed}: " + (f"{base.target_acc}% in epoch {r['epoch']}, {r['seconds']:.2f} s" if r["reached"]
                                  else f"not reached (best {r['best_acc']:.2f}%)"), flush=True)
    times = [r["seconds"] for r in runs if r["reached"]]
    report = {"target_acc": base.target_acc, "device": device, "runs": runs, "all_reached": len(times) == seeds,
              "mean_seconds": statistics.mean(times) if times else None,
              "max_seconds": max(times) if times else None,
              "environment": environment(resolve_device(device))}
    table = speedrun_table(report, base.model)
    _write(out_dir, f"speedrun-{torch.device(device).type}", report, table)
    return report


def speedrun_table(report: dict, model: str) -> str:
    """The markdown report of the speed run, from its JSON."""
    device_name = report["environment"]["device_name"] or report["environment"]["device"]
    target, runs = report["target_acc"], report["runs"]
    rows = [f"Speed run: {model} to {target}% test accuracy on {device_name}.", "",
            "| seed | reached | epochs trained | seconds | test accuracy at each evaluation, in order |",
            "| ---: | --- | ---: | ---: | --- |"]
    for seed, r in enumerate(runs, 1):
        accs = ", ".join(f"{e['test_acc']:.2f}" for e in r["evaluations"])
        rows.append(f"| {seed} | {'yes' if r['reached'] else 'no'} | {r['epochs_trained']:.2f} | "
                    f"{r['seconds'] and round(r['seconds'], 2) or '-'} | {accs} |")
    reached = sum(r["reached"] for r in runs)
    summary = (f"Mean {report['mean_seconds']:.2f} s, max {report['max_seconds']:.2f} s, "
               f"{reached}/{len(runs)} seeds reached {target}%." if reached else "No seed reached the target.")
    return "\n".join(rows) + f"\n\nEvaluations per epoch: {runs[0]['evals_per_epoch']}. {summary}\n"


def cmd_bench(args) -> int:
    cfg, _ = config_from_args(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0   # before our own work adds to it
    device = str(resolve_device(cfg.device))
    data = get_data(cfg.replace(progress=False))
    if args.speedrun:
        speedrun(device, data, args.seeds, Path(args.out), cfg.compile)
    elif args.quick:
        results, configs, steadiness = quick(device, data, args.steps, compile=cfg.compile)
        print(machine_line(load, steadiness))
        fast = configs["trainkit fast path"]
        achieved, fraction, found = roofline(fast, data, results["trainkit fast path"])
        print("peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in found.items())
              + f" (matrix products, {environment(resolve_device(device))['device_name']})")
        print(f"step: {achieved:.0f} GFLOP/s, {100 * fraction:.0f}% of this machine's peak "
              f"({'bf16' if fast.precision == 'bf16' and 'bf16' in found else 'fp32'}, as the step ran)")
        print(f"speedup: {results['trainkit fast path'] / results['seed pipeline']:.2f}")
    else:
        full(device, data, args.target_acc, Path(args.out), seeds=args.seeds, compile=cfg.compile)
    return 0


def add_command(sub) -> None:
    bench = sub.add_parser("bench", help="time the seed's pipeline against trainkit's fast path")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="time a fixed number of steps of each (a few minutes)")
    mode.add_argument("--speedrun", action="store_true", help="time the speedrun recipe to 99.0%% over --seeds seeds")
    bench.add_argument("--steps", type=positive(int, "--steps"), default=20, help="timed steps per side in --quick (default: 20)")
    bench.add_argument("--target-acc", type=number(float, "--target-acc"), default=99.2,
                       help="test accuracy to reach in the full mode (default: 99.2)")
    bench.add_argument("--seeds", type=positive(int, "--seeds"), default=5, help="seeds: --speedrun's runs, and the fast path's in the full mode (default: 5)")
    add_config_flags(bench, only=("device", "data_dir", "compile"))   # --compile: the fast path's (the seed's stays off)
    bench.add_argument("--out", default="docs", help="folder for the JSON and markdown reports (default: docs)")
    bench.set_defaults(func=cmd_bench)
