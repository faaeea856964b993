#!/usr/bin/env bash
# The MoE benchmark for two versions of the library, alternately on one machine: each round runs
# `sadiffuseq bench moe` once with the sources in OLD_SRC and once with ./src, and prints one line per run
# (dense and MoE CUDA-graph replay times in ms, their ratio). Alternating rounds spread the machine's drift over
# both versions; a difference smaller than the spread between rounds of one version is noise.
#
#   git archive <revision> src | tar -x -C <dir>          (the old sources, e.g. into an ignored folder)
#   bash scripts/gpu_moe_ab.sh <dir>/src [ROUNDS=3] [LENGTHS=8192]
set -euo pipefail
old=${1:?usage: gpu_moe_ab.sh OLD_SRC [ROUNDS] [LENGTHS]}
rounds=${2:-3}
lengths=${3:-8192}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
[ -d "$old/sadiffuseq" ] || { echo "gpu_moe_ab.sh: $old has no sadiffuseq package (give the src folder)" >&2; exit 2; }
echo "version length dense_graph_ms moe_graph_ms graph_ratio"
for r in $(seq "$rounds"); do
  for v in old new; do
    src=src; [ "$v" = old ] && src=$old
    PYTHONPATH=$src python3 -m sadiffuseq bench moe --lengths "$lengths" --reps 30 --compile --cuda-graph \
      --out "$out/$v$r" > "$out/$v$r.log" 2>&1 || { tail -20 "$out/$v$r.log"; exit 1; }
    python3 - "$out/$v$r/moe.csv" "$v" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    print(sys.argv[2], row["length"], row["dense_graph_ms"][:6], row["moe_graph_ms"][:6], row["graph_ratio"][:6])
PY
  done
done
