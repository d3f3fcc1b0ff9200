#!/usr/bin/env bash
# Fine-tuning after the search (DiffRate's second stage), on the runs of experiments/offtheshelf.sh:
# the searched model at two budgets, fine-tuned under its schedule, against the dense backbone
# fine-tuned with the same recipe and epochs; three seeds each, top-1 on test/.
# Recipe: DiffRate's fine-tuning (lr 2e-5 after batch scaling, min lr 1e-6, no warm-up; drop-path 0
# as DiffRate uses for Tiny) with the backbone's augmentation, for EPOCHS epochs (CPU budget).
# Restartable: a finished run is skipped.
# Usage: [SLOTS=2] [EPOCHS=5] [BUDGETS="0.185 0.145"] experiments/finetune.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${1:-../shared/datasets/nwpu-resisc45}")
OUT=$(realpath "${2:-output/offtheshelf}")
PY=${PY:-$PWD/.venv/bin/python}
EPOCHS=${EPOCHS:-5}
read -r -a BUDGETS <<< "${BUDGETS:-0.185 0.145}"
export OMP_NUM_THREADS=1
MODEL=(--data-path "$DATA" --model sdt2net_tiny_patch16_224 --input-size 112 --no-eab --no-ftf --batch-size 64
       --num_workers 1 --print-freq 50)
# 2e-5 at DiffRate's scale: --lr is for a total batch of 512 and scaled by 64 / 512 here
TUNE=(--epochs "$EPOCHS" --lr 1.6e-4 --min-lr 1e-6 --warmup-epochs 0 --drop-path 0.0 --mixup 0 --cutmix 0)
rm -rf "$OUT/locks_tune" && mkdir -p "$OUT/locks_tune" "$OUT/tuned"

run() {  # name, seed, flags...: fine-tune, then evaluate the last checkpoint on test/
  local name=$1 seed=$2; shift 2
  local dir="$OUT/tuned/${name}_seed$seed"
  if [[ ! -f "$dir/done" ]]; then
    "$PY" main.py "${MODEL[@]}" "${TUNE[@]}" --seed "$seed" --output_dir "$dir" --autoresume "$@" \
      > "$dir.log" 2>&1
    touch "$dir/done"
  fi
  [[ -f "$dir/eval/eval_metrics.json" ]] || "$PY" main.py "${MODEL[@]}" --eval --eval-split test \
    --resume "$dir/checkpoint.pth" --throughput-batch 0 --output_dir "$dir/eval" > "$dir.eval.log" 2>&1
}

JOBS=()
for seed in 0 1 2; do
  JOBS+=("run dense $seed --finetune $OUT/backbone/checkpoint.pth --fixed-schedule dense --target_flops 0.286")
  for t in "${BUDGETS[@]}"; do
    JOBS+=("run learned_$t $seed --finetune $OUT/search_$t/checkpoint.pth --load_compression_rate \
--compression-rate-file $OUT/search_$t/compression_rate.json --target_flops $t")
  done
done
worker() {  # takes the next job nobody has started (mkdir is the lock)
  local i
  for i in "${!JOBS[@]}"; do
    mkdir "$OUT/locks_tune/$i" 2>/dev/null || continue
    ${JOBS[$i]}
  done
}
for _ in $(seq "${SLOTS:-2}"); do worker & done
wait
rm -rf "$OUT/locks_tune"
echo "done: $OUT/tuned"
