"""Launch settings of the MoE layer's fused bias + GELU kernels (``moe_kernels.BIAS_GELU``, the backward, or with
``--forward`` ``moe_kernels.BIAS_GELU_FORWARD``; at ``--tokens 8192`` the backward's ``BIAS_GELU_SMALL``): every
setting of a grid timed as a CUDA-graph replay at 32k tokens (65,536 routed rows, 8 experts near balance, width 1536,
bf16; ``--tokens N``: the same counts scaled to N tokens),
checked against the PyTorch path; PyTorch's own
compiled GELU backward (no bias gradient), or its compiled ``GELU(u + b[expert])``, for scale. With ``--combine``:
the combine's backward (``moe_kernels.COMBINE_BACKWARD``) at 8k and 32k tokens (top-2, width 768), checked against
the first setting, the PyTorch backward compiled for scale.

    PYTHONPATH=src python3 scripts/gpu_tune_moe_kernels.py [--forward | --combine] [--tokens N]
"""
import itertools
import sys

import torch

from sadiffuseq import moe_kernels as mk
from sadiffuseq.bench import graph_time_ms

dev, dt = "cuda", torch.bfloat16
counts = (8261, 8077, 8118, 7950, 8412, 8339, 8131, 8248)  # 32k tokens, top-2
if "--tokens" in sys.argv:
    tokens = int(sys.argv[sys.argv.index("--tokens") + 1])
    counts = tuple(c * tokens // 32768 for c in counts)
E, M, W = len(counts), sum(counts), 1536
u = torch.randn(M, W, device=dev, dtype=dt)
g = torch.randn_like(u)
b = torch.randn(E, W, device=dev, dtype=dt)
expert = torch.repeat_interleave(torch.arange(E, device=dev), torch.tensor(counts, device=dev))
ends = torch.tensor(counts, device=dev).cumsum(0).int()
res = []
if "--combine" in sys.argv:
    from sadiffuseq.moe import _CombinePairs, dispatch

    problems = {}
    for n in (8192, 32768):
        experts = torch.randn(n, E, device=dev).topk(2, dim=1).indices
        disp = dispatch(experts, E)
        ys, gr = torch.randn(2 * n, 768, device=dev, dtype=dt), torch.randn(n, 768, device=dev, dtype=dt)
        gates, bias = torch.rand(n, 2, device=dev, dtype=dt), torch.randn(E, 768, device=dev, dtype=dt)
        ends_n = torch.cumsum(disp.counts, 0).int()
        args = (gr, ys, bias, gates, disp.pair, disp.token, ends_n)
        torch_args = (ys, gates, bias, experts, disp.expert, disp.pair, disp.token, disp.slot, None, None)
        ctx = type("Ctx", (), {"saved_tensors": torch_args})()
        old = lambda: _CombinePairs.backward(ctx, gr)  # noqa: E731
        print(f"{n} tokens: PyTorch backward (eager) {graph_time_ms(old, reps=30) * 1e3:.1f} us")
        problems[n] = (args, [t.clone() for t in mk.combine_backward(*args)])
    for BM, BD, w in itertools.product((8, 16, 32, 64), (64, 128, 256), (2, 4, 8)):
        if BM * BD > 16384 or BM * BD < 32 * w * 4:
            continue
        mk.COMBINE_BACKWARD = dict(BM=BM, BD=BD, num_warps=w)
        try:
            times, err = [], 0.0
            for n, (args, want) in problems.items():
                got = mk.combine_backward(*args)
                err = max([err] + [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                   for a, b in zip(got, want)])
                times.append(graph_time_ms(lambda: mk.combine_backward(*args), reps=30) * 1e3)
            res.append((sum(times), times, BM, BD, w, err))
        except Exception as e:
            print(BM, BD, w, "failed", str(e)[:100])
    for r in sorted(res)[:8]:
        print(f"8k {r[1][0]:6.1f} us, 32k {r[1][1]:6.1f} us  BM={r[2]} BD={r[3]} warps={r[4]} err={r[5]:.3g}")
    sys.exit()
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
    mk.BIAS_GELU = mk.BIAS_GELU_SMALL = dict(ROWS=R, BM=BM, BN=BN, num_warps=w)
    try:
        du, db = mk.bias_gelu_backward(g, u, b, expert, ends)
        err = (du.float() - want[0].float()).abs().max().item()
        ms = graph_time_ms(lambda: mk.bias_gelu_backward(g, u, b, expert, ends), reps=30)
        res.append((ms, f"ROWS={R} BM={BM}", BN, w, err))
    except Exception as e:
        print(BM, BN, w, "failed", str(e)[:100])
for r in sorted(res)[:12]:
    print(f"{r[0]*1e3:7.1f} us  {r[1]} BN={r[2]} warps={r[3]} err={r[4]:.3g}")
