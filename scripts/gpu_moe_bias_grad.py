"""Where the MoE backward computes the up projection's bias gradient, timed as the two launches it sits between.

``du = (dy · W_downᵀ) · GELU'(u + b)`` and ``db[e] = Σ_{rows of e} du``, then the rows' gradient beside both weight
gradients on two streams. Variants (CUDA-graph replays, µs; 8 experts, top-2, d 768, width 1536, bf16):

* separate: the matmul, then the bias + GELU backward kernel with its tile sums (``moe_kernels``);
* epilogue, sums 1: du and the tile sums in the matmul's epilogue, the sums a reduction across the warps;
* epilogue, sums 2: the same sums as a product with a matrix of ones on the tensor cores;
* epilogue, sums in the weights: du alone in the epilogue, the sums by programs of the weight-gradient launch
  (placed first or last in its grid, rows × columns at a time as given).

Each variant is checked against the separate path (du and db) before it is timed.

    PYTHONPATH=src python3 scripts/gpu_moe_bias_grad.py
"""
import torch

from sadiffuseq import moe_gemm as mg
from sadiffuseq.bench import graph_time_ms

ops = torch.ops.sadiffuseq
E, d, H, dt = 8, 768, 1536, torch.bfloat16
REPS = 100


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


rows_out = []
for N in (8192, 32768):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, d, device="cuda", generator=g)
    router = torch.randn(E, d, device="cuda", generator=g) * d**-0.5
    counts = torch.bincount((x @ router.t()).topk(2, dim=1).indices.reshape(-1), minlength=E)
    M = int(counts.sum())
    ends = counts.cumsum(0).int()
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dt)  # noqa: E731
    rows, grad, u, h = rnd(M, d), rnd(M, d), rnd(M, H), rnd(M, H)
    wu, wd, bu = rnd(E, d, H) * 0.03, rnd(E, H, d) * 0.03, rnd(E, H)

    def separate():
        du, db = ops.moe_bias_gelu_backward(ops.moe_gmm(grad, wd, ends, True, "down_input_grad"), u, bu, ends)
        return (du, db) + tuple(ops.moe_gmm_input_and_weight_grads(du, wu, rows, h, grad, ends, torch.float32, False,
                                                                     False))

    want = separate()

    def fused(sums):
        def run():
            du, db = ops.moe_gmm_down_input_grad_gelu(grad, wd, u, bu, ends, sums)
            d_rows, w1, w2, db2, _ = ops.moe_gmm_input_and_weight_grads(du, wu, rows, h, grad, ends, torch.float32,
                                                                         sums == 0, False)
            return du, (db if sums else db2), d_rows, w1, w2
        return run

    variants = [("separate", None, None, separate)]  # (label, the epilogue's sums, WEIGHT_GRAD_BIAS, call)
    for sums in (1, 2):
        variants.append((f"epilogue, sums {sums}", sums, None, fused(sums)))
    for where in (1, 2):
        for br, bc in ((64, 256), (128, 128), (32, 256), (64, 128)):
            variants.append((f"epilogue, sums in the weights {'first' if where == 1 else 'last'} {br}x{bc}",
                             0, (where, br, bc), fused(0)))
    base_launch = mg.LAUNCH["down_input_grad_gelu"]
    for grid, sub in ((1, 4), (1, 2), (2, 4), (2, 2)):
        mg.LAUNCH["down_input_grad_gelu"] = base_launch[:6] + (grid, 1, sub)
        for name, sums, wgb, fn in variants:
            if name == "separate" and (grid, sub) != (1, 4):
                continue
            if wgb is not None:
                mg.WEIGHT_GRAD_BIAS = wgb
            try:
                got = fn()
                err = max(rel(got[0], want[0]), rel(got[1], want[1]), *(rel(a, b) for a, b in zip(got[2:], want[2:5])))
                t = graph_time_ms(fn, reps=REPS) * 1e3
                # the first launch alone
                if name == "separate":
                    t1 = graph_time_ms(lambda: ops.moe_bias_gelu_backward(
                        ops.moe_gmm(grad, wd, ends, True, "down_input_grad"), u, bu, ends), reps=REPS) * 1e3
                else:
                    t1 = graph_time_ms(lambda: ops.moe_gmm_down_input_grad_gelu(grad, wd, u, bu, ends, sums),
                                       reps=REPS) * 1e3
            except Exception as e:  # a setting that does not compile is reported, not fatal
                print(f"{N} grid {grid} sub {sub} {name}: {type(e).__name__} {str(e)[:200]}", flush=True)
                continue
            label = name if name == "separate" else f"{name} (grid {grid}, {sub} slices)"
            print(f"{N:6d} {label:64s} first {t1:7.1f}  both {t:7.1f} us  err {err:.2g}", flush=True)
            rows_out.append((N, label, t1, t, err))
    mg.LAUNCH["down_input_grad_gelu"] = base_launch

print("\n| tokens | variant | first launch µs | both µs | max rel. error |\n|---:|---|---:|---:|---:|")
for N, label, t1, t, err in rows_out:
    print(f"| {N} | {label} | {t1:.1f} | {t:.1f} | {err:.1e} |")
