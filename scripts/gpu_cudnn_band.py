"""cuDNN's sliding-window attention (diagonal band) on the band alone, against dense SDPA.

Needs NVIDIA's cudnn-frontend Python package (not a dependency of this project), e.g. a wheel installed with
`pip install --no-deps --target /tmp/cdnn nvidia_cudnn_frontend-*.whl`, then

    python3 scripts/gpu_cudnn_band.py

Same checks and timings as scripts/gpu_band_kernels.py, through cudnn-frontend's graph API (forward with
diagonal_band_left_bound = w + 1, right bound w; backward likewise).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, "/tmp/cdnn")  # where the cudnn-frontend wheel was unpacked (see above)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import cudnn  # noqa: E402

from sadiffuseq.bench import cuda_time_ms  # noqa: E402
import torch.nn.functional as F
print(torch.__version__, "cudnn backend", cudnn.backend_version(), torch.backends.cudnn.version())
dev = "cuda"
handle = cudnn.create_handle()
BF = cudnn.data_type.BFLOAT16

class Band:
    def __init__(self, q, w, scale):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        B, H, S, D = q.shape
        g = cudnn.pygraph(io_data_type=BF, intermediate_data_type=cudnn.data_type.FLOAT, compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        self.qt, self.kt, self.vt = (g.tensor(name=n, dim=list(q.shape), stride=list(q.stride()), data_type=BF) for n in "qkv")
        o, st = g.sdpa(name="f", q=self.qt, k=self.kt, v=self.vt, generate_stats=True, attn_scale=scale,
                       diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_left_bound=w + 1, diagonal_band_right_bound=w)
        o.set_output(True).set_dim([B, H, S, D]).set_stride([H * S * D, S * D, D, 1]).set_data_type(BF)
        st.set_output(True).set_dim([B, H, S, 1]).set_stride([H * S, S, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        self.ot, self.st = o, st
        g.validate(); g.build_operation_graph(); g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]); g.check_support(); g.build_plans()
        self.g = g
        self.ws = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device=dev)
        gb = cudnn.pygraph(io_data_type=BF, intermediate_data_type=cudnn.data_type.FLOAT, compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        self.bq, self.bk, self.bv = (gb.tensor(name=n, dim=list(q.shape), stride=list(q.stride()), data_type=BF) for n in "qkv")
        self.bo = gb.tensor(name="o", dim=[B, H, S, D], stride=[H * S * D, S * D, D, 1], data_type=BF)
        self.bdo = gb.tensor(name="do", dim=[B, H, S, D], stride=[H * S * D, S * D, D, 1], data_type=BF)
        self.bst = gb.tensor(name="st", dim=[B, H, S, 1], stride=[H * S, S, 1, 1], data_type=cudnn.data_type.FLOAT)
        dq, dk, dv = gb.sdpa_backward(name="b", q=self.bq, k=self.bk, v=self.bv, o=self.bo, dO=self.bdo, stats=self.bst, attn_scale=scale,
                                      diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_left_bound=w + 1, diagonal_band_right_bound=w)
        for t in (dq, dk, dv):
            t.set_output(True).set_dim([B, H, S, D]).set_stride([H * S * D, S * D, D, 1]).set_data_type(BF)
        self.dq, self.dk, self.dv = dq, dk, dv
        gb.validate(); gb.build_operation_graph(); gb.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]); gb.check_support(); gb.build_plans()
        self.gb = gb
        self.wsb = torch.empty(gb.get_workspace_size(), dtype=torch.uint8, device=dev)
        self.shape = (B, H, S, D)

    def fwd(self, q, k, v):
        o = torch.empty(self.shape, device=dev, dtype=torch.bfloat16)
        st = torch.empty(self.shape[:3] + (1,), device=dev, dtype=torch.float32)
        self.g.execute({self.qt: q, self.kt: k, self.vt: v, self.ot: o, self.st: st}, self.ws, handle=handle)
        return o, st

    def bwd(self, do, q, k, v, o, st):
        dq, dk, dv = (torch.empty(self.shape, device=dev, dtype=torch.bfloat16) for _ in range(3))
        self.gb.execute({self.bq: q, self.bk: k, self.bv: v, self.bo: o, self.bdo: do, self.bst: st, self.dq: dq, self.dk: dk, self.dv: dv}, self.wsb, handle=handle)
        return dq, dk, dv

# correctness
L, H, D, w = 1000, 4, 64, 37
x = torch.randn(3, 1, L, H, D, device=dev, dtype=torch.bfloat16)
q, k, v = (t.transpose(1, 2) for t in x)  # (1,H,L,D) strided BSHD
b = Band(q, w, D ** -0.5)
o, st = b.fwd(q, k, v)
i = torch.arange(L, device=dev)
m = (i[:, None] - i[None, :]).abs() <= w
qf, kf, vf = (t.float().detach().requires_grad_() for t in (q, k, v))
ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=m)
print("cudnn band fwd err", (o.float() - ref).abs().max().item())
s = (qf @ kf.transpose(-1, -2)) * D ** -0.5
lse_ref = s.masked_fill(~m, float("-inf")).logsumexp(-1)
print("lse err", (st[..., 0] - lse_ref).abs().max().item())
do = torch.randn_like(o)
ref.backward(do.float())
dq, dk, dv = b.bwd(do, q, k, v, o, st)
print("cudnn band bwd err", max((a.float() - t.grad).abs().max().item() for a, t in ((dq, qf), (dk, kf), (dv, vf))))
# class view
d = 4
qc = x[0][0].view(L // d, d, H, D).permute(1, 2, 0, 3)  # (d, H, L/d, D)
try:
    bc = Band(qc, w // d, D ** -0.5)
    kc = x[1][0].view(L // d, d, H, D).permute(1, 2, 0, 3); vc = x[2][0].view(L // d, d, H, D).permute(1, 2, 0, 3)
    oc, _ = bc.fwd(qc, kc, vc)
    md = ((i[:, None] - i[None, :]) % d == 0) & ((i[:, None] - i[None, :]).abs() <= (w // d) * d)
    refd = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=md)  # (1,H,L,D)
    print("class view err", (oc.permute(2, 0, 1, 3).reshape(L, H, D).float() - refd[0].transpose(0, 1)).abs().max().item())
except Exception as e:
    print("class view failed:", repr(e)[:300])

def timeit(fn, reps=30):
    return cuda_time_ms(fn, warmup=5, reps=reps)

for L in (8192, 32768, 131072):
    H = 16
    x = torch.randn(3, 1, L, H, 64, device=dev, dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x)
    do = torch.randn(1, H, L, 64, device=dev, dtype=torch.bfloat16)
    b = Band(q, 256, 0.125)
    def band():
        o, st = b.fwd(q, k, v)
        b.bwd(do, q, k, v, o, st)
    def band_fwd():
        b.fwd(q, k, v)
    qh, kh, vh = (t.detach().requires_grad_() for t in (q, k, v))
    def dense():
        F.scaled_dot_product_attention(qh, kh, vh).backward(do)
    half = [t[0, :, 8:].view(L // 4, 4, 8, 64).permute(1, 2, 0, 3) for t in x]  # dilated heads, class view
    bh = Band(x[0][:, :, :8].transpose(1, 2), 256, 0.125)
    try:
        bd = Band(half[0], 256, 0.125)
        dh = torch.randn(4, 8, L // 4, 64, device=dev, dtype=torch.bfloat16)
        def mixed():
            o, st = bh.fwd(q[:, :8], k[:, :8], v[:, :8]); bh.bwd(do[:, :8], q[:, :8], k[:, :8], v[:, :8], o, st)
            o, st = bd.fwd(*half); bd.bwd(dh, *half, o, st)
        tm = timeit(mixed)
    except Exception as e:
        print("mixed failed", repr(e)[:200]); tm = float("nan")
    tb = timeit(band); tf = timeit(band_fwd); td = timeit(dense, 10 if L > 40000 else 30)
    nb = L // 128
    dens = sum(min(nb - 1, r + 2) - max(0, r - 2) + 1 for r in range(nb)) / nb / nb
    print(f"L={L} dense {td:.3f} ms  cuDNN band fwd+bwd {tb:.3f} (fwd {tf:.3f}) mixed-view {tm:.3f}  speedup {td/tb:.1f}x  window density {dens:.4f} eff {dens*td/tb:.3f}")
