"""Where does the sparse attention's time go? The benchmark pattern (16 heads × 64, window ±256, 8 heads dilated ×4,
16 global tokens, batch 1, bf16) at one length, forward and forward + backward:

* dense SDPA, the reference;
* the window alone (no dilation, no globals) as one FlexAttention call over all heads: the floor of any schedule;
* our band kernel (every head on its own token order, no globals) with its log-sum-exp;
* the whole pattern under each global-token schedule, as the model runs it (``flex_attention``);
* with ``--autotune``: the split schedule compiled with ``max-autotune-no-cudagraphs`` (Triton configs searched);
  ``--cudagraphs``: split and inline compiled with ``reduce-overhead`` (CUDA graphs).

Then a profiler table of the split schedule's CUDA kernels (forward + backward, 5 steps).
Usage: python3 scripts/gpu_attention_diag.py [LENGTH] [--autotune] [--cudagraphs]
"""

import sys

import torch
import torch.nn.functional as F

from sadiffuseq.attention import backends, patterns
from sadiffuseq.attention.backends import _flex, block_density, block_mask_for, flex_attention
from sadiffuseq.bench import cuda_time_ms

L = int(next((a for a in sys.argv[1:] if a.isdigit()), 8192))
H, hd, w, G = 16, 64, 256, 16
dilations = (1,) * 8 + (4,) * 8
dev = torch.device("cuda")
q, k, v = (torch.randn(1, H, L, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
heads = patterns.cached_head_layouts(L, G, 0, dilations, w, dev)
window_only = patterns.cached_head_layouts(L, 0, 0, (1,) * H, w, dev)
band_bm = block_mask_for(heads, L, band_only=True)
window_bm = block_mask_for(window_only, L)


def fb(fn):
    def step():
        out = fn()
        if isinstance(out, tuple):  # (out, lse): a gradient through both
            (out[0].float() * g.float()).sum().add(out[1].sum()).backward()
        else:
            out.backward(g)
        q.grad = k.grad = v.grad = None
    return step


rows = [
    ("dense SDPA", lambda: F.scaled_dot_product_attention(q, k, v), 1.0),
    ("window only, all heads", lambda: _flex(q, k, v, window_bm), block_density(window_bm)),
    ("band kernel + lse (permuted, no globals)", lambda: _flex(q, k, v, band_bm, return_lse=True), block_density(band_bm)),
    ("whole pattern, inline", lambda: flex_attention(q, k, v, heads, schedule="inline"),
     block_density(block_mask_for(heads, L))),
    ("whole pattern, split", lambda: flex_attention(q, k, v, heads, schedule="split"), None),
]


def variant(name, schedule, **compile_kwargs):
    """The whole pattern through ``backends._all_heads`` compiled with other ``torch.compile`` settings."""
    fn = torch.compile(backends._all_heads, dynamic=False, **compile_kwargs)
    split = schedule == "split"
    bm = band_bm if split else block_mask_for(heads, L)
    rows.append((name, lambda: fn(q, k, v, heads.perm, heads.inv, bm, G if split else 0, None), None))


if "--autotune" in sys.argv:
    variant("whole pattern, split, autotuned", "split", mode="max-autotune-no-cudagraphs")
if "--cudagraphs" in sys.argv:  # the host launches one graph per pass instead of every kernel
    variant("whole pattern, split, CUDA graphs", "split", mode="reduce-overhead")
    variant("whole pattern, inline, CUDA graphs", "inline", mode="reduce-overhead")

print(f"L={L}, H={H}, hd={hd}, dilations {dilations}, window ±{w}, {G} globals, bf16")
print(f"{'variant':<44}{'density':>9}{'fwd ms':>9}{'fwd+bwd ms':>12}")
for name, fn, density in rows:
    with torch.no_grad():
        f = cuda_time_ms(lambda: fn()) if "CUDA graphs" not in name else float("nan")  # one graph set per mode
    dens = "" if density is None else f"{density:.4f}"
    print(f"{name:<44}{dens:>9}{f:>9.3f}{cuda_time_ms(fb(fn)):>12.3f}", flush=True)

step = fb(lambda: flex_attention(q, k, v, heads, schedule="split"))
step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
