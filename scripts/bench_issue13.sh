#!/usr/bin/env bash
# Every table of the "Speed at the FLOPs ideal" section of docs/benchmarks.md, in one go.
#
#   scripts/bench_issue13.sh [--quick] [--out DIR] [--device cuda] [--only NAME,NAME]
#
# Full mode (CPU): albef-base at 384 px, batch 32, 5 interleaved rounds; training at batch 8. Run it on an idle
# machine. --quick: the same tables at batch 2 (training: the `small` preset, batch 4), 2 rounds, compile rows on
# `small`: a smoke run whose numbers are noisy. --device cuda: the GPU tables (batch 64, bf16 rows included).
# Each table goes to DIR/NAME.txt (the table), DIR/NAME.jsonl (one JSON row per method) and DIR/NAME.log
# (progress); DIR/env.txt records the machine, and DIR/timings.txt how long each table took. --only runs the named
# tables (profile, inference_fp32, inference_fp32_allcores, inference_bf16, inference_compile, train_pretrain,
# train_vqa, train_vqa_bf16).
set -euo pipefail

QUICK=0
OUT=bench_issue13
DEVICE=cpu
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --out) OUT="$2"; shift ;;
        --device) DEVICE="$2"; shift ;;
        --only) ONLY=",$2,"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "bench_issue13.sh: unknown argument '$1' (allowed: --quick, --out DIR, --device cpu|cuda, --only NAMES)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
VL=${VLPRUNE:-.venv/bin/vlprune}
PY=${PYTHON:-.venv/bin/python}
CORES=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))")

METHODS=(--method none --method trips --method elip --method elip --option lookahead=false --method evit
         --method tome --method random --method lowres)
PROFILE_METHODS=(--method none --method trips --method elip --method elip --option lookahead=false --method evit
                 --method tome)
TRAIN_METHODS=(--method none --method trips --method elip --option lookahead=false --method evit --method tome
               --method random)
if [ "$DEVICE" = cuda ]; then
    BATCH=64; REPEATS=10; PBATCH=8; TMODEL=albef-base; TBATCH=32; TREPEATS=10; CMODEL=albef-base
    THREADS=(--threads "$CORES")
elif [ "$QUICK" = 1 ]; then
    BATCH=2; REPEATS=2; PBATCH=2; TMODEL=small; TBATCH=4; TREPEATS=2; CMODEL=small; THREADS=(--threads 1)
else
    BATCH=32; REPEATS=5; PBATCH=8; TMODEL=albef-base; TBATCH=8; TREPEATS=3; CMODEL=albef-base; THREADS=(--threads 1)
fi

mkdir -p "$OUT"
if [ -z "$ONLY" ]; then : > "$OUT/env.txt"; : > "$OUT/timings.txt"; fi  # --only adds to an earlier run's files
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "mode: $([ "$QUICK" = 1 ] && echo quick || echo full), device $DEVICE"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "cores available: $CORES"
    echo "load average at start: $(cat /proc/loadavg)"
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} MKL_NUM_THREADS=${MKL_NUM_THREADS:-unset}"
} >> "$OUT/env.txt"

table() {  # table NAME ARGS...: one vlprune bench run
    local name=$1; shift
    if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
    echo "== $name: vlprune $*" | tee -a "$OUT/timings.txt"
    local t0=$SECONDS
    local status=ok
    "$VL" "$@" --json-out "$OUT/$name.jsonl" > "$OUT/$name.txt" 2> "$OUT/$name.log" || status="FAILED (see $OUT/$name.log)"
    echo "   $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg), $status" | tee -a "$OUT/timings.txt"
}

BASE=(--model albef-base --image-size 384 --text-len 40 --device "$DEVICE")

# 1. where the time goes: per-op profiles, one thread (shares are meaningful on a loaded machine too)
table profile --threads 1 bench --profile "${BASE[@]}" --batch-size "$PBATCH" "${PROFILE_METHODS[@]}" --profile-top 20 --profile-rounds 2

# 2. inference, fp32, every method + the plain-PyTorch reference, one interleaved run
table inference_fp32 "${THREADS[@]}" bench "${BASE[@]}" --batch-size "$BATCH" --repeats "$REPEATS" --reference "${METHODS[@]}"

# 3. inference with all the cores (CPU: the thread count's effect on the ratios)
if [ "$DEVICE" = cpu ] && [ "$CORES" -gt 1 ]; then
    table inference_fp32_allcores --threads "$CORES" bench "${BASE[@]}" --batch-size "$BATCH" --repeats "$REPEATS" "${METHODS[@]}"
fi

# 4. inference, bf16 autocast
table inference_bf16 "${THREADS[@]}" --precision bf16 bench "${BASE[@]}" --batch-size "$BATCH" --repeats "$REPEATS" "${METHODS[@]}"

# 5. inference, torch.compile (compile time per method in the table)
# the small preset's max_len is 32: 30 text tokens there
CSIZE=$([ "$CMODEL" = albef-base ] && echo "--image-size 384 --text-len 40" || echo "--text-len 30")
table inference_compile "${THREADS[@]}" --compile bench --model "$CMODEL" --device "$DEVICE" $CSIZE --batch-size "$BATCH" --repeats "$REPEATS" \
    --method none --method trips --method evit --method tome

# 6. training: pre-training at 256 px and VQA fine-tuning at 384 px, with the slot-overhead reference
TRAIN_SIZE_PRE=$([ "$TMODEL" = albef-base ] && echo "--image-size 256 --text-len 40" || echo "--text-len 30")
TRAIN_SIZE_VQA=$([ "$TMODEL" = albef-base ] && echo "--image-size 384 --text-len 40" || echo "--text-len 30")
table train_pretrain "${THREADS[@]}" bench --train --train-task pretrain --model "$TMODEL" $TRAIN_SIZE_PRE \
    --device "$DEVICE" --batch-size "$TBATCH" --repeats "$TREPEATS" --reference "${TRAIN_METHODS[@]}"
table train_vqa "${THREADS[@]}" bench --train --train-task vqa --model "$TMODEL" $TRAIN_SIZE_VQA \
    --device "$DEVICE" --batch-size "$TBATCH" --repeats "$TREPEATS" --reference "${TRAIN_METHODS[@]}"

# 7. training in bf16 (VQA fine-tuning)
table train_vqa_bf16 "${THREADS[@]}" --precision bf16 bench --train --train-task vqa --model "$TMODEL" $TRAIN_SIZE_VQA \
    --device "$DEVICE" --batch-size "$TBATCH" --repeats "$TREPEATS" "${TRAIN_METHODS[@]}"

echo "load average at the end: $(cat /proc/loadavg)" >> "$OUT/env.txt"
echo "tables in $OUT/ (total $SECONDS s)" | tee -a "$OUT/timings.txt"
