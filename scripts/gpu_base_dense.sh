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
python3 scripts/summarize_run.py "$run/metrics.jsonl" "$OUT/summary.json"
