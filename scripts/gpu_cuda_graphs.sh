#!/usr/bin/env bash
# Forward + backward captured as one CUDA graph and replayed (bench --cuda-graph), attention and MoE, on one GPU;
# then the profiler's kernel table of the cuDNN-band path at 32k. Optional: NVIDIA's cudnn frontend wheel in the
# folder WHEELS (default .whl/; installed with pip install --no-deps --target /tmp/cdnn) for the cuDNN band, for
# machines that cannot reach a package index; without it (and not installed) the cudnn rows are skipped.
#   PART=attention|moe|profile|all (default all)   OUT=folder for CSV/PNG (default bench_out)
set -euo pipefail
OUT=${OUT:-bench_out}
PART=${PART:-all}
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/nvidia_cudnn_frontend*.whl >/dev/null 2>&1; then
  pip install -q --no-deps --target /tmp/cdnn "$WHEELS"/nvidia_cudnn_frontend*.whl
  export PYTHONPATH=src:/tmp/cdnn
else
  export PYTHONPATH=src
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [[ $PART == all || $PART == attention ]]; then
  python3 -m pytest -q -x tests/test_bench.py -k gpu_graph 2>&1 | tail -3
  python3 -m sadiffuseq bench attention --lengths ${LENGTHS:-8192,32768} --no-naive --reps 20 --backends ${BACKENDS:-flex,flash} \
    --flash-kernel ${KERNEL:-cudnn} --schedules inline,split --flex-compile ${FLEX_COMPILE:-default} --cuda-graph \
    --out "$OUT/attention"
fi
if [[ $PART == all || $PART == moe ]]; then
  python3 -m sadiffuseq bench moe --lengths 8192,32768 --reps 30 --compile --cuda-graph --out "$OUT/moe"
fi
if [[ $PART == all || $PART == profile ]]; then
  python3 scripts/gpu_flash_profile.py 32768 ${KERNEL:-cudnn} 2>&1 | tail -30
fi
