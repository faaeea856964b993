#!/usr/bin/env bash
# Train a preset on one GPU for a few minutes, summarise the run, then time and score sampling with the trained
# weights. Everything lands in $OUT/$NAME: metrics.jsonl, loss.png (and expert_load.png with MoE), summary.json,
# timing/ (one document, batch 1: seconds per document per sampler) and quality/ (BLEU/ROUGE-L per sampler).
#   CONFIG=science-8k MINUTES=5 bash scripts/gpu_train_sample.sh
# env: CONFIG (preset or YAML), NAME (default CONFIG), MINUTES (training wall time), OVERRIDES (more
# --section.key=value), TIMING_SAMPLERS / QUALITY_SAMPLERS (sampler:steps lists; empty skips), QUALITY_N
# (documents for the quality sweep, one batch), OUT (default gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:?set CONFIG to a preset, e.g. science-8k}
NAME=${NAME:-$CONFIG}
OUT=${OUT:-gpu_out}/$NAME
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
run=/tmp/run-$NAME
rm -rf "$run"
start=$(date +%s)
python3 -m sadiffuseq train --config "$CONFIG" --train.out_dir=$run --train.time_limit_min=${MINUTES:-5} \
    --train.save_every=1000000 ${OVERRIDES:-} 2>&1 | tr "\r" "\n" | grep -v "^\s*$" | grep -v "it/s\]$" | tail -8
echo "train wall time: $(( $(date +%s) - start )) s"
cp $run/metrics.jsonl $run/*.png $run/config.yaml "$OUT"/
python3 scripts/summarize_run.py "$run/metrics.jsonl" "$OUT/summary.json"
if [ -n "${TIMING_SAMPLERS:-}" ]; then
  python3 -m sadiffuseq bench sample $run --samplers "$TIMING_SAMPLERS" --num-examples 1 --sample.batch_size=1 \
      --out "$OUT/timing" ${LENGTH:+--length $LENGTH} 2>&1 | tr "\r" "\n" | grep -v "^\s*$" | grep -v "it/s\]$" | tail -6
fi
if [ -n "${QUALITY_SAMPLERS:-}" ]; then
  python3 -m sadiffuseq bench sample $run --samplers "$QUALITY_SAMPLERS" --num-examples ${QUALITY_N:-4} \
      --sample.batch_size=${QUALITY_N:-4} --out "$OUT/quality" ${LENGTH:+--length $LENGTH} 2>&1 | tr "\r" "\n" \
      | grep -v "^\s*$" | grep -v "it/s\]$" | tail -8
fi
echo "total wall time: $(( $(date +%s) - start )) s"
