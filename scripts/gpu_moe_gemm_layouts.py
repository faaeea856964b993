"""Every operand layout ``torch._grouped_mm`` accepts for the MoE layer's six expert matmuls (the grouped dimension
on the rows of the first operand, on the columns of the second, or along K for the weight gradients; either operand
transposed), timed as CUDA-graph replays at 8k and 32k tokens (8 experts, top-2, d 768, expert width 1536; group
sizes near balance, multiples of 8 as the column-grouped forms need). Does any layout run faster than the one the
layer uses?

    PYTHONPATH=src python3 scripts/gpu_moe_gemm_layouts.py
"""
import torch

from sadiffuseq.bench import graph_time_ms

dev, dt = "cuda", torch.bfloat16
E, d, F = 8, 768, 1536
for S in (8192, 32768):
    M = 2 * S
    g = torch.Generator(device=dev).manual_seed(0)
    # Near balance (deviations of a few percent, as a random router gives), multiples of 8.
    counts = torch.full((E,), M // E, dtype=torch.long)
    counts += torch.tensor([100, -60, -30, -200, 180, 120, -50, -60]) * (S // 8192) // 4
    counts = (counts // 8) * 8
    counts[-1] += M - counts.sum()
    offs = torch.cumsum(counts, 0).int().to(dev)
    xs = torch.randn(M, d, device=dev, dtype=dt, generator=g)
    h = torch.randn(M, F, device=dev, dtype=dt, generator=g)
    dh, dy = torch.randn_like(h), torch.randn(M, d, device=dev, dtype=dt, generator=g)
    W1 = torch.randn(E, d, F, device=dev, dtype=dt, generator=g) * 0.03
    W2 = torch.randn(E, F, d, device=dev, dtype=dt, generator=g) * 0.03
    xsT, hT, dhT, dyT = (t.t().contiguous() for t in (xs, h, dh, dy))
    W1T, W2T = W1.transpose(1, 2).contiguous(), W2.transpose(1, 2).contiguous()
    fl = 2 * M * d * F
    def r(name, fn):
        try:
            ms = graph_time_ms(fn, reps=30)
            print(f"  {name:48s} {ms*1e3:8.1f} us {fl/ms/1e9:5.0f} TF/s")
        except Exception as e:
            print(f"  {name:48s} FAILED {type(e).__name__} {str(e)[:150]}")
    print(S, counts.tolist())
    r("up  xs@W1 (2Dx3D)", lambda: torch._grouped_mm(xs, W1, offs=offs))
    r("up  xs@W1T^T (B col-major)", lambda: torch._grouped_mm(xs, W1T.transpose(1, 2), offs=offs))
    r("up^T W1T@xsT (3Dx2D)", lambda: torch._grouped_mm(W1T, xsT, offs=offs))
    r("up^T W1T@xs^T (3Dx2D, B col-major)", lambda: torch._grouped_mm(W1T, xs.t(), offs=offs))
    r("down h@W2", lambda: torch._grouped_mm(h, W2, offs=offs))
    r("down^T W2T@hT", lambda: torch._grouped_mm(W2T, hT, offs=offs))
    r("dXup dh@W1^T", lambda: torch._grouped_mm(dh, W1.transpose(1, 2), offs=offs))
    r("dXup^T W1@dhT", lambda: torch._grouped_mm(W1, dhT, offs=offs))
    r("dXup^T W1@dh^T (colmajor)", lambda: torch._grouped_mm(W1, dh.t(), offs=offs))
    r("dWup xs^T@dh", lambda: torch._grouped_mm(xs.t(), dh, offs=offs))
    r("dWup^T dh^T@xs", lambda: torch._grouped_mm(dh.t(), xs, offs=offs))
    r("dWup xsT@dhT^T (both K-major)", lambda: torch._grouped_mm(xsT, dhT.t(), offs=offs))
    r("dWup^T dhT@xsT^T", lambda: torch._grouped_mm(dhT, xsT.t(), offs=offs))
    r("dWdown h^T@dy", lambda: torch._grouped_mm(h.t(), dy, offs=offs))
    r("dWdown^T dy^T@h", lambda: torch._grouped_mm(dy.t(), h, offs=offs))
    r("dWdown hT@dyT^T", lambda: torch._grouped_mm(hT, dyT.t(), offs=offs))
    r("dXdown dy@W2^T", lambda: torch._grouped_mm(dy, W2.transpose(1, 2), offs=offs))
    r("dXdown^T W2@dyT", lambda: torch._grouped_mm(W2, dyT, offs=offs))
