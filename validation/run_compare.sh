#!/usr/bin/env bash
# Exact back-matching vs Algorithm 1 on LeNet-BN and the shipped Fashion-MNIST subset (validation/README.md).
#
#   validation/run_compare.sh [OUT] [more backmatch-compare options]
#
# Defaults: SGD lr 0.05 momentum 0.9, 300 steps of batch 128, a checkpoint every 30 steps on one fixed
# batch of 128 training images, float64 evaluation. Writes OUT/layers.csv, summary.json, report.md, *.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-validation/out/compare}
shift || true
python -m backmatch_exact.cli compare --data default --model lenet --out "$OUT" "$@"
