"""Launch settings of the MoE layer's fused bias + GELU kernels (``moe_kernels.BIAS_GELU``, the backward, or with
``--forward`` ``moe_kernels.BIAS_GELU_FORWARD``): every setting of a grid timed as a CUDA-graph replay at 32k tokens
(65,536 routed rows, 8 experts near balance, width 1536, bf16), checked against the PyTorch path; PyTorch's own
compiled GELU backward (no bias gradient), or its compiled ``GELU(u + b[expert])``, for scale.

    PYTHONPATH=src python3 scripts/gpu_tune_moe_kernels.py [--forward]
"""
import itertools
import sys

import torch

from sadiffuseq import moe_kernels as mk
from sadiffuseq.bench import graph_time_ms

dev, dt = "cuda", torch.bfloat16
counts = (8261, 8077, 8118, 7950, 8412, 8339, 8131, 8248)
E, M, W = len(counts), sum(counts), 1536
u = torch.randn(M, W, device=dev, dtype=dt)
g = torch.randn_like(u)
b = torch.randn(E, W, device=dev, dtype=dt)
expert = torch.repeat_interleave(torch.arange(E, device=dev), torch.tensor(counts, device=dev))
ends = torch.tensor(counts, device=dev).cumsum(0).int()
res = []
if "--forward" in sys.argv:
    ref = torch.compile(lambda u, b, expert: torch.nn.functional.gelu(u + b.index_select(0, expert)))
    want = ref(u, b, expert)
    print("inductor GELU(u + b[expert])", graph_time_ms(lambda: ref(u, b, expert), reps=30) * 1e3)
    for R, BM, BN, w in itertools.product((128, 256, 512), (4, 8, 16, 32), (64, 128, 256), (2, 4, 8)):
        if BM * BN > 8192 or BM * BN < 512 or BM * BN < 32 * w * 4:
            continue
        mk.BIAS_GELU_FORWARD = dict(ROWS=R, BM=BM, BN=BN, num_warps=w)
        try:
            err = (mk.bias_gelu_forward(u, b, expert, ends).float() - want.float()).abs().max().item()
            ms = graph_time_ms(lambda: mk.bias_gelu_forward(u, b, expert, ends), reps=30)
            res.append((ms, f"ROWS={R} BM={BM}", BN, w, err))
        except Exception as e:
            print(BM, BN, w, "failed", str(e)[:100])
    for r in sorted(res)[:8]:
        print(f"{r[0]*1e3:7.1f} us  {r[1]} BN={r[2]} warps={r[3]} err={r[4]:.3g}")
    sys.exit()
ref = torch.compile(lambda g, u: torch.ops.aten.gelu_backward(g, u))
print("inductor gelu_backward alone", graph_time_ms(lambda: ref(g, u), reps=30) * 1e3)
want = mk.bias_gelu_backward_torch(g, u, b, expert)
for R, BM, BN, w in itertools.product((128, 256, 512), (4, 8, 16, 32), (64, 128, 256), (2, 4, 8)):
    if BM * BN > 8192 or BM * BN < 512 or BM * BN < 32 * w * 4:  # too many registers / too few lanes
        continue
    mk.BIAS_GELU = dict(ROWS=R, BM=BM, BN=BN, num_warps=w)
    try:
        du, db = mk.bias_gelu_backward(g, u, b, expert, ends)
        err = (du.float() - want[0].float()).abs().max().item()
        ms = graph_time_ms(lambda: mk.bias_gelu_backward(g, u, b, expert, ends), reps=30)
        res.append((ms, f"ROWS={R} BM={BM}", BN, w, err))
    except Exception as e:
        print(BM, BN, w, "failed", str(e)[:100])
for r in sorted(res)[:12]:
    print(f"{r[0]*1e3:7.1f} us  {r[1]} BN={r[2]} warps={r[3]} err={r[4]:.3g}")
