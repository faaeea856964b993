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
GROUPS = ["forward", "weight_grad", "token_grad", "route", "route_grad"]
parser.add_argument("--only", nargs="+", default=GROUPS, choices=GROUPS, help="which kernels to tune")
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


def tune(label, keys, candidates, call, check, table=moe_router.ROUTER):
    if label.replace(" ", "_") not in args.only:
        return
    best, best_total = None, float("inf")
    for values in candidates:
        table.update(dict(zip(keys, values)))
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
    table.update(dict(zip(keys, best)))
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
moe_router.ROUTER_SMALL.clear()  # (the setting under test at every length)
tune("weight grad", ("ROWS", "BR", "BD", "grad_warps"),
     itertools.product((64, 128, 256, 512, 1024), (32, 64), (64, 128, 256), (4, 8)),
     lambda N: ops.moe_router_weight_grad(data[N][2], data[N][0]),
     lambda N: rel(ops.moe_router_weight_grad(data[N][2], data[N][0]), want[N][1]))
tune("token grad", ("token_BM", "token_BD", "token_warps"),
     itertools.product((16, 32, 64), (128, 256), (4, 8)),
     lambda N: ops.moe_token_grad(data[N][3], data[N][4], None, data[N][2], data[N][1], K, torch.float32),
     lambda N: rel(ops.moe_token_grad(data[N][3], data[N][4], None, data[N][2], data[N][1], K, torch.float32),
                   want[N][2]))

# The fused routing of a dropless layer: its three forward kernels timed together (one op), checked against the
# results of the starting settings (the index arrays and rows exactly, the float outputs to 1e-5), and its backward.
bias = torch.randn(E, device="cuda", generator=g) * 0.01
first = {N: ops.moe_route_dispatch(data[N][0], data[N][1], bias, K, torch.bfloat16) for N in args.lengths}
grads = {N: (torch.randn(N, K, device="cuda", generator=g), torch.randn(E, device="cuda", generator=g),
             torch.randn(1, device="cuda", generator=g)) for N in args.lengths}


def route_error(N):
    got = ops.moe_route_dispatch(data[N][0], data[N][1], bias, K, torch.bfloat16)
    exact = all(torch.equal(a, b) for a, b in zip(got, first[N]) if a.dtype != torch.float32)
    return max(rel(a, b) for a, b in zip(got, first[N]) if a.dtype == torch.float32) if exact else float("inf")


def route_grad(N):
    rows, logits, experts, gates, slot, *_ = first[N]
    return ops.moe_route_token_grad(data[N][3], slot, logits, experts, *grads[N], data[N][1], K, torch.float32)


grad_want = {N: [t.clone() for t in route_grad(N)] for N in args.lengths}
tune("route", ("BM", "BK", "warps"), itertools.product((32, 64, 128), (64, 128), (4, 8)),
     lambda N: ops.moe_route_dispatch(data[N][0], data[N][1], bias, K, torch.bfloat16), route_error, moe_router.ROUTE)
tune("route", ("BD", "dispatch_warps", "CH", "scan_warps"),
     itertools.product((64, 128, 256), (4, 8), (64, 256), (4, 8)),
     lambda N: ops.moe_route_dispatch(data[N][0], data[N][1], bias, K, torch.bfloat16), route_error, moe_router.ROUTE)
tune("route grad", ("grad_BM", "grad_BD", "grad_warps"), itertools.product((16, 32, 64), (64, 128, 256), (4, 8)),
     route_grad, lambda N: max(rel(a, b) for a, b in zip(route_grad(N), grad_want[N])), moe_router.ROUTE)
print("ROUTER =", moe_router.ROUTER)
print("ROUTE =", moe_router.ROUTE)
