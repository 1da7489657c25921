#!/usr/bin/env bash
# Device check for the fast exact engine, in under 5 minutes on one CUDA GPU:
#   1. the CUDA tests (pytest -m cuda) and the fast-path tests,
#   2. backmatch bench for LeNet-BN and VGG11-BN, batch 128, float32 (TF32 off), printing the tables
#      and writing validation/results/bench_<device>_<model>.json.
# Without CUDA it runs the same steps on the CPU (fewer VGG steps) so that it can be tried anywhere.
# Usage: validation/gpu_check.sh [extra args for bench]      (env: STEPS, VGG_STEPS, OUT_DIR, PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-validation/results}"
mkdir -p "$OUT_DIR"

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda; TAG=cuda
    STEPS="${STEPS:-30}"; VGG_STEPS="${VGG_STEPS:-20}"
    "$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
else
    DEVICE=cpu; TAG=cpu_check  # (the recorded CPU results are bench_cpu_*.json, made with more steps)
    STEPS="${STEPS:-10}"; VGG_STEPS="${VGG_STEPS:-2}"
    echo "no CUDA device: running the checks on the CPU (--device cpu)"
fi

echo "== tests: pytest -m cuda and tests/test_fast_paths.py"
start=$(date +%s)
# -m cuda selects the CUDA-marked tests (skipped without a GPU); exit code 5 = none collected is fine
"$PYTHON" -m pytest -q -m cuda tests -p no:cacheprovider || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }
"$PYTHON" -m pytest -q tests/test_fast_paths.py -p no:cacheprovider
echo "tests took $(( $(date +%s) - start )) s"

echo "== bench: LeNet-BN batch 128"
"$PYTHON" -m backmatch_exact.cli bench --model lenet --batch-size 128 --device "$DEVICE" --steps "$STEPS" \
    --warmup 3 --profile-steps 3 --out "$OUT_DIR/bench_${TAG}_lenet.json" "$@"

echo "== bench: VGG11-BN batch 128 (CIFAR shapes)"
"$PYTHON" -m backmatch_exact.cli bench --model vgg11 --batch-size 128 --device "$DEVICE" --steps "$VGG_STEPS" \
    --warmup 2 --profile-steps 2 --out "$OUT_DIR/bench_${TAG}_vgg11.json" "$@"
echo "total $(( $(date +%s) - start )) s"
