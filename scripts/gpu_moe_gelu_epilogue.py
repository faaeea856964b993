"""The MoE layer's up-projection bias + GELU in the grouped matmuls' epilogues (``moe_gemm.up_gelu``,
``moe_gemm.down_input_grad_gelu``) against the matmul followed by the kernel of its own (``moe_kernels``), forward
and backward, at 8k and 32k tokens (8 experts, top-2, d 768, width 1536, bf16; CUDA-graph replays), for several
epilogue settings (grid: 0 a program per tile, 1 persistent, 2 persistent and warp-specialised; TMA stores; the
epilogue on 1, 2 or 4 slices of the tile's columns; pipeline stages), each checked against the separate path.

    PYTHONPATH=src python3 scripts/gpu_moe_gelu_epilogue.py
"""
import torch
from sadiffuseq import moe_gemm as mg
from sadiffuseq.bench import graph_time_ms
ops = torch.ops.sadiffuseq
E, d, H, dt = 8, 768, 1536, torch.bfloat16
CANDS = [(1, 1, 4, 3), (1, 1, 2, 3), (1, 1, 1, 3), (2, 1, 4, 3), (2, 1, 2, 3), (0, 1, 4, 3), (0, 1, 2, 3), (1, 0, 4, 3), (1, 1, 4, 4)]
res = {}
for N in (8192, 32768):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, d, device="cuda", generator=g)
    router = torch.randn(E, d, device="cuda", generator=g) * d**-0.5
    counts = torch.bincount((x @ router.t()).topk(2, dim=1).indices.reshape(-1), minlength=E)
    M = int(counts.sum()); ends = counts.cumsum(0).int()
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dt)
    rows, grad, u = rnd(M, d), rnd(M, d), rnd(M, H)
    wu, wd, bu = (rnd(E, d, H) * 0.03), (rnd(E, H, d) * 0.03), rnd(E, H)
    sep_f = lambda: ops.moe_bias_gelu(ops.moe_gmm(rows, wu, ends, False, "up"), bu, ends)
    sep_b = lambda: ops.moe_bias_gelu_backward(ops.moe_gmm(grad, wd, ends, True, "down_input_grad"), u, bu, ends)
    want_f, want_b = sep_f(), sep_b()
    print(f"{N}: separate forward {graph_time_ms(sep_f, reps=50)*1e3:.1f} us, backward {graph_time_ms(sep_b, reps=50)*1e3:.1f} us", flush=True)
    for grid, tma, sub, stages in CANDS:
        for op, fn, want, base in (("up_gelu", lambda: ops.moe_gmm_up_gelu(rows, wu, bu, ends), want_f, mg.LAUNCH["up"]),
                                   ("down_input_grad_gelu", lambda: ops.moe_gmm_down_input_grad_gelu(grad, wd, u, bu, ends, 1), want_b, mg.LAUNCH["down_input_grad"])):
            mg.LAUNCH[op] = base[:4] + (stages, base[5], grid, tma, sub)
            try:
                got = fn()
                if op == "up_gelu":
                    err = ((got[1].float() - want.float()).abs().max() / want.float().abs().max()).item()
                else:
                    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, want))
                t = graph_time_ms(fn, reps=50) * 1e3
            except Exception as e:
                print(f"  {op} {mg.LAUNCH[op]}: {type(e).__name__} {str(e)[:150]}", flush=True); t, err = float("inf"), 0
            res.setdefault((op, (grid, tma, sub, stages)), []).append(t)
            print(f"  {op:22s} grid {grid} tma {tma} sub {sub} stages {stages}: {t:7.1f} us  err {err:.2g}", flush=True)
print("\nbest (sum over lengths):")
for op in ("up_gelu", "down_input_grad_gelu"):
    c = {k[1]: v for k, v in res.items() if k[0] == op}
    b = min(c, key=lambda k: sum(c[k]))
    print(op, b, c[b])
