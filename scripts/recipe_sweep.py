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
    "fast": dict(base=RECIPES["fast"], axes=dict(epochs=[2, 3, 4], batch_size=[64, 128, 256], lr=[0.05, 0.1])),
    "speedrun": dict(base=RECIPES["speedrun"], axes=dict(epochs=[1, 2], batch_size=[128, 256], lr=[0.1, 0.2])),
    "speedrun-large-batch": dict(base=RECIPES["speedrun"], axes=dict(epochs=[2], batch_size=[512, 1024], lr=[0.4, 0.8])),
    "compact": dict(base={**RECIPES["fast"], "model": "compact"}, axes=dict(epochs=[15], batch_size=[128], lr=[0.05, 0.1])),
    "fashion": dict(base={"dataset": "fashion-mnist"}, axes=dict(recipe=["seed-s5net-fast", "compact", "speednet"])),
}
FASHION = {"seed-s5net-fast": RECIPES["fast"],
           "compact": {**RECIPES["fast"], "model": "compact", "epochs": 15},
           "speednet": {**RECIPES["speedrun"], "target_acc": None}}

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
        settings = dict(zip(keys, values))
        if "recipe" in settings:
            settings = FASHION[settings.pop("recipe")]
        cfg = base.replace(seed=seed, **settings)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        history = train(cfg, data=data, write=False).history
        seconds = time.perf_counter() - start
        print(json.dumps({**dict(zip(keys, values)), "model": cfg.model, "seed": seed, "accs": [round(r.test_acc, 2) for r in history],
                          "seconds": round(seconds, 2)}), flush=True)
