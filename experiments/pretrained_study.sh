#!/usr/bin/env bash
# The search study of experiments/search_study.sh on the pretrained backbone of
# experiments/pretrain.sh (docs/results.md, "A pretrained backbone"): at 65% and 51% of its FLOPs,
# DiffRate's recipe from the uniform start and the annealed geometric start (5x the arch lr at 51%,
# as the from-scratch study found necessary), each against the geometric and ToMe merge schedules
# at the FLOPs it reached. TUNE="BUDGET:RECIPE ..." then fine-tunes each named learned schedule and
# the geometric one at its FLOPs with the seeds of TUNE_SEEDS (choose the recipe on val/ first).
# Restartable: finished stages are skipped.
# Usage: [TUNE="0.185:anneal"] [TUNE_SEEDS="0 1 2"] [SLOTS=2] experiments/pretrained_study.sh [DATA] [OUT] [PRETRAINED]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/nwpu-resisc45}
OUT=${2:-output/pretrained_study}
PRETRAINED=${3:-output/pretrained}
experiments/pretrain.sh "$DATA" "$PRETRAINED"
BACKBONE=$(realpath "$PRETRAINED/tuned/model_best.pth")  # chosen on val/
export BACKBONE
BUDGETS=0.185 RECIPES="diffrate anneal" experiments/search_study.sh "$DATA" "$OUT"
BUDGETS=0.145 RECIPES="diffrate anneal_lr5" experiments/search_study.sh "$DATA" "$OUT"
for pair in ${TUNE:-}; do
  budget=${pair%%:*} recipe=${pair#*:}
  BUDGETS=$budget RECIPES=$recipe TUNE_BUDGETS=$budget TUNE_RECIPE=$recipe experiments/search_study.sh "$DATA" "$OUT"
done
