#!/usr/bin/env bash
# The CPU measurements behind docs/results.md, one after another on a quiet machine (about an hour
# on 2 cores; never two at once). The cache of measured choices starts empty, so --precision auto
# and --channels-last auto are measured in this run, on this machine.
# Usage: TRAINKIT_DATA_DIR=../shared/datasets bash scripts/cpu_benchmarks.sh LOGDIR
set -u
log=${1:-bench-logs}
mkdir -p "$log"
here=$(dirname "$0")
export TRAINKIT_CACHE_DIR="$log/cache"
stamp() { date -u +%H:%M:%S; }
lscpu > "$log/lscpu.txt"
echo "$(stamp) $(grep 'Model name' "$log/lscpu.txt" | sed 's/  */ /g')"
if [ -z "${SKIP_QUICK:-}" ]; then
  echo "$(stamp) step probe";           python "$here/step_probe.py" > "$log/step_probe.txt" 2>&1
  echo "$(stamp) bench --quick";        trainkit bench --quick > "$log/quick.txt" 2>&1
  echo "$(stamp) bench --speedrun";     trainkit bench --speedrun --seeds 5 --out docs > "$log/speedrun.txt" 2>&1
fi
# The seed recipe to 99.2% against the fast recipe over 5 seeds (each run to its 2 epochs: 99.3%?).
echo "$(stamp) bench (full)";         trainkit bench --seeds 5 --out docs > "$log/full.txt" 2>&1
if [ -z "${SKIP_OTHERS:-}" ]; then
  echo "$(stamp) compact recipe";       trainkit train --recipe compact --out "$log/compact" --no-progress > "$log/compact.txt" 2>&1
  echo "$(stamp) 1 process, 1 epoch";   trainkit train --epochs 1 --out "$log/ddp1" --no-progress > "$log/ddp1.txt" 2>&1
  echo "$(stamp) 2 processes, 1 epoch"
  OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29581 \
    -m trainkit train --epochs 1 --out "$log/ddp2" --no-progress > "$log/ddp2.txt" 2>&1
  # Streaming an image folder: 200,000 generated 64x64 images (2.4 GB of PNG), and 20,000 that fit.
  echo "$(stamp) image folders for the stream bench"
  python "$here/make_image_folder.py" "$log/big" --count 200000 --size 64 --classes 10 > "$log/folders.txt" 2>&1
  python "$here/make_image_folder.py" "$log/small" --count 20000 --size 64 --classes 10 >> "$log/folders.txt" 2>&1
  echo "$(stamp) stream bench";         python "$here/stream_bench.py" --big "$log/big" --small "$log/small" \
                                          --out "$log/stream_bench.json" > "$log/stream_bench.txt" 2>&1
  echo "$(stamp) serve load test"
  trainkit train --recipe fast --epochs 1 --limit-train 8192 --out "$log/serve-run" --no-progress > /dev/null 2>&1
  python "$here/load_test.py" "$log/serve-run" > "$log/serve_load.txt" 2>&1
fi
echo "$(stamp) done"
