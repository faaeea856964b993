"""PNG plots of training runs (matplotlib, headless)."""

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
