#!/usr/bin/env bash
# The GPU check of the R = 64 config (config/gpu.py: bf16 autocast, torch.compile) on one GPU:
# the training step's images/s and MFU (bench.py), then MINUTES of training with the checker's
# ISR, mIoU and shape accuracy of the EMA model against training minutes, and the final model on
# the val, heldout and crowded sets with its sample grids (curve.py). Writes everything under
# OUT (default out/gpu_check): bench.json, curve.md, final/table.md, final/grids/*.png.
#     bash bench_gpu.sh            or            OUT=/tmp/check MINUTES=5 bash bench_gpu.sh
# On one H200 with MINUTES=4 it took about 9.5 minutes in all (each of its three processes pays
# torch.compile's warm-up) and reached val ISR 0.99 (docs/shapes.md, "R = 64 on one GPU").
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-out/gpu_check}"
MINUTES="${MINUTES:-4}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
# one scene cache for both (20,000 scenes at R = 64: seconds to render on 16 cores)
"$PYTHON" bench.py config/gpu.py --data_dir="$OUT/data" --cache_scenes=20000 --warmup_bench=10 --steps=50 \
    | tee "$OUT/bench.json"
"$PYTHON" curve.py --minutes="$MINUTES" --points=4 --out_dir="$OUT" --n=100 config/gpu.py --data_dir="$OUT/data" \
    --cache_scenes=20000
