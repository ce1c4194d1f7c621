#!/usr/bin/env bash
# MAGE-FT of the shipped model on one GPU, before and after, in one go (issue 15's evidence at
# 4K-8K; the CPU runs h-k of finetune/README.md stop at 2K):
#   1. evaluate the shipped model (stage "before"),
#   2. fine-tune it twice from the same start, 200 steps each: "base3" (lambda 3, the frozen base
#      model as teacher) and "control" (lambda 0: the sparse student's block-diffusion CE only),
#   3. evaluate both results (stage "after") on the same grid.
# fp32 throughout (training and evaluation), so merged LoRA weights are not rounded to bf16.
# Writes under $OUT: before.json, after_base3.json, after_control.json (mage_ext.eval files;
# join with python -m mage_ext.eval.stages), log_base3.jsonl, log_control.jsonl, grid.log and
# adapters.tar (both LoRA adapters with their configs: re-evaluate with --model DIR/adapter).
#   OUT=/tmp/grid bash finetune/tiny_gpu_grid.sh    # GPU; SEQ K STEPS LR LENGTHS SAMPLES SEEDS override
#   OUT=/tmp/g DEVICE=cpu SEQ=256 K=16 STEPS=2 LENGTHS=256 SAMPLES=1 SEEDS=0 bash finetune/tiny_gpu_grid.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mage-ft-grid}
WORK=${WORK:-/tmp/mage-ft-grid-runs}
SEQ=${SEQ:-8192} K=${K:-512} STEPS=${STEPS:-200} LR=${LR:-2e-4} DEVICE=${DEVICE:-cuda}
LENGTHS=${LENGTHS:-4096,8192} SAMPLES=${SAMPLES:-2} SEEDS=${SEEDS:-0,1}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
EVAL=(--tasks niah_multivalue,niah_multikey_16 --lengths "$LENGTHS" --samples "$SAMPLES"
      --methods exact,mage,random,recent --ks 64,512 --dense-layers 0,2 --seeds "$SEEDS"
      --batch-size 20 --device "$DEVICE" --dtype float32)
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/grid.log"; }

log "before: eval"
python3 -m mage_ext.eval --model mage_ext/assets/tiny_bd "${EVAL[@]}" --stage before \
  --note "shipped model; tiny_gpu_grid.sh" --out "$OUT/before.json" >>"$OUT/grid.log" 2>&1 \
  || log "before eval FAILED"

for spec in base3:3:base control:0:model; do
  IFS=: read -r name lam teacher <<<"$spec"
  dir=$WORK/$name
  rm -rf "$dir"
  python3 - "$dir" "$lam" "$teacher" <<EOF
import json, sys
from mage_ext.train.config import FTConfig
cfg = FTConfig(model="", output_dir="", data={}).to_json()
cfg.update(model="mage_ext/assets/tiny_bd", output_dir=sys.argv[1], seq_len=$SEQ, steps=$STEPS,
           mode="lora", lr=$LR, k=$K, dense_layers=0, precision="fp32", device="$DEVICE",
           save_every=50, log_every=1, recall_every=10, progress=False, seed=0,
           teacher=sys.argv[3], warmup_steps=5, betas=[0.9, 0.95], weight_decay=0.0)
cfg["lambda"] = float(sys.argv[2])
cfg["data"] = {"jsonl": None, "packing": True, "answer_weight": 1.0,
               "synthetic": {"niah_multivalue": 1, "niah_multikey": 1, "niah_single": 1,
                             "passkey": 1, "filler": 1}}
cfg["lora"].update(r=16, alpha=32, dropout=0.0)
json.dump(cfg, open(sys.argv[1] + ".config.json", "w"), indent=1)
EOF
  log "$name: train (lambda $lam, teacher $teacher, seq $SEQ, k $K, $STEPS steps, lr $LR)"
  python3 -m mage_ext.finetune --config "$dir.config.json" >>"$OUT/grid.log" 2>&1 \
    || { log "$name: training FAILED"; continue; }
  cp "$dir/log.jsonl" "$OUT/log_$name.jsonl"
  tar -C "$WORK" -rf "$OUT/adapters.tar" "$name/adapter" "$name.config.json"   # small: LoRA only
  log "$name: eval"
  python3 -m mage_ext.eval --model "$dir/adapter" "${EVAL[@]}" --stage after --steps "$STEPS" \
    --lambda "$lam" --note "$name: teacher $teacher, seq $SEQ, k $K, lr $LR; tiny_gpu_grid.sh" \
    --out "$OUT/after_$name.json" >>"$OUT/grid.log" 2>&1 || log "$name: eval FAILED"
done
log "done"
