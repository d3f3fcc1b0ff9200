#!/usr/bin/env bash
# What makes a learned schedule beat the hand-set ones (docs/results.md, "Search study"): on the
# frozen dense backbone of seed SEED (the backbone recipe of experiments/offtheshelf.sh), DiffRate's
# merge rule against the size-weighted one, then searches of several recipes at each budget, each
# compared with the geometric (same fraction) and ToMe (same count) merge schedules at the FLOPs it
# reached, on val/ (to choose) and test/ (to report). Restartable: a finished stage is skipped.
# TUNE_BUDGETS="0.185" then fine-tunes, at each of those budgets, the schedule of the recipe TUNE_RECIPE
# (default anneal) and the geometric one at its FLOPs for EPOCHS epochs (experiments/recipes.sh) with the seeds of TUNE_SEEDS.
# BACKBONE=PATH searches on that checkpoint instead of training one (experiments/pretrain.sh's).
# Usage: [SEED=0] [BACKBONE_EPOCHS=40] [BACKBONE=PATH] [SLOTS=2] [BUDGETS="0.185 0.145"] [RECIPES="diffrate anneal"]
#        [TUNE_BUDGETS="0.185"] [TUNE_RECIPE=anneal] [TUNE_SEEDS="0 1 2"] experiments/search_study.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/recipes.sh "$@"
SEED=${SEED:-0}
read -r -a BUDGETS <<< "${BUDGETS:-0.185 0.145}"
read -r -a RECIPES <<< "${RECIPES:-diffrate anneal}"
MODEL=("${BASE[@]}" --no-eab --no-ftf --seed "$SEED")
mkdir -p "$OUT/eval"

stage_backbone() {
  [[ -f "$OUT/backbone/done" || "$BACKBONE" != "$OUT/backbone/checkpoint.pth" ]] && return  # given or trained
  "$PY" main.py "${MODEL[@]}" --fixed-schedule dense --target_flops 0.286 --epochs "${BACKBONE_EPOCHS:-40}" \
    --lr 2e-3 --warmup-epochs 2 --drop-path 0.1 --mixup 0 --cutmix 0 --smoothing 0.1 --output_dir "$OUT/backbone" \
    --autoresume > "$OUT/backbone.log" 2>&1
  touch "$OUT/backbone/done"
}

evaluate() {  # name, flags...: the backbone's weights under a schedule, on val/ and test/
  local name=$1 split; shift
  for split in val test; do
    [[ -f "$OUT/eval/$split/$name/eval_metrics.json" ]] && continue
    mkdir -p "$OUT/eval/$split"
    "$PY" main.py "${MODEL[@]}" --eval --eval-split "$split" --finetune "$BACKBONE" --throughput-batch 0 \
      --output_dir "$OUT/eval/$split/$name" "$@" > "$OUT/eval/$split/$name.log" 2>&1
  done
}

merge_rules() {  # the geometric merge schedule at each budget under both merge rules
  local t rule
  for t in "${BUDGETS[@]}"; do
    for rule in size-weighted diffrate; do
      evaluate "rule_${rule}_$t" --fixed-schedule geometric --target_flops "$t" --merge-rule "$rule"
    done
  done
}

reached() {  # the GFLOPs a finished search reached
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['sdt2net_tiny_patch16_224'][sys.argv[2]]['gflops'])" \
    "$1/compression_rate.json" "$2"
}

search() {  # recipe, budget: search, then every schedule at the FLOPs it reached
  local name=$1 t=$2 dir="$OUT/search_$1_$2" flags
  read -r -a flags <<< "$(recipe "$name")"
  if [[ ! -f "$dir/done" ]]; then
    "$PY" main.py "${MODEL[@]}" "${flags[@]}" --target_flops "$t" --autoresume --output_dir "$dir" > "$dir.log" 2>&1
    touch "$dir/done"
  fi
  evaluate "${name}_$t" --load_compression_rate --compression-rate-file "$dir/compression_rate.json" --target_flops "$t"
  local g; g=$(reached "$dir" "$t")
  evaluate "${name}_${t}_geometric" --fixed-schedule geometric --target_flops "$g"
  evaluate "${name}_${t}_tome" --fixed-schedule uniform --target_flops "$g" || true  # ToMe cannot go below ~54%
}

stage_backbone
evaluate dense --fixed-schedule dense --target_flops 0.286
merge_rules
JOBS=()
for t in "${BUDGETS[@]}"; do for r in "${RECIPES[@]}"; do JOBS+=("search $r $t"); done; done
run_pool "$OUT/locks" "${JOBS[@]}"
if [[ -n "${TUNE_BUDGETS:-}" ]]; then  # fine-tuning under the learned and the geometric schedule, on test/
  mkdir -p "$OUT/tuned"
  JOBS=()
  for t in $TUNE_BUDGETS; do
    recipe=${TUNE_RECIPE:-anneal} && dir="$OUT/search_${recipe}_$t"
    g=$(reached "$dir" "$t")
    for seed in ${TUNE_SEEDS:-0 1 2}; do
      JOBS+=("tune_and_test $OUT/tuned/${recipe}_${t}_seed$seed $seed deit --finetune $dir/checkpoint.pth \
--load_compression_rate --compression-rate-file $dir/compression_rate.json --target_flops $t")
      JOBS+=("tune_and_test $OUT/tuned/geometric_${t}_seed$seed $seed deit --finetune $BACKBONE \
--fixed-schedule geometric --target_flops $g")
    done
  done
  run_pool "$OUT/locks_tune" "${JOBS[@]}"
fi
echo "done: $OUT"
