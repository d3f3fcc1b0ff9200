#!/usr/bin/env bash
# Fine-tuning after the search (DiffRate's second stage), on the runs of experiments/offtheshelf.sh:
# the searched model at two budgets, fine-tuned under its schedule, against the dense backbone
# fine-tuned with the same recipe and epochs (experiments/recipes.sh); three seeds each, top-1 on
# test/. Restartable: a finished run is skipped.
# Usage: [SLOTS=2] [EPOCHS=5] [BUDGETS="0.185 0.145"] experiments/finetune.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/recipes.sh "$@"
read -r -a BUDGETS <<< "${BUDGETS:-0.185 0.145}"
mkdir -p "$OUT/tuned"

JOBS=()
for seed in 0 1 2; do
  JOBS+=("tune_and_test $OUT/tuned/dense_seed$seed $seed deit --finetune $BACKBONE --fixed-schedule dense --target_flops 0.286")
  for t in "${BUDGETS[@]}"; do
    JOBS+=("tune_and_test $OUT/tuned/learned_${t}_seed$seed $seed deit --finetune $OUT/search_$t/checkpoint.pth \
--load_compression_rate --compression-rate-file $OUT/search_$t/compression_rate.json --target_flops $t")
  done
done
run_pool "$OUT/locks_tune" "${JOBS[@]}"
echo "done: $OUT/tuned"
