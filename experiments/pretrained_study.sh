#!/usr/bin/env bash
# The search study of experiments/search_study.sh on the pretrained backbone of
# experiments/pretrain.sh (docs/results.md, "A pretrained backbone"): at 65% and 51% of its FLOPs,
# DiffRate's recipe from the uniform start and the annealed geometric start (5x the arch lr at 51%,
# as the from-scratch study found necessary), each against the geometric and ToMe merge schedules
# at the FLOPs it reached; then the learned schedules of TUNE_RECIPES and the geometric one at their
# FLOPs fine-tuned with the seeds of TUNE_SEEDS. Restartable: finished stages are skipped.
# Usage: [TUNE_SEEDS="0 1 2"] [SLOTS=2] experiments/pretrained_study.sh [DATA] [OUT] [PRETRAINED]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/nwpu-resisc45}
OUT=${2:-output/pretrained_study}
PRETRAINED=${3:-output/pretrained}
experiments/pretrain.sh "$DATA" "$PRETRAINED"
BACKBONE=$(realpath "$PRETRAINED/tuned/model_best.pth")  # chosen on val/
export BACKBONE
BUDGETS=0.185 RECIPES="diffrate anneal" TUNE_BUDGETS=${TUNE_65:-} TUNE_RECIPE=anneal \
  experiments/search_study.sh "$DATA" "$OUT"
BUDGETS=0.145 RECIPES="diffrate anneal_lr5" TUNE_BUDGETS=${TUNE_51:-} TUNE_RECIPE=anneal_lr5 \
  experiments/search_study.sh "$DATA" "$OUT"
