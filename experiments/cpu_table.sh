#!/usr/bin/env bash
# The NWPU-RESISC45 CPU table of the README: DeiT-Tiny at 112 px trained from scratch (no
# pretrained weights can be downloaded on the machine it ran on), every row with the same
# epochs, seed and recipe (searches in --search-mode joint, so that every row gets the same number
# of weight updates); two rows run side by side with one thread each.
# Usage: [SEED=0] [ONLY="row names"] experiments/cpu_table.sh [DATA] [OUT] [EPOCHS]
# SEED changes the initialisation, data order and augmentation; ONLY runs a subset of ROWS.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/nwpu-resisc45}
OUT=${2:-output/nwpu}
EPOCHS=${3:-8}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
COMMON=(--data-path "$DATA" --model sdt2net_tiny_patch16_224 --input-size 112 --epochs "$EPOCHS"
        --batch-size 64 --lr 2e-3 --warmup-epochs 0 --drop-path 0.0 --aa none --mixup 0 --cutmix 0
        --reprob 0 --arch-lr 0.01 --arch-min-lr 0.01 --seed "${SEED:-0}" --num_workers 0 --print-freq 10)

row() {  # name, extra flags...: train, then evaluate the last checkpoint
  local name=$1; shift
  "$PY" main.py "${COMMON[@]}" --output_dir "$OUT/$name" "$@" > "$OUT/$name.train.log" 2>&1
  "$PY" main.py "${COMMON[@]}" --eval --resume "$OUT/$name/checkpoint.pth" --output_dir "$OUT/$name/eval" \
    --throughput-batch 32 "$@" > "$OUT/$name.eval.log" 2>&1
}

ROWS=(
  "deit_dense|--no-eab --no-ftf --fixed-schedule dense --target_flops 0.286"
  "sdt2net_0.35|--search-mode joint --target_flops 0.35"
  "uniform_0.35|--fixed-schedule uniform --target_flops 0.35"
  "no_eab_0.177|--search-mode joint --no-eab --target_flops 0.177"
  "sdt2net_0.30|--search-mode joint --target_flops 0.30"
  "no_ftf_0.349|--search-mode joint --no-ftf --target_flops 0.349"
)

worker() {  # takes the next row nobody has started (mkdir is the lock), until none is left
  for spec in "${ROWS[@]}"; do
    local name=${spec%%|*}
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || continue
    mkdir "$OUT/$name" 2>/dev/null || continue
    # shellcheck disable=SC2086
    row "$name" ${spec#*|}
  done
}

mkdir -p "$OUT"
for _ in $(seq "${SLOTS:-2}"); do worker & done
wait
echo "done: $OUT"
