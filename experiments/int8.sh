#!/usr/bin/env bash
# INT8 on top of token compression (docs/results.md, "INT8 on top of token compression"): the
# pretrained backbone (experiments/pretrain.sh) fine-tuned under its learned schedule
# (compression_rate.json, sdt2net_tiny_patch16_224 at 0.176 GFLOPs) with DiffRate's recipe, exported
# in int8 (dynamic; static calibrated on 256 train/ images), and scored on test/ against the fp32
# model it came from and against the dense fp32 backbone. Restartable: finished stages are skipped.
# Usage: [EPOCHS=5] [BACKBONE=output/pretrained/tuned/model_best.pth] experiments/int8.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
BACKBONE=$(realpath "${BACKBONE:-output/pretrained/tuned/model_best.pth}")
source experiments/recipes.sh "${1:-}" "${2:-output/int8}"
tune_and_test "$OUT/tuned" 0 deit --finetune "$BACKBONE" --load_compression_rate \
  --compression-rate-file compression_rate.json --target_flops 0.176
for mode in dynamic static; do
  [[ -f "$OUT/int8_$mode.onnx" ]] || "$PY" export.py onnx "$OUT/tuned/checkpoint.pth" "$OUT/int8_$mode.onnx" \
    --quantize "$mode" --calibration "$DATA/train" --calibration-images 256 > "$OUT/int8_$mode.log" 2>&1
done
[[ -f "$OUT/int8_accuracy.json" ]] || "$PY" -m experiments.int8_accuracy --data-path "$DATA" --split test \
  --dense "$BACKBONE" --compressed "$OUT/tuned/checkpoint.pth" --int8 "dynamic=$OUT/int8_dynamic.onnx" \
  "static=$OUT/int8_static.onnx" --out "$OUT/int8_accuracy.json" > "$OUT/int8_accuracy.log" 2>&1
echo "done: $OUT"
