"""``sadiffuseq demo``: the whole pipeline, before and after training, in a few minutes on a CPU."""

from __future__ import annotations

import time
import textwrap

import torch

from sadiffuseq.checkpoint import load_model
from sadiffuseq.config import Config
from sadiffuseq.data.dataset import describe, ensure_dataset
from sadiffuseq.data.tokenizer import load_tokenizer
from sadiffuseq.evaluate import compute_metrics, format_comparison
from sadiffuseq.generate import generate_records, split_sources, write_jsonl
from sadiffuseq.train import build_model, train
from sadiffuseq.utils import resolve_device


def _show(text: str, width: int = 100, lines: int = 8) -> str:
    out = text.splitlines()[:lines] or [""]
    more = "\n    ..." if len(text.splitlines()) > lines else ""
    return "\n".join("    " + textwrap.shorten(line, width, placeholder=" …") if len(line) > width else "    " + line for line in out) + more


def run_demo(cfg: Config, num_examples: int = 32) -> None:
    start = time.perf_counter()
    run_dir = cfg.train.out_dir
    device = resolve_device(cfg.train.device)
    print(f"sadiffuseq demo — task {cfg.data.task}, run directory {run_dir}\n")

    print("1/4 building the standard-library task and its tokenizer")
    meta = ensure_dataset(cfg.data, cfg.data_dir)
    print(describe(meta))
    tokenizer = load_tokenizer(cfg.data_dir / "tokenizer.json")
    srcs, refs = split_sources(cfg, tokenizer, "test", num_examples)

    print(f"\n2/4 sampling {len(srcs)} held-out examples with the untrained model")
    untrained = build_model(cfg, meta["vocab_size"], device).eval()
    torch.manual_seed(cfg.sample.seed)
    before = generate_records(untrained, cfg, tokenizer, srcs, refs, device)
    del untrained

    print(f"\n3/4 training for {cfg.train.steps} steps")
    train(cfg)

    print(f"\n4/4 sampling the same examples with the trained model (EMA weights, {cfg.sample.sampler}, {cfg.sample.steps} steps)")
    model, cfg_loaded, _ = load_model(run_dir, device)
    cfg_loaded.train.device = str(device)
    after = generate_records(model, cfg_loaded, tokenizer, srcs, refs, device)
    write_jsonl(before, f"{run_dir}/samples_untrained.jsonl")
    write_jsonl(after, f"{run_dir}/samples_trained.jsonl")

    metrics = {
        "untrained": compute_metrics([r["generated"] for r in before], refs),
        "trained": compute_metrics([r["generated"] for r in after], refs),
    }
    for i in range(min(3, len(after))):
        print(f"\n── example {i + 1} " + "─" * 60)
        print("source:\n" + _show(after[i]["source"]))
        print("reference:\n" + _show(after[i]["reference"]))
        print("untrained model:\n" + _show(before[i]["generated"]))
        print("trained model:\n" + _show(after[i]["generated"]))
    print("\n" + format_comparison(metrics))
    print(
        f"\ndone in {time.perf_counter() - start:.0f} s. Run directory: {run_dir}\n"
        f"  loss curve {run_dir}/loss.png, metrics {run_dir}/metrics.jsonl,\n"
        f"  samples {run_dir}/samples_trained.jsonl; sample again with `sadiffuseq sample {run_dir}`"
    )
