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
python3 - "$run/metrics.jsonl" "$OUT/summary.json" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
steady = train[len(train) // 5:]  # skip start-up and compilation
s = {"steps": train[-1]["step"],
     "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in steady)),
     "target_tokens_per_s_median": round(statistics.median(r["target_tokens_per_s"] for r in steady)),
     "peak_mem_gb": max(r.get("peak_mem_gb", 0) for r in train),
     "train_loss_first_last": [train[0]["loss"], train[-1]["loss"]],
     "val_loss": [(r["step"], round(r["val_loss"], 4)) for r in val],
     "val_mse": [(r["step"], round(r["val_mse"], 4)) for r in val],
     "val_pred_ce": [(r["step"], round(r["val_pred_ce"], 3)) for r in val]}
loads = [r for r in train if any(k.startswith("moe_load_l") for k in r)]
if loads:  # expert load after warm-up (the first fifth of the logged intervals), as a fraction of the fair share
    late = loads[len(loads) // 5:]
    E = len(next(v for k, v in late[0].items() if k.startswith("moe_load_l")))
    fair = [min(v) * E for r in late for k, v in r.items() if k.startswith("moe_load_l")]
    s["moe_min_load_vs_fair_after_warmup"] = round(min(fair), 3)
    s["moe_min_load_vs_fair_last"] = round(min(min(v) * E for k, v in loads[-1].items() if k.startswith("moe_load_l")), 3)
json.dump(s, open(sys.argv[2], "w"), indent=1)
for k, v in s.items():
    print(f"{k:>34}: {v}")
PY
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
