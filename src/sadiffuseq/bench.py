"""``sadiffuseq bench``: side-by-side GPU timings, written as CSV and PNG.

* ``bench attention`` — forward+backward of the attention core (after the projections) for dense SDPA
  (FlashAttention), our sparse pattern (permuted FlexAttention, with the global tokens inline and as private key
  copies), and optionally the *naive* FlexAttention of the same pattern (dilated mask in the original order). Reports block density (fraction of 128×128 tiles visited),
  the ideal time density × dense, efficiency = ideal / sparse and the speed-up over dense.
* ``bench model`` — one full training step (forward, backward, AdamW) of the denoiser with dense attention and
  with sparse attention, same sizes, same data, one process.

Timings are medians over repeated runs between CUDA events after warm-up (which also triggers compilation).
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sadiffuseq.attention import patterns
from sadiffuseq.attention.backends import _compiled_create_block_mask, _compiled_flex, block_density, block_mask_for
from sadiffuseq.attention.layer import SparseSelfAttention
from sadiffuseq.config import Config, ModelConfig
from sadiffuseq.errors import UserError


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` between CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _fwd_bwd(attend, q, k, v, grad):
    def step():
        out = attend(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return step


def pattern_config(heads: int, head_dim: int, window: int, dilated_heads: int, dilation: int, n_global: int,
                   backend: str = "auto") -> ModelConfig:
    dilations = [1] * (heads - dilated_heads) + [dilation] * dilated_heads
    return ModelConfig(d_model=heads * head_dim, n_heads=heads, window=window, dilations=dilations,
                       global_first=n_global, attention="sparse", attention_backend=backend, dropout=0.0)


def naive_flex(cfg: ModelConfig, length: int, device):
    """FlexAttention of the same pattern in the original token order (no permutation), one call per dilation."""
    create_block_mask = _compiled_create_block_mask()
    is_global = patterns.global_positions(length, cfg.global_first, cfg.global_every, device=device)
    groups = sorted(set(cfg.dilations))
    masks = [create_block_mask(patterns.head_mask_mod(cfg.window, d, is_global), None, None, length, length,
                               device=device) for d in groups]
    sizes = [cfg.dilations.count(d) for d in groups]
    flex = _compiled_flex()

    def attend(q, k, v):
        outs, start = [], 0
        for n, bm in zip(sizes, masks):
            outs.append(flex(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], block_mask=bm))
            start += n
        return torch.cat(outs, dim=1)

    density = sum(block_density(bm) * n for bm, n in zip(masks, sizes)) / sum(sizes)
    return attend, density


def bench_attention(lengths: list[int], heads: int = 16, head_dim: int = 64, window: int = 256,
                    dilated_heads: int = 8, dilation: int = 4, n_global: int = 16, batch: int = 1,
                    naive: bool = True, reps: int = 10, out_dir: str | Path = "bench_out") -> list[dict]:
    if not torch.cuda.is_available():
        raise UserError("bench attention measures GPU kernels (FlexAttention, FlashAttention): it needs a CUDA GPU")
    device = torch.device("cuda")
    cfg = pattern_config(heads, head_dim, window, dilated_heads, dilation, n_global, backend="flex")
    layer = SparseSelfAttention(cfg).to(device)
    rows = []
    for L in tqdm(lengths, desc="lengths"):
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, L, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, L, head_dim, device=device, dtype=torch.bfloat16)
        dense_ms = cuda_time_ms(_fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), q, k, v, grad),
                                reps=reps)
        sparse_ms = cuda_time_ms(_fwd_bwd(layer.attend, q, k, v, grad), reps=reps)
        layer.global_copies = True  # the same pattern with the global tokens scheduled as private key copies
        copies_ms = cuda_time_ms(_fwd_bwd(layer.attend, q, k, v, grad), reps=reps)
        layer.global_copies = False
        density = 0.0
        for d, group in layer.groups:
            layout = patterns.cached_layout(L, cfg.global_first, cfg.global_every, d, device)
            density += block_density(block_mask_for(layout, cfg.window, L)) * len(group) / heads
        row = {"length": L, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "density": density,
               "ideal_ms": density * dense_ms, "efficiency": density * dense_ms / sparse_ms,
               "speedup": dense_ms / sparse_ms, "copies_ms": copies_ms, "copies_speedup": dense_ms / copies_ms}
        if naive:
            attend, naive_density = naive_flex(cfg, L, device)
            row["naive_ms"] = cuda_time_ms(_fwd_bwd(attend, q, k, v, grad), reps=reps)
            row["naive_density"] = naive_density
            row["naive_speedup"] = dense_ms / row["naive_ms"]
        rows.append(row)
        _write(rows, Path(out_dir), "attention")  # after every length: a long sweep keeps what it measured
        del q, k, v, grad
        torch.cuda.empty_cache()
    _plot_attention(rows, Path(out_dir) / "attention.png", cfg)
    return rows


def bench_model(cfg: Config, length: int, vocab: int = 16000, batch: int = 1, reps: int = 5,
                out_dir: str | Path = "bench_out", compile: bool = False) -> list[dict]:
    """One training step of the dense-attention model and of the sparse one, same sizes, side by side."""
    import copy

    from sadiffuseq.diffusion.process import Diffusion
    from sadiffuseq.model import Denoiser

    if not torch.cuda.is_available():
        raise UserError("bench model times training steps on a CUDA GPU")
    device = torch.device("cuda")
    diffusion = Diffusion(cfg.diffusion)
    rows = []
    for attention in ("dense", "sparse"):
        mcfg = copy.deepcopy(cfg.model)
        mcfg.attention = attention
        mcfg.dropout = 0.0
        torch.manual_seed(0)
        model = Denoiser(mcfg, vocab, absorbing=cfg.diffusion.absorbing).to(device)
        fwd = torch.compile(model) if compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(4, vocab, (batch, length), device=device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, length // 8:] = True
        batch_ = {"ids": ids, "input_mask": mask}

        def step():
            t = torch.randint(0, diffusion.steps, (batch,), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = diffusion.training_losses(fwd, batch_, t)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time_ms(step, warmup=2, reps=reps)
        rows.append({"attention": attention, "length": length, "batch": batch, "step_ms": ms,
                     "tokens_per_s": batch * length / ms * 1e3,
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                     "params_m": model.num_parameters() / 1e6})
        del model, opt, fwd
        torch.cuda.empty_cache()
    rows[1]["speedup"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    for r in rows:
        r["compiled"] = compile
    _write(rows, Path(out_dir), f"model_{length}{'_compiled' if compile else ''}")
    return rows


def _write(rows: list[dict], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _plot_attention(rows: list[dict], path: Path, cfg: ModelConfig) -> None:
    from sadiffuseq.plots import plt

    L = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.loglog(L, [r["dense_ms"] for r in rows], "o-", label="dense SDPA (FlashAttention)")
    ax.loglog(L, [r["sparse_ms"] for r in rows], "s-", label="sparse (permuted FlexAttention)")
    ax.loglog(L, [r["copies_ms"] for r in rows], "d-", label="sparse, global-key copies")
    ax.loglog(L, [r["ideal_ms"] for r in rows], ":", color="gray", label="ideal = density × dense")
    if "naive_ms" in rows[0]:
        ax.loglog(L, [r["naive_ms"] for r in rows], "^--", label="naive FlexAttention mask")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"{cfg.n_heads} heads × {cfg.d_model // cfg.n_heads}, window ±{cfg.window}, "
                 f"dilations {sorted(set(cfg.dilations))}, {cfg.global_first} global", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_rows(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [keys] + [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)
