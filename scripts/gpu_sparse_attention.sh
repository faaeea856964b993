#!/usr/bin/env bash
# Sparse attention on one GPU: correctness of FlexAttention (forward and backward) against the dense reference,
# the attention benchmark (dense SDPA vs permuted FlexAttention vs naive FlexAttention mask) and a full base-size
# training step at 32k tokens with dense and with sparse attention, side by side. Results go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
[ -n "${SKIP_TESTS:-}" ] || { python3 -m pytest -q -p no:cacheprovider tests/test_sparse_attention.py -k "${TESTS:-}" 2>&1 | tail -4 | tee "$OUT/tests.txt" || true; }
python3 -m sadiffuseq bench attention --lengths ${LENGTHS:-2048,8192,32768,131072} ${NO_NAIVE:+--no-naive} \
    --out "$OUT" 2>&1 | tail -8
for compile in "" ${COMPILE:+--compile}; do
  python3 -m sadiffuseq bench model --lengths 32768 --reps 5 $compile \
      --model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4] --model.window=256 --model.global_first=16 --out "$OUT" 2>&1 | tail -4
done
cat "$OUT/env.txt"
