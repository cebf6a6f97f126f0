"""Sweep short-schedule settings over several seeds and print one JSON line per run.

Used to choose the `fast` and `speedrun` recipes (docs/results.md says what it found).
    python scripts/recipe_sweep.py --device cuda --grid fast
"""
import argparse
import itertools
import json
import time

import torch

from trainkit.config import RECIPES, TrainConfig
from trainkit.run import get_data, train

GRIDS = {
    "fast": dict(base=RECIPES["fast"], axes=dict(epochs=[2, 3, 4], batch_size=[128, 256], lr=[0.05, 0.1])),
    "speedrun": dict(base=RECIPES.get("speedrun", {}),
                     axes=dict(epochs=[1, 2], batch_size=[128, 256], lr=[0.1, 0.2])),
}

parser = argparse.ArgumentParser()
parser.add_argument("--grid", choices=sorted(GRIDS), required=True)
parser.add_argument("--device", default="auto")
parser.add_argument("--seeds", type=int, default=3)
args = parser.parse_args()

grid = GRIDS[args.grid]
base = TrainConfig(device=args.device, progress=False).replace(**grid["base"])
data = get_data(base)
keys = list(grid["axes"])
for values in itertools.product(*grid["axes"].values()):
    for seed in range(1, args.seeds + 1):
        cfg = base.replace(seed=seed, **dict(zip(keys, values)))
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        history = train(cfg, data=data, write=False).history
        seconds = time.perf_counter() - start
        print(json.dumps({**dict(zip(keys, values)), "seed": seed, "accs": [round(r.test_acc, 2) for r in history],
                          "seconds": round(seconds, 2)}), flush=True)
