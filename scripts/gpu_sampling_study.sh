#!/usr/bin/env bash
# The 8k sampling study: the science-8k model (SA-DiffuSeq: sparse attention, MoE, absorbing state) trained for a
# few minutes, then BLEU/ROUGE-L at 10/20/50/2000 steps on held-out papers under both absorbing-state re-injection
# rules (`mask`, the default, and `replace`), and the absorbing-state ablation at 2,048 tokens. One H100 call is
# capped at 10 minutes, so the study runs in stages; `train` and `replace` share the checkpoint in /tmp and must
# run on the same machine, one right after the other. Each stage writes one file, $OUT/study-$STAGE.tgz.
#   STAGE=train bash scripts/gpu_sampling_study.sh     # train 4.5 min, quality with `mask` (2 papers, all samplers)
#   STAGE=replace bash scripts/gpu_sampling_study.sh   # quality with `replace`; DPM-Solver++ on 16 papers, both rules
#   STAGE=ablation bash scripts/gpu_sampling_study.sh  # absorbing off/on at 2,048 tokens (on: sampled with both rules)
# Needs data_cache/science-8k (train) and data_cache/science-2k (ablation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STAGE=${STAGE:?set STAGE to train, replace or ablation}
work=/tmp/sampling-study-$STAGE
rm -rf "$work"; mkdir -p "$work" "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ALL="dpm++2m:10,dpm++2m:20,dpm++2m:50,ddpm:2000"
FAST="dpm++2m:10,dpm++2m:20,dpm++2m:50"
run=/tmp/run-science-8k
quality() {  # quality NAME SAMPLERS N RULE [RUN]
  python3 -m sadiffuseq bench sample "${5:-$run}" --samplers "$2" --num-examples "$3" --sample.batch_size="$3" \
      --sample.absorb_reinject="$4" --out "$work/$1" 2>&1 | tr "\r" "\n" | grep -v "^\s*$" | grep -v "it/s\]$" | tail -7
}
case "$STAGE" in
  train)
    CONFIG=science-8k MINUTES=${MINUTES:-4.5} TIMING_SAMPLERS=${TIMING_SAMPLERS:-} QUALITY_SAMPLERS= OUT=$work \
        bash scripts/gpu_train_sample.sh
    quality quality-mask "$ALL" 2 mask ;;
  replace)
    [ -d "$run" ] || { echo "no $run: run STAGE=train on this machine first"; exit 1; }
    quality quality-replace "$ALL" 2 replace
    quality quality16-mask "$FAST" 16 mask
    quality quality16-replace "$FAST" 16 replace ;;
  ablation)
    OUT=$work bash scripts/gpu_absorbing_ablation.sh
    quality absorbing-true/quality-replace dpm++2m:10 32 replace /tmp/run-absorbing-true ;;
  *) echo "unknown STAGE=$STAGE (train, replace or ablation)"; exit 2 ;;
esac
tar czf "$OUT/study-$STAGE.tgz" -C /tmp "sampling-study-$STAGE"
