#!/usr/bin/env bash
# The 8k sampling study in one go: train the science-8k model (SA-DiffuSeq: sparse attention, MoE, absorbing state)
# for a few minutes, time one 8,192-token document with DPM-Solver++ 10 vs DDPM 2000, score 10/20/50/2000 steps on
# held-out papers with the absorbing-state re-injection rule `mask` (default) and `replace`, then the absorbing-state
# ablation at 2,048 tokens. Needs data_cache/science-8k and data_cache/science-2k; everything lands in
# $OUT/sampling-study.tgz (one file) plus a printed table per step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
work=/tmp/sampling-study
rm -rf "$work"; mkdir -p "$work" "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
QUALITY="dpm++2m:10,dpm++2m:20,dpm++2m:50,ddpm:2000"
CONFIG=science-8k MINUTES=${MINUTES:-4.5} TIMING_SAMPLERS=dpm++2m:10,ddpm:2000 QUALITY_SAMPLERS=$QUALITY \
    QUALITY_N=${QUALITY_N:-2} OUT=$work bash scripts/gpu_train_sample.sh
python3 -m sadiffuseq bench sample /tmp/run-science-8k --samplers "$QUALITY" --num-examples ${QUALITY_N:-2} \
    --sample.batch_size=${QUALITY_N:-2} --sample.absorb_reinject=replace --out "$work/science-8k/quality-replace" \
    2>&1 | tr "\r" "\n" | grep -v "^\s*$" | grep -v "it/s\]$" | tail -6
[ -n "${SKIP_ABLATION:-}" ] || OUT=$work bash scripts/gpu_absorbing_ablation.sh
tar czf "$OUT/sampling-study.tgz" -C /tmp sampling-study
