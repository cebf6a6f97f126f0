#!/usr/bin/env bash
# The CPU measurements behind docs/results.md, one after another on a quiet machine.
# Usage: TRAINKIT_DATA_DIR=../shared/datasets bash scripts/cpu_benchmarks.sh LOGDIR
set -u
log=${1:-bench-logs}
mkdir -p "$log"
stamp() { date -u +%H:%M:%S; }
if [ -z "${SKIP_QUICK:-}" ]; then
  echo "$(stamp) step probe";           python "$(dirname "$0")/step_probe.py" > "$log/step_probe.txt" 2>&1
  echo "$(stamp) bench --quick";        trainkit bench --quick > "$log/quick.txt" 2>&1
  echo "$(stamp) bench --speedrun";     trainkit bench --speedrun --seeds 5 --out docs > "$log/speedrun.txt" 2>&1
fi
echo "$(stamp) bench (full)";         trainkit bench --out docs > "$log/full.txt" 2>&1
echo "$(stamp) compact recipe";       trainkit train --recipe compact --out "$log/compact" --no-progress > "$log/compact.txt" 2>&1
echo "$(stamp) 1 process, 1 epoch";   trainkit train --epochs 1 --out "$log/ddp1" --no-progress > "$log/ddp1.txt" 2>&1
echo "$(stamp) 2 processes, 1 epoch"
OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29581 \
  -m trainkit train --epochs 1 --out "$log/ddp2" --no-progress > "$log/ddp2.txt" 2>&1
for seed in 1 2 3; do
  echo "$(stamp) fast recipe seed $seed"
  trainkit train --recipe fast --seed $seed --out "$log/fast-seed$seed" --no-progress > "$log/fast-seed$seed.txt" 2>&1
done
echo "$(stamp) done"
