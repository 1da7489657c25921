#!/usr/bin/env bash
# Joint vs per-unit back-matching on LeNet-BN and the shipped Fashion-MNIST subset (validation/README.md, "Joint").
#
#   validation/run_joint.sh [OUT] [more backmatch-train options, e.g. --threads 1]
#   EPOCHS=10 validation/run_joint.sh          # longer
#
# 1. backmatch compare with the joint run (undamped, and with λ = μ = 1) into OUT/compare, OUT/compare_damped;
# 2. a 3-seed training table into OUT/train: SGD, Algorithm 1, and exact back-matching per-unit and joint,
#    undamped and damped. Every training call resumes: rerun after an interruption to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-validation/out/joint}
shift || true
EPOCHS=${EPOCHS:-5}
python -m backmatch_exact.cli compare --data default --model lenet --out "$OUT/compare" --no-progress "$@"
python -m backmatch_exact.cli compare --data default --model lenet --out "$OUT/compare_damped" --damping 1 \
    --signal-damping 1 --no-progress "$@"
COMMON=(--data default --model lenet --epochs "$EPOCHS" --seeds 0 1 2 --batch-size 128 --momentum 0.9
        --out "$OUT/train" --resume --no-progress "$@")
python -m backmatch_exact.cli train --optim sgd approx --lr 0.05 "${COMMON[@]}"
python -m backmatch_exact.cli train --optim exact --lr 0.05 --damping 0 1 --signal-damping 0 1 \
    --signals per_unit joint "${COMMON[@]}"
