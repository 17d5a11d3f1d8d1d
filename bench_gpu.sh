#!/usr/bin/env bash
# The GPU check of the R = 64 config (config/gpu.py: bf16 autocast, torch.compile) on one GPU:
# the training step's images/s and MFU (bench.py), then 5 minutes of training with the checker's
# ISR, mIoU and shape accuracy of the EMA model against training minutes, and the final model on
# the val, heldout and crowded sets with its sample grids (curve.py). Writes everything under
# OUT (default out/gpu_check): bench.json, curve.md, final/table.md, final/grids/*.png.
#     bash bench_gpu.sh            or            OUT=/tmp/check MINUTES=5 bash bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-out/gpu_check}"
MINUTES="${MINUTES:-5}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PYTHON" bench.py config/gpu.py --data_dir="$OUT/data" | tee "$OUT/bench.json"
"$PYTHON" curve.py --minutes="$MINUTES" --points=3 --out_dir="$OUT" --n=100 config/gpu.py --data_dir="$OUT/data" \
    --cache_scenes=20000
