#!/usr/bin/env bash
# ResNet-20 on the shipped Fashion-MNIST subset (validation/README.md, "ResNet-20"): exact back-matching vs
# Algorithm 1 on a branching network (compare), and a 3-seed training table (SGD, Algorithm 1, exact with
# damping, LARS, LSALR).
#
#   validation/run_resnet.sh [OUT] [more options for both commands, e.g. --threads 1]
#   EPOCHS=10 validation/run_resnet.sh           # longer (default 3: about 1.5 h on one CPU core)
#
# Every call resumes the training; compare is skipped when OUT/compare holds its results.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-validation/out/resnet20}
shift || true
EPOCHS=${EPOCHS:-3}
# 100 SGD steps, checkpoints at 0, 50, 100 on a fixed batch of 64 (each checkpoint's 20 engine passes in
# float64 take about two minutes on ResNet-20, most of it in the joint run's iterative solves)
[ -f "$OUT/compare/summary.json" ] || python -m backmatch_exact.cli compare --data default --model resnet20 \
    --steps 100 --every 50 --eval-batch 64 --out "$OUT/compare" --no-progress "$@"
COMMON=(--data default --model resnet20 --epochs "$EPOCHS" --seeds 0 1 2 --batch-size 128 --momentum 0.9
        --out "$OUT/train" --resume "$@")
python -m backmatch_exact.cli train --optim sgd approx lsalr --lr 0.05 "${COMMON[@]}"
python -m backmatch_exact.cli train --optim lars --lr 0.002 "${COMMON[@]}"
# exact back-matching, damped: LeNet's setting (lr 0.05, λ = μ = 1) diverges within a dozen steps here; the
# two others were the best of lr {0.01, 0.002} x λ {1, 10} x μ {1, 10} in a 30-step probe (seed 0)
python -m backmatch_exact.cli train --optim exact --lr 0.05 --damping 1 --signal-damping 1 "${COMMON[@]}"
python -m backmatch_exact.cli train --optim exact --lr 0.002 --damping 1 --signal-damping 1 "${COMMON[@]}"
python -m backmatch_exact.cli train --optim exact --lr 0.01 --damping 10 --signal-damping 1 "${COMMON[@]}"
# the weight solves alone, on backprop's signals (FOOF-like)
python -m backmatch_exact.cli train --optim exact_weights --lr 0.05 --damping 1 "${COMMON[@]}"
