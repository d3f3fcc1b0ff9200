#!/usr/bin/env bash
# The search at exactly its budget against the best hand-set schedule (docs/results.md, "The search
# at its budget"): on the frozen pretrained backbone PRETRAINED (experiments/pretrain.sh), the
# README's search recipe (annealed from the geometric start; 5x DiffRate's arch lr below 65% of the
# dense FLOPs) with the search seeds SEEDS at each budget, each filed onto its budget; then on val/
# and test/ every learned schedule against the geometric one, ToMe's and the back-loaded family at
# that budget (experiments/budget_fit.py; on test/ the back-loaded member chosen on val/); then at
# TUNE_BUDGET the learned schedule and the hand-set rule best on val/ fine-tuned EPOCHS epochs
# (DiffRate's recipe, experiments/recipes.sh) with the seeds TUNE_SEEDS and scored on test/. Also,
# unless AS_LEARNED is empty, each search's own learned counts against the rules at their FLOPs.
# Restartable: finished stages are skipped. About 2 hours per backbone with two jobs at a time.
# Usage: [SEEDS="0 1 2"] [BUDGETS="0.145 0.185"] [AS_LEARNED=1] [TUNE_BUDGET=0.145] [TUNE_SEEDS="0 1 2"] [EPOCHS=5] [SLOTS=2]
#        experiments/budget_study.sh [DATA] [OUT] [PRETRAINED]
set -euo pipefail
cd "$(dirname "$0")/.."
BACKBONE=$(realpath "${3:-output/pretrained}/tuned/model_best.pth")  # chosen on val/
export EPOCHS=${EPOCHS:-5}  # read by recipes.sh's fine-tuning recipe
source experiments/recipes.sh "${1:-}" "${2:-output/budget_study}"
read -r -a SEEDS <<< "${SEEDS:-0 1 2}"
read -r -a BUDGETS <<< "${BUDGETS:-0.145 0.185}"
TUNE_BUDGET=${TUNE_BUDGET:-0.145}
MODEL=("${BASE[@]}" --no-eab --no-ftf)

recommended() {  # the README's search recipe at a budget (GFLOPs of DeiT-Tiny at 112 px: dense 0.285)
  if awk "BEGIN { exit !($1 < 0.185) }"; then recipe anneal_lr5; else recipe anneal; fi
}

search() {  # budget, seed
  local dir=$OUT/search_$1_s$2 flags
  [[ -f "$dir/done" ]] && return
  read -r -a flags <<< "$(recommended "$1")"
  "$PY" main.py "${MODEL[@]}" "${flags[@]}" --seed "$2" --target_flops "$1" --autoresume --output_dir "$dir" \
    > "$dir.log" 2>&1
  touch "$dir/done"
}

evaluate() {  # budget, split: every schedule at the budget (on test/ the back-loaded member chosen on val/)
  local out=$OUT/eval_$1_$2.json learned=() seed
  [[ -f "$out" ]] && return
  for seed in "${SEEDS[@]}"; do learned+=(--learned "seed $seed=$OUT/search_$1_s$seed/compression_rate.json:sdt2net_tiny_patch16_224:$1"); done
  [[ $2 == test ]] && learned+=(--choose-on "$OUT/eval_$1_val.json")
  "$PY" -m experiments.budget_fit "$BACKBONE" --data-path "$DATA" --split "$2" --target_flops "$1" "${learned[@]}" \
    --out "$out" > "${out%.json}.log" 2>&1
}

as_learned() {  # budget, seed: on test/, the counts the search learned at the FLOPs they reached, against the rules there
  local out=$OUT/eval_$1_s$2_as_learned_test.json dir=$OUT/search_$1_s$2 reached
  [[ -f "$out" ]] && return
  reached=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['sdt2net_tiny_patch16_224'][sys.argv[2]]['learned']['gflops'] + 1e-4)" \
    "$dir/compression_rate.json" "$1")  # the FLOPs are filed to 4 decimals
  "$PY" -m experiments.budget_fit "$BACKBONE" --data-path "$DATA" --split test --target_flops "$reached" --as-learned \
    --learned "seed $2=$dir/compression_rate.json:sdt2net_tiny_patch16_224:$1" --choose-on "$OUT/eval_$1_val.json" \
    --out "$out" > "${out%.json}.log" 2>&1
}

chosen() {  # budget, learned|rule: main.py's schedule flags of the choice made on val/
  "$PY" -c "import json, sys; print(' '.join(json.load(open(sys.argv[1]))['chosen'][sys.argv[2]]['flags']))" \
    "$OUT/eval_$1_val.json" "$2"
}

JOBS=()
for t in "${BUDGETS[@]}"; do for seed in "${SEEDS[@]}"; do JOBS+=("search $t $seed"); done; done
run_pool "$OUT/locks_search" "${JOBS[@]}"
JOBS=()
for t in "${BUDGETS[@]}"; do JOBS+=("evaluate $t val"); done
run_pool "$OUT/locks_val" "${JOBS[@]}"
JOBS=()
for t in "${BUDGETS[@]}"; do JOBS+=("evaluate $t test"); done
run_pool "$OUT/locks_test" "${JOBS[@]}"
if [[ -n "${AS_LEARNED-1}" ]]; then  # is the fit onto the budget what costs? the searches where they stopped
  JOBS=()
  for t in "${BUDGETS[@]}"; do for seed in "${SEEDS[@]}"; do JOBS+=("as_learned $t $seed"); done; done
  run_pool "$OUT/locks_as_learned" "${JOBS[@]}"
fi
if [[ -n "${TUNE_SEEDS-0 1 2}" ]]; then
  mkdir -p "$OUT/tuned"
  JOBS=()
  for seed in ${TUNE_SEEDS-0 1 2}; do
    for choice in learned rule; do
      JOBS+=("tune_and_test $OUT/tuned/${choice}_${TUNE_BUDGET}_seed$seed $seed deit --finetune $BACKBONE \
$(chosen "$TUNE_BUDGET" "$choice") --target_flops $TUNE_BUDGET")
    done
  done
  run_pool "$OUT/locks_tune" "${JOBS[@]}"
fi
echo "done: $OUT"
