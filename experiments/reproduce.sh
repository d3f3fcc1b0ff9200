#!/usr/bin/env bash
# Every experiment of the README's results, in order, then their tables and figures: the backbone
# and the off-the-shelf comparison (with the search before the gradient fix, the dense-start and
# the 15-epoch searches), the fine-tuning, SDT2Net's ablation. Each stage is restartable (a
# finished run is skipped), so an interrupted run continues where it stopped. About 3.5 hours on the
# 2-core CPU box (two jobs side by side, one thread each): backbone 50 min, searches and evaluations
# 30 min, fine-tuning 40 min, ablation 90 min.
# Usage: experiments/reproduce.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/nwpu-resisc45}
OUT=${2:-output/offtheshelf}
BEFORE=1 DENSE_START=1 LONG=0.115 experiments/offtheshelf.sh "$DATA" "$OUT"
experiments/finetune.sh "$DATA" "$OUT"
experiments/ablation.sh "$DATA" "$OUT"
PY=${PY:-.venv/bin/python}
"$PY" experiments/offtheshelf_report.py "$OUT" --write-schedules
"$PY" experiments/ablation_report.py "$OUT" --throughput
