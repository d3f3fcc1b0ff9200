#!/usr/bin/env bash
# DiffRate's off-the-shelf experiment on NWPU-RESISC45, on a CPU: a dense DeiT-Tiny (112 px, EAB,
# FTF and compression off) trained on train/ stands in for the pretrained DeiT; on its frozen
# weights, schedules are searched (--search-mode arch) at four budgets and compared on test/ at
# equal FLOPs with hand-set schedules (the same count, ToMe, or the same fraction removed in every
# block; by merging or by pruning) and the learned counts'
# prune-only and merge-only forms (the search before the gradient fix of commit 2173462 was run by
# this script at commit c1dc99f with BEFORE=1). Restartable: a finished stage is skipped.
# DENSE_START=1 also searches from the dense start instead of DiffRate's uniform one; LONG="0.115"
# also searches those budgets for 15 epochs instead of 3.
# Usage: [SLOTS=2] [DENSE_START=1] [LONG="0.115"] [BUDGETS="0.23 0.185"] experiments/offtheshelf.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/recipes.sh "$@"
mkdir -p "$OUT/eval"
# GFLOPs budgets: about 80, 65, 50 and 40% of the dense 0.285
read -r -a BUDGETS <<< "${BUDGETS:-0.23 0.185 0.145 0.115}"
MODEL=("${BASE[@]}" --no-eab --no-ftf --seed 0)
EVAL=(--eval --eval-split test --finetune "$BACKBONE" --throughput-batch 0)

done_file() { [[ -f "$1" ]]; }

stage_backbone() {  # about 50 min on one core of the 2-core CPU box
  done_file "$OUT/backbone/done" && return
  "$PY" main.py "${MODEL[@]}" --fixed-schedule dense --target_flops 0.286 --epochs 40 --lr 2e-3 \
    --warmup-epochs 2 --drop-path 0.1 --mixup 0 --cutmix 0 --smoothing 0.1 --output_dir "$OUT/backbone" \
    --autoresume > "$OUT/backbone.log" 2>&1
  touch "$OUT/backbone/done"
}

evaluate() {  # name, flags...: top-1 and predictions on test/ with the backbone's weights
  local name=$1; shift
  done_file "$OUT/eval/$name/eval_metrics.json" && return
  "$PY" main.py "${MODEL[@]}" "${EVAL[@]}" --output_dir "$OUT/eval/$name" "$@" > "$OUT/eval/$name.log" 2>&1
}

learned_gflops() {  # the FLOPs the search at budget $1 reached (its folder: search_$2$1)
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['sdt2net_tiny_patch16_224'][sys.argv[2]]['gflops'])" \
    "$OUT/search_${2:-}$1/compression_rate.json" "$1"
}

budget() {  # search at one budget, then evaluate every schedule at the FLOPs it reached
  local t=$1
  if ! done_file "$OUT/search_$t/done"; then
    "$PY" main.py "${MODEL[@]}" "${SEARCH[@]}" --finetune "$BACKBONE" --target_flops "$t" --autoresume \
      --output_dir "$OUT/search_$t" > "$OUT/search_$t.log" 2>&1
    touch "$OUT/search_$t/done"
  fi
  local file=(--load_compression_rate --compression-rate-file "$OUT/search_$t/compression_rate.json" --target_flops "$t")
  evaluate "learned_$t" "${file[@]}"
  evaluate "learned_prune_only_$t" "${file[@]}" --schedule-variant prune-only
  evaluate "learned_merge_only_$t" "${file[@]}" --schedule-variant merge-only
  local g; g=$(learned_gflops "$t")
  # ToMe's constant count cannot go below about 54% of the dense FLOPs: an error line in its log
  evaluate "uniform_merge_$t" --fixed-schedule uniform --target_flops "$g" || true
  evaluate "uniform_prune_$t" --fixed-schedule uniform-prune --target_flops "$g" || true
  evaluate "geometric_merge_$t" --fixed-schedule geometric --target_flops "$g"
  evaluate "geometric_prune_$t" --fixed-schedule geometric-prune --target_flops "$g"
}

dense_start() {  # the same search from the dense start (95% of the mass on keeping every token)
  local t=$1
  if ! done_file "$OUT/search_dense_$t/done"; then
    "$PY" main.py "${MODEL[@]}" "${SEARCH[@]}" --search-start dense --finetune "$BACKBONE" --target_flops "$t" \
      --autoresume --output_dir "$OUT/search_dense_$t" > "$OUT/search_dense_$t.log" 2>&1
    touch "$OUT/search_dense_$t/done"
  fi
  local file=(--load_compression_rate --compression-rate-file "$OUT/search_dense_$t/compression_rate.json" --target_flops "$t")
  evaluate "learned_dense_$t" "${file[@]}"
  evaluate "learned_dense_merge_only_$t" "${file[@]}" --schedule-variant merge-only
}

long_search() {  # the same search, five times as long (15 epochs, about 735 rate steps)
  local t=$1
  if ! done_file "$OUT/search_long_$t/done"; then
    # the later --epochs wins
    "$PY" main.py "${MODEL[@]}" "${SEARCH[@]}" --epochs 15 --finetune "$BACKBONE" --target_flops "$t" --autoresume \
      --output_dir "$OUT/search_long_$t" > "$OUT/search_long_$t.log" 2>&1
    touch "$OUT/search_long_$t/done"
  fi
  evaluate "learned_long_$t" --load_compression_rate --target_flops "$t" \
    --compression-rate-file "$OUT/search_long_$t/compression_rate.json"
  local g; g=$(learned_gflops "$t" long_)  # a longer search may settle off the target: compare at its FLOPs
  evaluate "geometric_merge_long_$t" --fixed-schedule geometric --target_flops "$g"
}

stage_backbone
evaluate dense --fixed-schedule dense --target_flops 0.286
done_file "$OUT/eval/dense_val/eval_metrics.json" || "$PY" main.py "${MODEL[@]}" --eval --finetune "$BACKBONE" \
  --fixed-schedule dense --throughput-batch 0 --output_dir "$OUT/eval/dense_val" > "$OUT/eval/dense_val.log" 2>&1

JOBS=()
for t in "${BUDGETS[@]}"; do JOBS+=("budget $t"); done
[[ -n "${DENSE_START:-}" ]] && for t in "${BUDGETS[@]}"; do JOBS+=("dense_start $t"); done
[[ -n "${LONG:-}" ]] && for t in $LONG; do JOBS+=("long_search $t"); done
run_pool "$OUT/locks" "${JOBS[@]}"
echo "done: $OUT"
