#!/usr/bin/env bash
# Soft absorbing state on/off at equal training steps: SA-DiffuSeq (base size, sparse attention) on SumPubMed
# abstract -> body at 2048 tokens (data_cache/science-2k), then DPM-Solver++(2M) with 10 steps on held-out papers.
# Writes $OUT/absorbing-{false,true}/ (metrics, loss curve, summary, quality/sample.csv).
#   STEPS=1000 bash scripts/gpu_absorbing_ablation.sh
set -uo pipefail
cd "$(dirname "$0")/.."
for absorbing in false true; do
  NAME=absorbing-$absorbing CONFIG=science-2k MINUTES=${MINUTES:-4} QUALITY_SAMPLERS=dpm++2m:10 QUALITY_N=${QUALITY_N:-32} \
  OVERRIDES="--diffusion.absorbing=$absorbing --train.steps=${STEPS:-1000} --model.attention=sparse \
    --model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4] --model.window=256 --model.global_first=16 --train.compile=true \
    --train.warmup_steps=200 --train.ema_decay=0.999 --train.eval_every=250 --train.log_every=25" \
  bash scripts/gpu_train_sample.sh
done
