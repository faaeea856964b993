"""cuDNN's MoE grouped matmul (gather-on-load / scatter-on-store modes, and its weight-gradient op) against
``torch._grouped_mm`` and a dense matmul of the same FLOPs, for the MoE layer's shapes (8 experts, top-2, d 768,
expert width 1536, the up projection carrying its bias as an extra row: K = 776), at 8k and 32k tokens; each call
timed as a CUDA-graph replay. Needs NVIDIA's cudnn frontend (see scripts/gpu_cudnn_causal_band.py):

    PYTHONPATH=src:<cudnn frontend> python3 scripts/gpu_moe_gemm_probe.py
"""
import sys
import torch
sys.path.insert(0, "src")
import cudnn
from cudnn.gemm.ops.moe_grouped_matmul import moe_grouped_matmul
from sadiffuseq.bench import graph_time_ms

print("cudnn backend", cudnn.backend_version(), "torch", torch.__version__)
dev, dt = "cuda", torch.bfloat16
E, k, d, F = 8, 2, 768, 1536
Kin = d + 8

def flops(m, kk, n):
    return 2 * m * kk * n

def t(fn, name, fl):
    try:
        ms = graph_time_ms(fn, reps=30)
        print(f"  {name:55s} {ms*1e3:8.1f} us  {fl/ms/1e9:6.0f} TFLOP/s")
        return ms
    except Exception as e:
        print(f"  {name:55s} FAILED {type(e).__name__}: {str(e)[:300]}")
        return None

for S in (8192, 32768):
    print(f"\nS={S}")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(S, Kin, device=dev, dtype=dt, generator=g)
    logits = torch.randn(S, E, device=dev, generator=g)
    top = logits.topk(k, dim=1).indices
    flat = top.reshape(-1)
    order = torch.argsort(flat.to(torch.uint8), stable=True)
    tok = (order // k).int()
    ks = (order % k).int()
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).int()
    fto = torch.cat([torch.zeros(1, dtype=torch.int32, device=dev), offs]).view(E + 1, 1, 1)
    W1 = torch.randn(E, Kin, F, device=dev, dtype=dt, generator=g) * 0.03
    W2 = torch.randn(E, F, d, device=dev, dtype=dt, generator=g) * 0.03
    W1c = W1.transpose(1, 2).contiguous().transpose(1, 2)  # column-major inner dims
    W2c = W2.transpose(1, 2).contiguous().transpose(1, 2)
    xs = x[tok.long()]
    M = xs.shape[0]
    h = torch.randn(M, F, device=dev, dtype=dt, generator=g)
    dh = torch.randn(M, F, device=dev, dtype=dt, generator=g)
    dy = torch.randn(M, d, device=dev, dtype=dt, generator=g)
    ref_up = torch._grouped_mm(xs, W1, offs=offs)
    ref_down = torch._grouped_mm(h, W2, offs=offs)
    Wd = torch.randn(Kin, 2 * F, device=dev, dtype=dt, generator=g)
    t(lambda: x @ Wd, "dense mm x(S,776)@(776,3072)", flops(S, Kin, 2 * F))
    t(lambda: torch._grouped_mm(xs, W1, offs=offs), "torch grouped up xs@W1", flops(M, Kin, F))
    t(lambda: x[tok.long()], "gather x[tok]", 1)
    for wname, w1 in (("row", W1), ("col", W1c)):
        try:
            out = moe_grouped_matmul(x.view(1, S, Kin), w1, fto, token_index=tok.view(1, M, 1), mode="gather")
            print(f"  cudnn gather up ({wname}) max err {(out[0].float() - ref_up.float()).abs().max().item():.4f}")
        except Exception as e:
            print(f"  cudnn gather up ({wname}) FAILED {type(e).__name__}: {str(e)[:400]}")
            continue
        t(lambda: moe_grouped_matmul(x.view(1, S, Kin), w1, fto, token_index=tok.view(1, M, 1), mode="gather"),
          f"cudnn gather up ({wname})", flops(M, Kin, F))
        t(lambda: moe_grouped_matmul(xs.view(1, M, Kin), w1, fto, mode="none"), f"cudnn none up ({wname})",
          flops(M, Kin, F))
    t(lambda: torch._grouped_mm(h, W2, offs=offs), "torch grouped down h@W2", flops(M, F, d))
    for wname, w2 in (("row", W2), ("col", W2c)):
        try:
            out = moe_grouped_matmul(h.view(1, M, F), w2, fto, token_index=tok.view(1, M, 1),
                                     token_ks=ks.view(1, M, 1), mode="scatter", top_k=k)
            want = torch.empty(S * k, d, device=dev, dtype=dt)
            want[(tok.long() * k + ks.long())] = ref_down
            print(f"  cudnn scatter down ({wname}) max err {(out[0].float() - want.float()).abs().max().item():.4f}")
        except Exception as e:
            print(f"  cudnn scatter down ({wname}) FAILED {type(e).__name__}: {str(e)[:400]}")
            continue
        t(lambda: moe_grouped_matmul(h.view(1, M, F), w2, fto, token_index=tok.view(1, M, 1),
                                     token_ks=ks.view(1, M, 1), mode="scatter", top_k=k),
          f"cudnn scatter down ({wname})", flops(M, F, d))
    # weight gradients: dW1 = xs^T dh (K-grouped)
    t(lambda: torch._grouped_mm(xs.t(), dh, offs=offs), "torch grouped dW1 xs^T@dh", flops(M, Kin, F))
    t(lambda: xs.t() @ dh, "dense mm xs^T@dh (same flops, one group)", flops(M, Kin, F))
    # input grads: dxs = dh @ W1^T (M-grouped, transposed weights)
    t(lambda: torch._grouped_mm(dh, W1.transpose(1, 2), offs=offs), "torch grouped dX dh@W1^T", flops(M, F, Kin))
    try:
        gr = cudnn.pygraph(intermediate_data_type=cudnn.data_type.BFLOAT16, compute_data_type=cudnn.data_type.FLOAT)
        dout_t = gr.tensor(name="dout", dim=[1, M, F], stride=[M * F, F, 1], data_type=cudnn.data_type.BFLOAT16)
        tok_t = gr.tensor(name="tok", dim=[1, M, Kin], stride=[M * Kin, Kin, 1], data_type=cudnn.data_type.BFLOAT16)
        f_t = gr.tensor(name="fto", dim=[E + 1, 1, 1], stride=[1, 1, 1], data_type=cudnn.data_type.INT32)
        dw = gr.moe_grouped_matmul_bwd(doutput=dout_t, token=tok_t, first_token_offset=f_t,
                                       compute_data_type=cudnn.data_type.FLOAT, name="bwd")
        dw.set_output(True).set_dim([E, Kin, F]).set_stride([Kin * F, F, 1]).set_data_type(cudnn.data_type.BFLOAT16)
        gr.validate(); gr.build_operation_graph(); gr.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        gr.check_support(); gr.build_plans()
        ws = torch.empty(gr.get_workspace_size(), dtype=torch.uint8, device=dev)
        dW = torch.empty(E, Kin, F, device=dev, dtype=dt)
        pack = {dout_t: dh.view(1, M, F), tok_t: xs.view(1, M, Kin), f_t: fto, dw: dW}
        gr.execute(pack, ws)
        ref = torch._grouped_mm(xs.t(), dh, offs=offs)
        print(f"  cudnn bwd dW1 max err {(dW.float() - ref.float()).abs().max().item():.4f} (ref max {ref.abs().max().item():.1f})")
        t(lambda: gr.execute(pack, ws), "cudnn moe_grouped_matmul_bwd dW1", flops(M, Kin, F))
    except Exception as e:
        print("  cudnn bwd FAILED", type(e).__name__, str(e)[:500])
