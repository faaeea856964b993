#!/usr/bin/env bash
# Kernel-level GPU benchmarks in one go: the sparse attention core against dense SDPA (every global-token
# schedule), the per-variant breakdown at 32k, a compiled base-size training step at 32k (dense vs sparse, for each
# schedule in $SCHEDULES, default inline and split) and the MoE layer against a dense FFN of the same active FLOPs.
# Results (CSV, PNG, logs) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
stamp "flex tests"
python3 -m pytest -q -p no:cacheprovider tests/test_sparse_attention.py -k "gpu" 2>&1 | tail -2 | tee "$OUT/tests.txt"
stamp "bench attention"
python3 -m sadiffuseq bench attention --lengths ${LENGTHS:-8192,32768,131072} --no-naive --out "$OUT/attention" 2>&1 | tail -5
stamp "bench moe"
python3 -m sadiffuseq bench moe --lengths 8192,32768 --out "$OUT/moe" 2>&1 | tail -4
for schedule in ${SCHEDULES:-inline split}; do
  stamp "bench model compiled, globals $schedule"
  python3 -m sadiffuseq bench model --lengths 32768 --reps 5 --compile --model.flex_globals=$schedule \
      --model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4] --model.window=256 --model.global_first=16 \
      --out "$OUT/model-globals-$schedule" 2>&1 | tail -3
done
stamp "flex diag"
timeout ${DIAG_TIMEOUT:-200} python3 scripts/gpu_flex_diag.py 32768 ${AUTOTUNE:+--autotune} 2>&1 | tail -12 | tee "$OUT/diag.txt"
stamp "done"
