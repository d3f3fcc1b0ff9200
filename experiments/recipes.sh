# Shared by the experiment scripts, sourced with their arguments (`source experiments/recipes.sh
# "$@"` from the repository root): DATA ($1) and OUT ($2, created) as absolute paths, PY, the model,
# the search and fine-tuning recipes, and a pool of workers over restartable jobs.
DATA=$(realpath "${1:-../shared/datasets/nwpu-resisc45}")
mkdir -p "${2:-output/offtheshelf}"
OUT=$(realpath "${2:-output/offtheshelf}")
PY=${PY:-$PWD/.venv/bin/python}
export OMP_NUM_THREADS=1  # two jobs share the 2 cores; default threads oversubscribe them
# DeiT-Tiny at 112 px; `variant` adds the EAB / FTF switches
BASE=(--data-path "$DATA" --model sdt2net_tiny_patch16_224 --input-size 112 --batch-size 64 --num_workers 1
      --print-freq 50)
# the frozen backbone of the searches; BACKBONE=PATH starts from another (experiments/pretrain.sh's)
BACKBONE=${BACKBONE:-$OUT/backbone/checkpoint.pth}
# The search: 3 epochs of rate-only steps on the training images without RandAugment, erasing or
# mixup (the frozen model is judged on images like those it will see); lambda scaled to the model:
# DiffRate's 5 for DeiT-S at 224 px (4.6 GFLOPs) times (4.6 / 0.285)^2 gives the same pull on a
# relative FLOPs error.
SEARCH=(--search-mode arch --epochs 3 --arch-lr 0.05 --arch-min-lr 0.01 --flops-lambda 1300 --aa none
        --reprob 0 --mixup 0 --cutmix 0 --warmup-epochs 0)
# DiffRate's search recipe: DeiT's augmentation, drop-path 0.1, arch lr 0.01 -> 0.001; batch 16
# for four times the rate steps of batch 64 (788 in 4 epochs), the most this CPU allows per search.
DIFFRATE=(--search-mode arch --finetune "$BACKBONE" --flops-lambda 1300 --warmup-epochs 0 --batch-size 16
          --epochs 4 --arch-lr 0.01 --arch-min-lr 0.001 --aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 --reprob 0.25
          --mixup 0.8 --cutmix 1.0 --drop-path 0.1)
recipe() {  # the search flags of a recipe
  case $1 in
    diffrate) echo "${DIFFRATE[@]}" ;;
    # every stage starts at its own count (the geometric schedule at 90% of the dense FLOPs) and
    # the budget slides to the target over the first two epochs
    anneal) echo "${DIFFRATE[@]}" --search-start geometric --search-start-flops 0.257 --anneal-epochs 2 ;;
    # the same with four times the budget's weight: the squared penalty's pull, 2 lambda (F - target),
    # vanishes near the target, and at 0.145 the anneal recipe settled 12% above it
    anneal4x) echo "$(recipe anneal)" --flops-lambda 5200 ;;
    # the budget at the target after one epoch instead of two: Adam moves the rates by about the
    # learning rate per step whatever lambda is, so the anneal recipe's lag is a matter of steps
    anneal1) echo "${DIFFRATE[@]}" --search-start geometric --search-start-flops 0.257 --anneal-epochs 1 ;;
    # the anneal recipe at five times DiffRate's arch learning rate (0.05 -> 0.005): a start peaked at
    # one count per stage needs logit changes of several units to move a count, which at about lr
    # per Adam step takes more steps than the search has (anneal, anneal4x, anneal1 all lag)
    anneal_lr5) echo "$(recipe anneal)" --arch-lr 0.05 --arch-min-lr 0.005 ;;
    *) echo "unknown recipe $1" >&2; return 1 ;;
  esac
}

# Fine-tuning: DiffRate's recipe (lr 2e-5 after batch scaling: --lr is for a total batch of 512 and
# scaled by 64 / 512 here; min lr 1e-6, no warm-up; drop-path 0 as DiffRate uses for Tiny) with the
# backbone's augmentation, for EPOCHS epochs (CPU budget).
TUNE=(--epochs "${EPOCHS:-5}" --lr 1.6e-4 --min-lr 1e-6 --warmup-epochs 0 --drop-path 0.0 --mixup 0 --cutmix 0)

variant() {  # the flags of a model variant: deit (EAB and FTF off), eab, ftf, both
  case $1 in deit) echo --no-eab --no-ftf ;; eab) echo --no-ftf ;; ftf) echo --no-eab ;; both) ;;
    *) echo "unknown variant $1" >&2; return 1 ;; esac
}

test_eval() {  # checkpoint, output folder, log, variant: top-1 on test/ (skipped once done)
  local model
  read -r -a model <<< "$(variant "$4")"
  [[ -f "$2/eval_metrics.json" ]] || "$PY" main.py "${BASE[@]}" "${model[@]}" --eval --eval-split test \
    --resume "$1" --throughput-batch 0 --output_dir "$2" >> "$3" 2>&1
}

tune_and_test() {  # folder, seed, variant, flags...: fine-tune, then evaluate the last checkpoint on test/
  local dir=$1 seed=$2 row=$3 model; shift 3
  read -r -a model <<< "$(variant "$row")"
  if [[ ! -f "$dir/done" ]]; then
    "$PY" main.py "${BASE[@]}" "${model[@]}" "${TUNE[@]}" --seed "$seed" --output_dir "$dir" --autoresume "$@" \
      > "$dir.log" 2>&1
    touch "$dir/done"
  fi
  test_eval "$dir/checkpoint.pth" "$dir/eval" "$dir.eval.log" "$row"
}

run_pool() {  # lock folder, job command lines...: SLOTS workers (default 2) take the jobs in order
  local locks=$1; shift
  local jobs=("$@")
  rm -rf "$locks" && mkdir -p "$locks"  # a killed run's claims
  worker() {  # takes the next job nobody has started (mkdir is the lock)
    local i
    for i in "${!jobs[@]}"; do
      mkdir "$locks/$i" 2>/dev/null || continue
      ${jobs[$i]}
    done
  }
  local pids=() failed=0 pid
  for _ in $(seq "${SLOTS:-2}"); do worker & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done  # a failed job stops its worker
  rm -rf "$locks"
  return $failed
}
