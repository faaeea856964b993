"""Where does the time of the ``split`` global-token schedule go? One group of 8 heads (dilation 1), 16 globals.

Times forward+backward of: the inline kernel, the band-only kernel (with and without its log-sum-exp, and with a
gradient through it), the whole split schedule with an eager epilogue and as one compiled region; then a profiler table of
the split schedule's CUDA kernels.
Usage: python3 scripts/gpu_split_diag.py [LENGTH]
"""

import sys

import torch

from sadiffuseq.attention import backends, patterns
from sadiffuseq.attention.backends import _flex, block_mask_for, flex_attention
from sadiffuseq.bench import cuda_time_ms

L = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
H, hd, w, G = 8, 64, 256, 16
dev = torch.device("cuda")
q, k, v = (torch.randn(1, H, L, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
lay = patterns.make_layout(patterns.global_positions(L, G, 0, device=dev), 1)
inline_bm = block_mask_for(lay, w, L)
band_bm = block_mask_for(lay, w, L, band_only=True)


def fb(fn):
    def step():
        out = fn()
        if isinstance(out, tuple):  # (out, lse): a gradient through both
            (out[0].float() * g.float()).sum().add(out[1].sum()).backward()
        else:
            out.backward(g)
        q.grad = k.grad = v.grad = None
    return step


def eager_epilogue_split():  # compiled kernel, eager epilogue
    out_b, lse_b = _flex(q, k, v, band_bm, return_lse=True)
    return backends.split_epilogue(q, k, v, out_b, lse_b, G)


rows = [
    ("inline kernel", lambda: _flex(q, k, v, inline_bm)),
    ("band kernel", lambda: _flex(q, k, v, band_bm)),
    ("band kernel + lse (grad on out)", lambda: _flex(q, k, v, band_bm, return_lse=True)[0]),
    ("band kernel + lse (grad on both)", lambda: _flex(q, k, v, band_bm, return_lse=True)),
    ("split, eager epilogue", eager_epilogue_split),
    ("split, one compiled region", lambda: flex_attention(q, k, v, lay, w, schedule="split")),
]
print(f"L={L}, H={H}, hd={hd}, {G} globals, bf16")
print(f"{'variant':<36}{'fwd ms':>9}{'fwd+bwd ms':>12}")
for name, fn in rows:
    with torch.no_grad():
        f = cuda_time_ms(lambda: fn())
    print(f"{name:<36}{f:>9.3f}{cuda_time_ms(fb(fn)):>12.3f}", flush=True)

step = fb(lambda: flex_attention(q, k, v, lay, w, schedule="split"))
step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
