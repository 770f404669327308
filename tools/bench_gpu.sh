#!/usr/bin/env bash
# One-GPU benchmark (aim: under 8 minutes on an H100/H200): released rectified-flow architectures
# (maisi-ct-rflow) with random weights, ControlNet on, 30 steps, at 512x512x256 and 512x512x512; for each,
# MAISI's way (MONAI loop, float16 autocast, eager, MONAI sliding-window decode at MAISI's settings) against
# ours with the defaults (precision auto, compile auto, cached ControlNet condition, tiled decode), each in
# its own process: warm-up (compilation) time, seconds per step, sampling and decode time with the peak
# allocated GPU memory of each stage, end-to-end time, PSNR of the HU image against MAISI's way.
# Targets: 512^3 end to end under 20 s, peak under 12 GB (MAISI: 48 s, 22.8 GB on an A100).
#
#   bash tools/bench_gpu.sh                 # on the GPU machine; extra arguments go to bench_generate.py
#   bash tools/bench_gpu.sh --dry-run       # CPU, tiny preset and sizes, 1 step: checks the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    sizes=("32 32 32")
    common=(--preset tiny-rflow --device cpu --steps 1 --warmup 1)
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh: no CUDA device (use --dry-run on a CPU)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    sizes=("512 512 256" "512 512 512")
    common=(--preset maisi-ct-rflow --device cuda --steps 30 --warmup 1)
fi
start=$SECONDS
for size in "${sizes[@]}"; do
    # shellcheck disable=SC2086 # the size is three words on purpose
    "$PYTHON" tools/bench_generate.py --compare --variants maisi ours --size $size "${common[@]}" "$@"
    echo
done
echo "bench_gpu.sh: $((SECONDS - start)) s in all"
