#!/usr/bin/env bash
# The docs/patch.md LVLM table: FastV (in the LLM, after layer 2), SparseVLM (in the LLM, layers 3, 7, 16) and
# VisionZip (at the vision tower's output) at 50 % and 25 % of the image tokens, against the unpatched model, on a
# LLaVA-1.5-layout model with random weights: image tokens kept, prefill GFLOPs and latency, speed-up against the
# FLOPs-ideal one, decode tokens/s, KV-cache size.
#   scripts/bench_lvlm.sh                         # llava-1.5-0.5b, bf16, CPU, every core
#   scripts/bench_lvlm.sh --quick                 # about a minute: llava-small, 1 round, 4 new tokens
#   ARCH=llava-1.5-7b DEVICE=cuda scripts/bench_lvlm.sh
# Prints the Markdown table (the command line under it) and writes one JSON object per configuration to
# ${OUT:-bench_lvlm.jsonl}. Environment: ARCH DEVICE PRECISION REPEATS BATCH NEW THREADS OUT VLPRUNE.
set -euo pipefail
QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bench_lvlm.sh: unknown argument '$a' (valid: --quick, --help)" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  ARCH=${ARCH:-llava-small}; REPEATS=${REPEATS:-1}; NEW=${NEW:-4}; THREADS=${THREADS:-1}
fi
ARCH=${ARCH:-llava-1.5-0.5b}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-bf16}
REPEATS=${REPEATS:-3}
BATCH=${BATCH:-1}
NEW=${NEW:-16}
OUT=${OUT:-bench_lvlm.jsonl}
THREADS=${THREADS:-$(nproc)}
VLPRUNE=${VLPRUNE:-$(dirname "$0")/../.venv/bin/vlprune}
# SparseVLM's official layers 3, 7, 16 need 16 decoder layers; llava-small has 4: use 1, 2, 3 there
SPARSE_LAYERS=()
if [ "$ARCH" = llava-small ]; then SPARSE_LAYERS=(--layers 1,2,3); fi
export OMP_NUM_THREADS=$THREADS
"$VLPRUNE" --threads "$THREADS" bench --hf-arch "$ARCH" --device "$DEVICE" --precision "$PRECISION" \
  --batch-size "$BATCH" --repeats "$REPEATS" --new-tokens "$NEW" --text-len 40 \
  --method fastv_llm --keep 0.5 --method fastv_llm --keep 0.25 \
  --method sparsevlm "${SPARSE_LAYERS[@]}" --keep 0.5 --method sparsevlm "${SPARSE_LAYERS[@]}" --keep 0.25 \
  --method visionzip --keep 0.5 --method visionzip --keep 0.25 \
  --json-out "$OUT"
echo
echo "(command: ARCH=$ARCH DEVICE=$DEVICE PRECISION=$PRECISION REPEATS=$REPEATS BATCH=$BATCH NEW=$NEW THREADS=$THREADS scripts/bench_lvlm.sh$([ "$QUICK" = 1 ] && echo ' --quick'))"
