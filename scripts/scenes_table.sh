#!/usr/bin/env bash
# Accuracy vs cost on the built-in scenes data (small preset): pre-train once (or reuse a run), fine-tune VQA and
# retrieval once WITHOUT a method, then evaluate both with none / trips / elip / evit / tome / random applied at
# inference. Writes OUT/table.md and OUT/results.jsonl; every command it runs is echoed.
#
#   scripts/scenes_table.sh [OUT]                       # default OUT=runs/scenes-table
#   PRETRAIN=runs/pt scripts/scenes_table.sh            # reuse a pre-training run (its data/ and tokenizer)
#
# Knobs (environment): PRETRAIN, PT_STEPS (600), VQA_STEPS (90), RET_STEPS (60), BATCH (32), LR (1e-3),
# K (8: ITM re-ranking candidates), RET_IMAGES (50: retrieval test images used), SCENES_IMAGES (2000),
# VLPRUNE (the vlprune command), PYTHON. Raise the fine-tuning steps for a more meaningful comparison.
# Schedules for the 6-layer small ViT: TRIPS / EViT / random keep 0.7 at layers 3 and 5; ToMe merges r = 18 at
# layer 3 and 12 at layer 5: the same token counts as TRIPS / EViT (65 -> 47 -> 35, incl. [CLS] and the fused token;
# random, which fuses nothing, ends at 33); ELIP uses its
# default schedule scaled to the depth (block starts 2, 4, 5; keep 0.9, 0.65, 0.4 of the patches).
set -euo pipefail
OUT=${1:-runs/scenes-table}
VL=${VLPRUNE:-vlprune}
PY=${PYTHON:-python}
PT_STEPS=${PT_STEPS:-600}; VQA_STEPS=${VQA_STEPS:-90}; RET_STEPS=${RET_STEPS:-60}
BATCH=${BATCH:-32}; LR=${LR:-1e-3}; K=${K:-8}; RET_IMAGES=${RET_IMAGES:-50}; SCENES_IMAGES=${SCENES_IMAGES:-2000}
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$@"; }

PT=${PRETRAIN:-$OUT/pt}
if [ ! -f "$PT/model/config.json" ]; then
  # the from-scratch recipe of README's "Pre-training" section
  run $VL train pretrain --model small --scenes-images "$SCENES_IMAGES" --steps "$PT_STEPS" --batch-size 32 \
      --lr 3e-4 --loss mlm=0.3 --out "$PT" --overwrite --quiet
fi
DATA=$PT/data
[ -f "$OUT/vqa/model/config.json" ] || run $VL train vqa --init "$PT" --train "$DATA/vqa_train.json" --images "$DATA" \
    --answers "$DATA/answer_list.json" --steps "$VQA_STEPS" --batch-size "$BATCH" --lr "$LR" --out "$OUT/vqa" --overwrite --quiet
[ -f "$OUT/retrieval/model/config.json" ] || run $VL train retrieval --init "$PT" --train "$DATA/retrieval_train.json" \
    --images "$DATA" --steps "$RET_STEPS" --batch-size "$BATCH" --lr "$LR" --out "$OUT/retrieval" --overwrite --quiet
# the first RET_IMAGES test images (all their captions): the two-stage re-ranking costs k ITM passes per query
$PY -c "import json,sys; d=json.load(open(sys.argv[1])); json.dump(d[:int(sys.argv[3])], open(sys.argv[2], 'w'))" \
    "$DATA/retrieval_test.json" "$OUT/retrieval_test_subset.json" "$RET_IMAGES"

declare -A M=(
  [none]="--method none"
  [trips]="--method trips --layers 3,5 --keep 0.7"
  [elip]="--method elip"
  [evit]="--method evit --layers 3,5 --keep 0.7"
  [tome]="--method tome --layers 3,5 --option r=[18,12]"
  [random]="--method random --layers 3,5 --keep 0.7"
)
: > "$OUT/results.jsonl"
for name in none trips elip evit tome random; do
  v=$(run $VL eval vqa --checkpoint "$OUT/vqa" --test "$DATA/vqa_test.json" --images "$DATA" ${M[$name]} --json --quiet | tail -n 1)
  r=$(run $VL eval retrieval --checkpoint "$OUT/retrieval" --test "$OUT/retrieval_test_subset.json" --images "$DATA" \
      --k "$K" ${M[$name]} --json --quiet | tail -n 1)
  echo "{\"name\": \"$name\", \"vqa\": $v, \"retrieval\": $r}" >> "$OUT/results.jsonl"
done
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
lines = ["| method | VQA acc | VQA GFLOPs | retrieval r_mean | ITC-stage r_mean | retrieval GFLOPs | image tokens |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    v, t = r["vqa"], r["retrieval"]
    lines.append(f"| {r['name']} | {v['accuracy']:.2f} | {v['gflops']:.4f} | {t['r_mean']:.2f} | "
                 f"{t.get('itc_r_mean', float('nan')):.2f} | {t['gflops']:.4f} | {v['image_tokens']:.1f} |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
