"""The MoE layer's six expert matmuls in the forms PyTorch offers, against a dense matmul of the same FLOPs: the
grouped matmul over the rows sorted by expert (``torch._grouped_mm``, what the layer runs), one batched matmul
over the experts' rows padded to a common length (``torch.bmm``: the dense GEMM's kernels, at the price of the
padding), and one dense matmul. Shapes of the layer (8 experts, top-2, d 768, expert width 1536, K = 768: the up
projection's bias outside the matmul), routing of random tokens by a random router as ``bench moe`` has it; each
call timed as a CUDA-graph replay (``bench.graph_time_ms``).

    PYTHONPATH=src python3 scripts/gpu_moe_gemm_forms.py [TOKENS ...]      (default 8192 32768)
"""
import sys

import torch

from sadiffuseq.bench import graph_time_ms

dev, dt = "cuda", torch.bfloat16
E, k, d, F = 8, 2, 768, 1536
lengths = [int(a) for a in sys.argv[1:]] or [8192, 32768]
print("torch", torch.__version__, torch.cuda.get_device_name())


def rate(fn, flops):
    ms = graph_time_ms(fn, reps=30)
    return ms, flops / ms / 1e9


rows = []
for S in lengths:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(S, d, device=dev, dtype=torch.float32, generator=g)
    router = torch.randn(E, d, device=dev, generator=g) * d**-0.5
    flat = (x @ router.t()).topk(k, dim=1).indices.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    M = flat.numel()
    C = int(counts.max())
    offs = torch.cumsum(counts, 0).int()
    xs = torch.randn(M, d, device=dev, dtype=dt, generator=g)
    h = torch.randn(M, F, device=dev, dtype=dt, generator=g)
    dh, dy = torch.randn_like(h), torch.randn(M, d, device=dev, dtype=dt, generator=g)
    W1 = torch.randn(E, d, F, device=dev, dtype=dt, generator=g) * 0.03
    W2 = torch.randn(E, F, d, device=dev, dtype=dt, generator=g) * 0.03
    xp, hp = torch.randn(E, C, d, device=dev, dtype=dt), torch.randn(E, C, F, device=dev, dtype=dt)
    dhp, dyp = torch.randn_like(hp), torch.randn_like(xp)
    xd, hd_ = xs, h  # dense: the same rows as one group
    W1d, W2d = W1[0], W2[0]
    fl_up, fl_down = 2 * M * d * F, 2 * M * F * d
    cases = {
        "up      x W1": (lambda: torch._grouped_mm(xs, W1, offs=offs), lambda: torch.bmm(xp, W1),
                         lambda: xd @ W1d, fl_up),
        "down    h W2": (lambda: torch._grouped_mm(h, W2, offs=offs), lambda: torch.bmm(hp, W2),
                         lambda: hd_ @ W2d, fl_down),
        "dX_up   dh W1^T": (lambda: torch._grouped_mm(dh, W1.transpose(1, 2), offs=offs),
                            lambda: torch.bmm(dhp, W1.transpose(1, 2)), lambda: dh @ W1d.t(), fl_up),
        "dW_up   x^T dh": (lambda: torch._grouped_mm(xs.t(), dh, offs=offs),
                           lambda: torch.bmm(xp.transpose(1, 2), dhp), lambda: xd.t() @ dh, fl_up),
        "dX_down dy W2^T": (lambda: torch._grouped_mm(dy, W2.transpose(1, 2), offs=offs),
                            lambda: torch.bmm(dyp, W2.transpose(1, 2)), lambda: dy @ W2d.t(), fl_down),
        "dW_down h^T dy": (lambda: torch._grouped_mm(h.t(), dy, offs=offs),
                           lambda: torch.bmm(hp.transpose(1, 2), dyp), lambda: hd_.t() @ dy, fl_down),
    }
    total = {"grouped": 0.0, "bmm": 0.0, "dense": 0.0}
    print(f"\n{S} tokens: {M} routed rows, counts {counts.tolist()}, padded to {C} (+{E * C / M - 1:.1%})")
    print(f"  {'matmul':18s} {'grouped us (TF/s)':>20s} {'bmm padded us (TF/s)':>22s} {'dense us (TF/s)':>20s}")
    for name, (grouped, bmm, dense, fl) in cases.items():
        res = [rate(grouped, fl), rate(bmm, fl), rate(dense, fl)]
        for key, (ms, _) in zip(total, res):
            total[key] += ms
        print(f"  {name:18s} " + " ".join(f"{ms * 1e3:10.1f} ({tf:4.0f})      " for ms, tf in res))
    print(f"  {'sum':18s} " + " ".join(f"{ms * 1e3:10.1f}             " for ms in total.values()))
    rows.append((S, *total.values()))

print("\ntokens | six matmuls, grouped ms | bmm padded ms | dense ms | grouped / dense")
for S, gr, bm, de in rows:
    print(f"{S} | {gr:.3f} | {bm:.3f} | {de:.3f} | {gr / de:.2f}")
