#!/usr/bin/env bash
# Base-size dense DiffuSeq (12 layers, width 768, d_emb 128) on SumPubMed abstract -> full text, rows of 2048
# tokens, trained for a few minutes on one GPU; then a short generation check with the trained weights.
# Expects the tokenised folder data_cache/science-2k (built with `sadiffuseq data --config science-2k`) and
# writes metrics.jsonl, loss.png, samples.jsonl and summary.json into $OUT (or ./gpu_out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-3000}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
run=/tmp/base-dense
rm -rf "$run"
start=$(date +%s)
python3 -m sadiffuseq train --config science-2k --train.out_dir=$run --train.steps=$STEPS --train.time_limit_min=${MINUTES:-5} \
    --train.save_every=100000 2>&1 | tr "\r" "\n" | grep -v "^\s*$"
echo "train wall time: $(( $(date +%s) - start )) s"
cp $run/metrics.jsonl $run/loss.png $run/config.yaml "$OUT"/
python3 -m sadiffuseq sample $run --sample.num_examples=8 --sample.batch_size=8 --sample.steps=100 \
    --sample.sampler=ddim --out "$OUT"/samples.jsonl 2>&1 | tr '\r' '\n' | grep -v 'it/s\]$'
python3 - "$run/metrics.jsonl" "$OUT/summary.json" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
steady = train[len(train) // 5:]  # skip start-up and compilation of the first fifth
summary = {
    "steps": train[-1]["step"],
    "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
    "target_tokens_per_s_median": statistics.median(r["target_tokens_per_s"] for r in steady),
    "peak_mem_gb": max(r.get("peak_mem_gb", 0) for r in train),
    "train_loss_first": train[0]["loss"], "train_loss_last": train[-1]["loss"],
    "val_loss": [(r["step"], round(r["val_loss"], 4)) for r in val],
    "val_pred_ce": [(r["step"], round(r["val_pred_ce"], 4)) for r in val],
}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
for k, v in summary.items():
    print(f"{k:>28}: {v}")
PY
