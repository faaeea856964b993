"""Launch settings of the MoE router's Triton kernels (``moe_router.ROUTER``): every candidate timed as a CUDA-graph
replay at the layer's shapes (d 768, 8 experts, top-2, fp32 rows, 8k and 32k tokens), checked against float64; the
logits' settings first, then the weight gradient's, then the token gradient's. ``F.linear`` on the same fp32
tensors is timed beside them.

    PYTHONPATH=src python3 scripts/gpu_tune_moe_router.py [TOKENS ...]      (default 8192 32768)
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from sadiffuseq import moe_router
from sadiffuseq.bench import graph_time_ms

parser = argparse.ArgumentParser()
parser.add_argument("lengths", type=int, nargs="*", default=[8192, 32768])
args = parser.parse_args()
D, E, K = 768, 8, 2
print("torch", torch.__version__, torch.cuda.get_device_name())
g = torch.Generator(device="cuda").manual_seed(0)
data = {N: (torch.randn(N, D, device="cuda", generator=g), torch.randn(E, D, device="cuda", generator=g) * D**-0.5,
            torch.randn(N, E, device="cuda", generator=g),
            torch.randn(N * K, D, device="cuda", generator=g).to(torch.bfloat16),
            torch.randperm(N * K, device="cuda", generator=g)) for N in args.lengths}
want = {N: ((x.double() @ w.double().t()).float(), (gr.double().t() @ x.double()).float(),
            (rows.double()[slot].view(N, K, D).sum(1) + gr.double() @ w.double()).float())
        for N, (x, w, gr, rows, slot) in data.items()}
ops = torch.ops.sadiffuseq


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tune(label, keys, candidates, call, check):
    best, best_total = None, float("inf")
    for values in candidates:
        moe_router.ROUTER.update(dict(zip(keys, values)))
        times = []
        for N in args.lengths:
            try:
                err = check(N)
                assert err < 1e-5, f"relative error {err:.1e}"
                times.append(graph_time_ms(lambda: call(N), reps=30) * 1e3)
            except Exception as exc:  # noqa: BLE001 (a setting that does not compile or fit: skipped)
                print(f"  {label} {values}: {type(exc).__name__}: {str(exc)[:100]}")
                times.append(float("inf"))
        print(f"  {label} {values}: " + ", ".join(f"{N}: {t:.1f} us" for N, t in zip(args.lengths, times)))
        if sum(times) < best_total:
            best, best_total = values, sum(times)
    moe_router.ROUTER.update(dict(zip(keys, best)))
    print(f"{label}: best {dict(zip(keys, best))}")


for N, (x, w, gr, rows, slot) in data.items():
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def linear_step():
        F.linear(xr, wr).backward(gr)
        xr.grad = wr.grad = None

    print(f"{N} tokens: F.linear fp32 forward {graph_time_ms(lambda: F.linear(x, w), reps=30) * 1e3:.1f} us, "
          f"forward + backward {graph_time_ms(linear_step, reps=30) * 1e3:.1f} us, "
          f"weight gradient alone {graph_time_ms(lambda: gr.t() @ x, reps=30) * 1e3:.1f} us")

tune("forward", ("BM", "BK", "warps", "precision"),
     itertools.product((32, 64, 128), (64, 128), (4, 8), ("ieee", "tf32x3")),
     lambda N: ops.moe_router_logits(data[N][0], data[N][1]),
     lambda N: rel(ops.moe_router_logits(data[N][0], data[N][1]), want[N][0]))
tune("weight grad", ("ROWS", "BR", "BD", "grad_warps"),
     itertools.product((128, 256, 512, 1024), (32, 64), (128, 256), (4, 8)),
     lambda N: ops.moe_router_weight_grad(data[N][2], data[N][0]),
     lambda N: rel(ops.moe_router_weight_grad(data[N][2], data[N][0]), want[N][1]))
tune("token grad", ("token_BM", "token_BD", "token_warps"),
     itertools.product((16, 32, 64), (128, 256), (4, 8)),
     lambda N: ops.moe_token_grad(data[N][3], data[N][4], None, data[N][2], data[N][1], K, torch.float32),
     lambda N: rel(ops.moe_token_grad(data[N][3], data[N][4], None, data[N][2], data[N][1], K, torch.float32),
                   want[N][2]))
print("ROUTER =", moe_router.ROUTER)
