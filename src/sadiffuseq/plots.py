"""PNG plots of training runs and data folders (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Training loss terms against step (log scale), with validation loss where it was measured."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, style in (("loss", "-"), ("mse", "--"), ("rounding", ":"), ("pred_ce", "-.")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=f"train {key}")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="black", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or Path(metrics_path).parent.name)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_expert_load(metrics_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """MoE expert load against step: one panel per MoE layer, one line per expert (fraction of the token
    assignments it received, averaged over each log interval), with the balanced share 1/E dashed."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    layers = sorted({int(k.removeprefix("moe_load_l")) for r in records for k in r if k.startswith("moe_load_l")})
    if not layers:
        raise ValueError(f"{metrics_path} holds no MoE expert-load records (moe_load_l<layer>)")
    cols = min(len(layers), 3)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=120, squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        key = f"moe_load_l{layer}"
        pts = [(r["step"], r[key]) for r in records if key in r]
        steps = [s for s, _ in pts]
        n_experts = len(pts[0][1])
        for e in range(n_experts):
            ax.plot(steps, [load[e] for _, load in pts], lw=1.2, label=f"expert {e}")
        ax.axhline(1.0 / n_experts, color="black", ls="--", lw=0.8, label="balanced 1/E")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("load fraction")
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper right", ncol=1 if len(labels) <= 9 else 2)
    fig.suptitle(title or f"expert load — {Path(metrics_path).parent.name}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_length_hist(data_dir: str | Path, out_path: str | Path, seq_len: int | None = None,
                     title: str | None = None) -> Path:
    """Row-length histogram of each split of a tokenised data folder (a row is ``[BOS] src [SEP] trg [EOS]``).

    One step outline per split, counts on a log axis; log-x too (log-spaced bins) when the lengths span more
    than a factor of 20; ``seq_len`` (the row budget) as a dashed line.
    """
    import numpy as np

    from sadiffuseq.data.dataset import SPLITS, TokenizedSplit

    lengths = {split: TokenizedSplit(data_dir, split).row_lengths for split in SPLITS}
    lengths = {k: v for k, v in lengths.items() if len(v)}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if lengths:
        lo = max(1, min(int(v.min()) for v in lengths.values()))
        hi = max(int(v.max()) for v in lengths.values())
        log_x = hi / lo > 20
        bins = np.geomspace(lo, hi + 1, 50) if log_x else np.linspace(lo, hi + 1, 50)
        for split, v in lengths.items():
            ax.hist(v, bins=bins, histtype="step", lw=1.4, label=f"{split} ({len(v)} rows, median {int(np.median(v))})")
        if log_x:
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")  # the splits differ in size by orders of magnitude
    if seq_len:
        ax.axvline(seq_len, color="black", ls="--", lw=0.8, label=f"seq_len {seq_len}")
    ax.set_xlabel("row length (tokens)")
    ax.set_ylabel("examples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"row lengths — {Path(data_dir).name}")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
