#!/usr/bin/env bash
# Global-token schedules of the sparse attention on one GPU, in two parts that each fit a 10-minute call
# (every new FlexAttention shape costs a cold compile of ~35 s):
#   PART=kernel bash scripts/gpu_attention_schedules.sh  # GPU correctness of the split schedule (fwd+bwd
#                                                        # against dense, packed documents) + bench attention at 8k/32k/128k
#   PART=model bash scripts/gpu_attention_schedules.sh   # compiled base-size training step at 32k, dense vs sparse
#   PART=moe bash scripts/gpu_attention_schedules.sh     # bench moe at 8k/32k, eager and compiled
# env: SCHEDULES (bench attention, default inline,split), MODEL_SCHEDULE (PART=model, default split), OUT.
# Everything lands in $OUT/attention-$PART.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PART=${PART:?set PART to kernel or model}
work=/tmp/attention-$PART
rm -rf "$work"; mkdir -p "$work" "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$work/env.txt"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
case "$PART" in
  kernel)
    stamp "split schedule on the GPU: output and gradients against dense"
    python3 -m pytest -q -p no:cacheprovider tests/test_sparse_attention.py -k "gpu and split and ${TEST_CASES:-case5}" \
        2>&1 | tail -2 | tee "$work/tests.txt"
    stamp "where the split schedule's time goes (8k)"
    timeout 150 python3 scripts/gpu_split_diag.py 8192 2>&1 | grep -v -i warn | tail -34 | tee "$work/split_diag.txt"
    stamp "bench attention"
    python3 -m sadiffuseq bench attention --lengths ${LENGTHS:-8192,32768,131072} --no-naive \
        --schedules ${SCHEDULES:-inline,split} --out "$work" 2>&1 | tail -6 ;;
  model)
    stamp "bench model compiled, globals ${MODEL_SCHEDULE:-split}"
    python3 -m sadiffuseq bench model --lengths 32768 --reps 5 --compile --model.flex_globals=${MODEL_SCHEDULE:-split} \
        --model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4] --model.window=256 --model.global_first=16 \
        --out "$work" 2>&1 | tail -4 ;;
  moe)  # not attention, but short enough to share a call: the MoE layer against the dense FFN, eager and compiled
    python3 -m sadiffuseq bench moe --lengths 8192,32768 --reps 30 --out "$work/eager" 2>&1 | tail -3
    python3 -m sadiffuseq bench moe --lengths 8192,32768 --reps 30 --compile --out "$work/compiled" 2>&1 | tail -3 ;;
  *) echo "unknown PART=$PART (kernel, model or moe)"; exit 2 ;;
esac
stamp "done"
tar czf "$OUT/attention-$PART.tgz" -C /tmp "attention-$PART"
