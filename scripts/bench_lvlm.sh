#!/usr/bin/env bash
# The docs/patch.md LVLM table: FastV (in the LLM, after layer 2) and VisionZip (at the vision tower's output) at
# 50 % and 25 % of the image tokens, against the unpatched model, on a LLaVA-1.5-layout model with random weights.
#   scripts/bench_lvlm.sh                         # llava-1.5-0.5b, bf16, CPU, every core
#   ARCH=llava-1.5-7b DEVICE=cuda scripts/bench_lvlm.sh
#   ARCH=llava-small THREADS=1 REPEATS=1 scripts/bench_lvlm.sh   # a quick check that it runs
# Prints the Markdown table and writes one JSON object per configuration to ${OUT:-bench_lvlm.jsonl}.
set -euo pipefail
ARCH=${ARCH:-llava-1.5-0.5b}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-bf16}
REPEATS=${REPEATS:-3}
BATCH=${BATCH:-1}
NEW=${NEW:-16}
OUT=${OUT:-bench_lvlm.jsonl}
THREADS=${THREADS:-$(nproc)}
VLPRUNE=${VLPRUNE:-$(dirname "$0")/../.venv/bin/vlprune}
export OMP_NUM_THREADS=$THREADS
"$VLPRUNE" --threads "$THREADS" bench --hf-arch "$ARCH" --device "$DEVICE" --precision "$PRECISION" \
  --batch-size "$BATCH" --repeats "$REPEATS" --new-tokens "$NEW" --text-len 40 \
  --method fastv_llm --keep 0.5 --method fastv_llm --keep 0.25 \
  --method visionzip --keep 0.5 --method visionzip --keep 0.25 \
  --json-out "$OUT"
