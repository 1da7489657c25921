#!/usr/bin/env bash
# The training comparison of validation/README.md: LeNet-BN on the shipped Fashion-MNIST subset
# (10,000 training / 2,000 test images), 3 seeds, same initial weights and batch order per seed.
#
#   validation/run_train.sh [OUT] [more backmatch-train options, e.g. --threads 1]
#   EPOCHS=20 validation/run_train.sh            # longer
#
# Every call resumes: rerun the script after an interruption and it continues where it stopped.
# Writes OUT/results.jsonl, OUT/summary.md, OUT/curves.png (and OUT/checkpoints/, not for committing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-validation/out/train}
shift || true
EPOCHS=${EPOCHS:-10}
COMMON=(--data default --model lenet --epochs "$EPOCHS" --seeds 0 1 2 --batch-size 128 --momentum 0.9
        --out "$OUT" --resume "$@")
# backprop baselines and Algorithm 1 ("approx"); lr 0.05 for all but LARS, whose lr is a relative step
python -m backmatch_exact.cli train --optim sgd approx lsalr --lr 0.05 "${COMMON[@]}"
python -m backmatch_exact.cli train --optim lars --lr 0.002 "${COMMON[@]}"
# exact back-matching: undamped, λ only, μ only, both (λ relative to mean diag G, μ to the mean column norm)
python -m backmatch_exact.cli train --optim exact --lr 0.05 --damping 0 1 --signal-damping 0 1 "${COMMON[@]}"
