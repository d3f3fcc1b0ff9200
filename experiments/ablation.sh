#!/usr/bin/env bash
# SDT2Net's ablation at one budget (the paper's table): DeiT + DTC, + EAB, + FTF, + EAB + FTF, all
# from the backbone of experiments/offtheshelf.sh (EAB's last convolution and FTF's classifier
# start at zero, so every row starts as the backbone's function). Per row: a 3-epoch rate search at
# BUDGET GFLOPs with that row's own FLOPs (EAB's and FTF's cost included, so a row with EAB keeps
# fewer tokens), then EPOCHS epochs of fine-tuning under the schedule found with three seeds (the
# recipes of experiments/recipes.sh), top-1 on test/; then every model with EAB once more with its
# EABs back at zero (experiments/eab_knockout.py). Restartable: a finished stage is skipped.
# BACKBONE=PATH starts from another backbone (experiments/pretrain.sh's tuned/model_best.pth);
# START_FLOPS=F starts every search at the row's geometric schedule of F GFLOPs and slides the budget
# to BUDGET over 2 epochs (unset: DiffRate's uniform start); ADDED_LR_SCALE=S fine-tunes EAB and FTF,
# which start at zero, at S times the learning rate of the backbone's weights (main.py --added-lr-scale).
# Usage: [SLOTS=2] [EPOCHS=5] [BUDGET=0.185] [BACKBONE=PATH] [START_FLOPS=F] [ADDED_LR_SCALE=1]
#        [ROWS="deit eab ftf both"] experiments/ablation.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/recipes.sh "$@"
BUDGET=${BUDGET:-0.185}
read -r -a ROWS <<< "${ROWS:-deit eab ftf both}"  # a subset reruns some rows (e.g. at another ADDED_LR_SCALE)
START=()
[[ -n "${START_FLOPS:-}" ]] && START=(--search-start geometric --search-start-flops "$START_FLOPS" --anneal-epochs 2)
if [[ ! -f "$BACKBONE" || ( "$BACKBONE" == "$OUT/backbone/checkpoint.pth" && ! -f "$OUT/backbone/done" ) ]]; then
  echo "error: no backbone at $BACKBONE: run experiments/offtheshelf.sh first, or set BACKBONE=PATH" >&2
  exit 2
fi
mkdir -p "$OUT/ablation"

search() {  # variant: the rates searched on the frozen backbone (+ the variant's new, zero-started parts)
  local row=$1 dir="$OUT/ablation/search_$1" model
  read -r -a model <<< "$(variant "$row")"
  [[ -f "$dir/done" ]] && return
  "$PY" main.py "${BASE[@]}" "${model[@]}" "${SEARCH[@]}" "${START[@]}" --seed 0 --finetune "$BACKBONE" --target_flops "$BUDGET" \
    --autoresume --output_dir "$dir" > "$dir.log" 2>&1
  touch "$dir/done"
}

JOBS=()
for row in "${ROWS[@]}"; do JOBS+=("search $row"); done
run_pool "$OUT/ablation/locks" "${JOBS[@]}"
JOBS=()
for seed in 0 1 2; do
  for row in "${ROWS[@]}"; do
    search_dir="$OUT/ablation/search_$row"
    JOBS+=("tune_and_test $OUT/ablation/${row}_seed$seed $seed $row --finetune $search_dir/checkpoint.pth \
--load_compression_rate --compression-rate-file $search_dir/compression_rate.json --target_flops $BUDGET \
--added-lr-scale ${ADDED_LR_SCALE:-1}")
  done
done
run_pool "$OUT/ablation/locks" "${JOBS[@]}"

knockout() {  # folder, variant: the fine-tuned model with its EABs back at zero (the identity) on test/
  local dir=$1
  [[ -f "$dir/eval_no_eab/eval_metrics.json" ]] && return
  "$PY" -m experiments.eab_knockout "$dir/checkpoint.pth" "$dir/no_eab.pth" > "$dir.no_eab.log" 2>&1
  test_eval "$dir/no_eab.pth" "$dir/eval_no_eab" "$dir.no_eab.log" "$2"
  rm "$dir/no_eab.pth"
}
JOBS=()
for seed in 0 1 2; do
  for row in "${ROWS[@]}"; do
    if [[ $row == eab || $row == both ]]; then JOBS+=("knockout $OUT/ablation/${row}_seed$seed $row"); fi
  done
done
run_pool "$OUT/ablation/locks" "${JOBS[@]}"
echo "done: $OUT/ablation"
