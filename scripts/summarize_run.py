"""Summarise a run's metrics.jsonl: steps, steady throughput, peak memory, losses, and (MoE) the least-loaded
expert after warm-up as a fraction of its fair share. Writes SUMMARY_JSON and prints it.

Usage: python3 scripts/summarize_run.py RUN/metrics.jsonl SUMMARY_JSON
"""

import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
steady = train[len(train) // 5:]  # skip start-up and compilation (the first fifth of the logged intervals)
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
    def min_share(r):
        return min(min(v) * len(v) for k, v in r.items() if k.startswith("moe_load_l"))

    s["moe_min_load_vs_fair_after_warmup"] = round(min(min_share(r) for r in loads[len(loads) // 5:]), 3)
    s["moe_min_load_vs_fair_last"] = round(min_share(loads[-1]), 3)
json.dump(s, open(sys.argv[2], "w"), indent=1)
for k, v in s.items():
    print(f"{k:>34}: {v}")
