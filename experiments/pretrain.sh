#!/usr/bin/env bash
# A pretrained backbone on this machine (docs/results.md, "Pretrained backbone"): a dense DeiT-Tiny
# (EAB, FTF and compression off) pretrained on the 20,250 NWPU-RESISC45 images of POOL that no
# split uses, then fine-tuned on DATA's train/ as the paper fine-tunes ImageNet DeiT on its 10%
# split. CPU recipe: most pretraining epochs at 64 px (17 tokens, about 3x cheaper than 112 px),
# a few at 112 px (the position embedding is resampled by --finetune), then the fine-tuning at
# 112 px; checkpoints are chosen on val/ (model_best.pth), the last stage is reported on test/.
# Restartable: every stage runs with --autoresume and a finished one is skipped.
# Usage: [SEED=0] [LOW_EPOCHS=20] [HIGH_EPOCHS=2] [TUNE_EPOCHS=20] experiments/pretrain.sh [DATA] [OUT] [POOL]
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/recipes.sh "${1:-}" "${2:-output/pretrained}"
POOL=$(realpath "${3:-../shared/datasets/nwpu-resisc45-pool}")  # its train/; val/ is DATA's
SEED=${SEED:-0}
DENSE=(--model sdt2net_tiny_patch16_224 --no-eab --no-ftf --fixed-schedule dense --target_flops 1
       --seed "$SEED" --num_workers 1 --print-freq 50 --drop-path 0.1 --mixup 0 --cutmix 0 --smoothing 0.1)

stage() {  # name, flags...: one restartable training stage in OUT/name
  local name=$1; shift
  [[ -f "$OUT/$name/done" ]] && return
  "$PY" main.py "${DENSE[@]}" --output_dir "$OUT/$name" --autoresume "$@" > "$OUT/$name.log" 2>&1
  touch "$OUT/$name/done"
}

# 1. the pool at 64 px: batch 128, lr 2e-3 per 512 images (the backbone recipe of search_study.sh)
stage pool64 --data-path "$DATA" --train-path "$POOL/train" --input-size 64 --batch-size 128 --epochs "${LOW_EPOCHS:-20}" --lr 2e-3 \
  --warmup-epochs 2
# 2. the pool at 112 px from the best 64 px checkpoint, a short cosine from a lower lr
stage pool112 --data-path "$DATA" --train-path "$POOL/train" --input-size 112 --batch-size 64 --epochs "${HIGH_EPOCHS:-2}" --lr 5e-4 \
  --warmup-epochs 0 --finetune "$OUT/pool64/model_best.pth"
# 3. fine-tuning on train/ at 112 px (the paper's 10% split)
stage tuned --data-path "$DATA" --input-size 112 --batch-size 64 --epochs "${TUNE_EPOCHS:-20}" --lr 5e-4 \
  --warmup-epochs 2 --finetune "$OUT/pool112/model_best.pth"
# 4. the chosen checkpoint on test/
[[ -f "$OUT/tuned/eval_test/eval_metrics.json" ]] || "$PY" main.py "${DENSE[@]}" --data-path "$DATA" \
  --input-size 112 --batch-size 64 --eval --eval-split test --resume "$OUT/tuned/model_best.pth" \
  --throughput-batch 0 --output_dir "$OUT/tuned/eval_test" > "$OUT/tuned_test.log" 2>&1
echo "done: $OUT"
