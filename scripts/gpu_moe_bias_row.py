"""The expert matmuls of the up projection (forward, input gradient, weight gradient) with K = 768 and with K = 776
(the bias carried as an extra row of each expert's weight, padded to 16 bytes), and what a separate bias gradient
would cost instead, at 8k and 32k tokens (8 experts, top-2, expert width 1536); CUDA-graph replays.

    PYTHONPATH=src python3 scripts/gpu_moe_bias_row.py
"""
import sys, torch
sys.path.insert(0, "src")
from sadiffuseq.bench import graph_time_ms
dev, dt = "cuda", torch.bfloat16
E, k, d, F = 8, 2, 768, 1536
def t(fn, name, fl=None):
    ms = graph_time_ms(fn, reps=30)
    print(f"  {name:48s} {ms*1e3:8.1f} us" + (f"  {fl/ms/1e9:5.0f} TFLOP/s" if fl else ""))
    return ms
for S in (8192, 32768):
    M = S * k
    g = torch.Generator(device=dev).manual_seed(0)
    expert = torch.randint(0, E, (M,), device=dev, generator=g).sort().values
    counts = torch.bincount(expert, minlength=E)
    offs = torch.cumsum(counts, 0).int()
    dh = torch.randn(M, F, device=dev, dtype=dt, generator=g)
    print(f"S={S} M={M}")
    tot = {}
    for K in (768, 776):
        xs = torch.randn(M, K, device=dev, dtype=dt, generator=g)
        W1 = torch.randn(E, K, F, device=dev, dtype=dt, generator=g)
        fl = 2 * M * K * F
        a = t(lambda: torch._grouped_mm(xs, W1, offs=offs), f"K={K} up fwd", fl)
        b = t(lambda: torch._grouped_mm(dh, W1.transpose(1, 2), offs=offs), f"K={K} dX (dh @ W1^T)", fl)
        c = t(lambda: torch._grouped_mm(xs.t(), dh, offs=offs), f"K={K} dW1 (xs^T @ dh)", fl)
        tot[K] = a + b + c
        print(f"  K={K} three GEMMs {tot[K]*1e3:.1f} us")
    print(f"  saving from K=768: {(tot[776]-tot[768])*1e3:.1f} us")
    oh = torch.nn.functional.one_hot(expert, E).to(dt)
    t(lambda: oh.t() @ dh, "db: one-hot^T @ dh")
    t(lambda: dh.float().sum(0), "dense bias grad dh.sum(0) (fp32)")
