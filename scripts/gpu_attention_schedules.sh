#!/usr/bin/env bash
# The sparse attention on one GPU, in parts that each fit a 10-minute call (every new FlexAttention shape costs a
# cold compile of ~35 s):
#   PART=kernel bash scripts/gpu_attention_schedules.sh  # GPU correctness (fwd+bwd against dense, packed documents,
#                                                        # no recompiles for new documents) + bench attention
#   PART=modes bash scripts/gpu_attention_schedules.sh   # bench attention under other model.flex_compile modes
#   PART=diag bash scripts/gpu_attention_schedules.sh    # scripts/gpu_attention_diag.py at $DIAG_LENGTH (32768)
#   PART=model bash scripts/gpu_attention_schedules.sh   # compiled base-size training step at 32k, dense vs sparse
#   PART=moe bash scripts/gpu_attention_schedules.sh     # bench moe at 8k/32k, eager and compiled
#   PART=flash bash scripts/gpu_attention_schedules.sh   # the flash backend: GPU tests, bench attention, model steps
# env: TESTS (pytest -k expression), LENGTHS, SCHEDULES (bench attention, default inline,split), DIAG_LENGTH,
# DIAG_FLAGS (e.g. "--autotune --cudagraphs"), MODEL_SCHEDULE (PART=model, default auto), MOE_MODES and
# PROFILE_TOKENS (PART=moe), OUT. Everything lands in $OUT/attention-$PART.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PART=${PART:?set PART to kernel, modes, diag, model or moe}
work=$OUT/$PART
mkdir -p "$work"
T=${STAGE_TIMEOUT:-560}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$work/env.txt"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
case "$PART" in
  kernel)
    stamp "flex backend on the GPU: output and gradients against dense; no recompiles for new documents"
    python3 -m pytest -q -p no:cacheprovider tests/test_sparse_attention.py -k "${TESTS:-gpu and (case5 or case1 or recompile)}" \
        2>&1 | tail -3 | tee "$work/tests.txt"
    stamp "bench attention"
    python3 -m sadiffuseq bench attention --lengths ${LENGTHS:-8192,32768,131072} --no-naive \
        --schedules ${SCHEDULES:-inline,split} --out "$work" 2>&1 | tail -6 ;;
  modes)  # torch.compile modes of the attention region (model.flex_compile): CUDA graphs where launches dominate
          # (8k), autotuned kernels where the GPU does (32k, 128k). Full logs (autotune choices) in $work.
    stamp "CUDA graphs at ${SHORT:-8192}"
    timeout $T python3 -m sadiffuseq bench attention --lengths ${SHORT:-8192} --no-naive --flex-compile reduce-overhead \
        --schedules inline,split --out "$work/cudagraphs" > "$work/cudagraphs.log" 2>&1; tail -3 "$work/cudagraphs.log"
    stamp "autotuned at ${LONG:-32768,131072}"
    timeout $T python3 -m sadiffuseq bench attention --lengths ${LONG:-32768,131072} --no-naive \
        --flex-compile max-autotune-no-cudagraphs --schedules split --out "$work/autotune" > "$work/autotune.log" 2>&1
    tail -4 "$work/autotune.log" ;;
  diag)
    timeout ${DIAG_TIMEOUT:-500} python3 scripts/gpu_attention_diag.py ${DIAG_LENGTH:-32768} ${DIAG_FLAGS:-} 2>&1 \
        > "$work/diag-${DIAG_LENGTH:-32768}.txt" 2>&1; grep -E "^(L=|variant|dense|window|band|whole)" "$work/diag-${DIAG_LENGTH:-32768}.txt" ;;
  model)
    stamp "bench model compiled, globals ${MODEL_SCHEDULE:-auto}"
    timeout $T python3 -m sadiffuseq bench model --lengths 32768 --reps 5 --compile \
        --model.flex_globals=${MODEL_SCHEDULE:-auto} --model.flex_compile=${MODEL_COMPILE:-default} \
        --model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4] --model.window=256 --model.global_first=16 \
        --out "$work" > "$work/model.log" 2>&1; tail -4 "$work/model.log" ;;
  moe)  # not attention, but short enough to share a call: the MoE layer against the dense FFN, eager and compiled
    timeout $T python3 -m sadiffuseq bench moe --lengths 8192,32768 --reps 30 --out "$work/eager" 2>&1 | tail -3
    for mode in ${MOE_MODES:-default}; do  # torch.compile modes of both layers, e.g. "default reduce-overhead"
      timeout $T python3 -m sadiffuseq bench moe --lengths 8192,32768 --reps 30 --compile $mode --out "$work/$mode" \
          > "$work/$mode.log" 2>&1; tail -3 "$work/$mode.log"
    done
    for n in ${PROFILE_TOKENS:-}; do  # kernel tables of the compiled layers, e.g. PROFILE_TOKENS="8192 32768"
      timeout $T python3 scripts/gpu_moe_profile.py $n --compile default > "$work/profile-$n.txt" 2>&1
      grep "GPU time per step" "$work/profile-$n.txt"
    done ;;
  flash)  # the flash backend: GPU correctness, bench attention (flash only unless BACKENDS), model steps
    stamp "flash backend on the GPU: output and gradients against dense; compiled model against eager"
    python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py tests/test_model.py -k "gpu and flash" \
        2>&1 | tail -3 | tee "$work/tests.txt"
    stamp "bench attention"
    timeout $T python3 -m sadiffuseq bench attention --lengths ${LENGTHS:-8192,32768,131072} --no-naive --reps 20 \
        --backends ${BACKENDS:-flash} --schedules ${SCHEDULES:-split} --flex-compile default --out "$work" \
        > "$work/attention.log" 2>&1; tail -5 "$work/attention.log"
    for L in ${MODEL_LENGTHS:-8192 32768}; do
      stamp "bench model $L compiled, attention auto (flash)"
      timeout $T python3 -m sadiffuseq bench model --lengths $L --reps ${MODEL_REPS:-5} --compile \
          --model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4] --model.window=256 --model.global_first=16 ${MODEL_FLAGS:-} \
          --out "$work/model" > "$work/model-$L.log" 2>&1; tail -3 "$work/model-$L.log"
    done ;;
  *) echo "unknown PART=$PART (kernel, modes, diag, model, moe or flash)"; exit 2 ;;
esac
stamp "done"
