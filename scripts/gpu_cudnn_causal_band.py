"""Which cuDNN band masks have a backward that skips the tiles outside the band?

Needs NVIDIA's cudnn-frontend Python package (not a dependency of this project), e.g. a wheel unpacked with
`pip install --no-deps --target /tmp/cdnn nvidia_cudnn_frontend-*.whl`, then

    python3 scripts/gpu_cudnn_causal_band.py

Checks three masks against a dense fp32 reference on 1,000 tokens (causal band, causal band over keys shifted by
w with cuDNN's padding mask, two-sided band), then times forward and backward of each for 16 heads × 64 at 8k and
32k tokens, window 256, bf16, next to dense SDPA, and tries a CUDA-graph capture of one call.
"""
import sys
sys.path.insert(0, "/tmp/cdnn"); sys.path.insert(0, "src")
import torch, cudnn
import torch.nn.functional as F
from sadiffuseq.bench import cuda_time_ms
print(torch.__version__, "cudnn", cudnn.backend_version(), torch.backends.cudnn.version(), flush=True)
dev = "cuda"; handle = cudnn.create_handle(); BF = cudnn.data_type.BFLOAT16; FL = cudnn.data_type.FLOAT

class Band:
    def __init__(self, qs, ks, left, right, scale, seq_kv=None):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        B, H, S, D = qs.shape; Skv = ks.shape[2]
        mk = lambda: cudnn.pygraph(io_data_type=BF, intermediate_data_type=FL, compute_data_type=FL, handle=handle)
        kw = dict(attn_scale=scale, diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_left_bound=left, diagonal_band_right_bound=right)
        g = mk()
        self.qt = g.tensor(name="q", dim=list(qs.shape), stride=list(qs.stride()), data_type=BF)
        self.kt = g.tensor(name="k", dim=list(ks.shape), stride=list(ks.stride()), data_type=BF)
        self.vt = g.tensor(name="v", dim=list(ks.shape), stride=list(ks.stride()), data_type=BF)
        extra = {}
        self.pad = seq_kv is not None
        if self.pad:
            self.sq = g.tensor(name="sq", dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
            self.skv = g.tensor(name="skv", dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
            extra = dict(use_padding_mask=True, seq_len_q=self.sq, seq_len_kv=self.skv)
            self.sqv = torch.full((B, 1, 1, 1), S, dtype=torch.int32, device=dev)
            self.skvv = torch.full((B, 1, 1, 1), seq_kv, dtype=torch.int32, device=dev)
        o, st = g.sdpa(name="f", q=self.qt, k=self.kt, v=self.vt, generate_stats=True, **kw, **extra)
        o.set_output(True).set_dim([B, H, S, D]).set_stride([H * S * D, S * D, D, 1]).set_data_type(BF)
        st.set_output(True).set_dim([B, H, S, 1]).set_stride([H * S, S, 1, 1]).set_data_type(FL)
        self.ot, self.st = o, st
        g.validate(); g.build_operation_graph(); g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]); g.check_support(); g.build_plans()
        self.g = g; self.ws = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device=dev)
        gb = mk()
        self.bq = gb.tensor(name="q", dim=list(qs.shape), stride=list(qs.stride()), data_type=BF)
        self.bk = gb.tensor(name="k", dim=list(ks.shape), stride=list(ks.stride()), data_type=BF)
        self.bv = gb.tensor(name="v", dim=list(ks.shape), stride=list(ks.stride()), data_type=BF)
        self.bo = gb.tensor(name="o", dim=[B, H, S, D], stride=[H * S * D, S * D, D, 1], data_type=BF)
        self.bdo = gb.tensor(name="do", dim=[B, H, S, D], stride=[H * S * D, S * D, D, 1], data_type=BF)
        self.bst = gb.tensor(name="st", dim=[B, H, S, 1], stride=[H * S, S, 1, 1], data_type=FL)
        extra_b = {}
        if self.pad:
            self.bsq = gb.tensor(name="sq", dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
            self.bskv = gb.tensor(name="skv", dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
            extra_b = dict(use_padding_mask=True, seq_len_q=self.bsq, seq_len_kv=self.bskv)
        dq, dk, dv = gb.sdpa_backward(name="b", q=self.bq, k=self.bk, v=self.bv, o=self.bo, dO=self.bdo, stats=self.bst, **kw, **extra_b)
        dq.set_output(True).set_dim([B, H, S, D]).set_stride([H * S * D, S * D, D, 1]).set_data_type(BF)
        for t in (dk, dv):
            t.set_output(True).set_dim(list(ks.shape)).set_stride([H * Skv * D, Skv * D, D, 1]).set_data_type(BF)
        self.dq, self.dk, self.dv = dq, dk, dv
        gb.validate(); gb.build_operation_graph(); gb.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]); gb.check_support(); gb.build_plans()
        self.gb = gb; self.wsb = torch.empty(gb.get_workspace_size(), dtype=torch.uint8, device=dev)
        self.shape = (B, H, S, D); self.kshape = tuple(ks.shape)

    def fwd(self, q, k, v):
        o = torch.empty(self.shape, device=dev, dtype=torch.bfloat16)
        st = torch.empty(self.shape[:3] + (1,), device=dev, dtype=torch.float32)
        p = {self.qt: q, self.kt: k, self.vt: v, self.ot: o, self.st: st}
        if self.pad: p.update({self.sq: self.sqv, self.skv: self.skvv})
        self.g.execute(p, self.ws, handle=handle)
        return o, st

    def bwd(self, do, q, k, v, o, st):
        dq = torch.empty(self.shape, device=dev, dtype=torch.bfloat16)
        dk, dv = (torch.empty(self.kshape, device=dev, dtype=torch.bfloat16) for _ in range(2))
        p = {self.bq: q, self.bk: k, self.bv: v, self.bo: o, self.bdo: do, self.bst: st, self.dq: dq, self.dk: dk, self.dv: dv}
        if self.pad: p.update({self.bsq: self.sqv, self.bskv: self.skvv})
        self.gb.execute(p, self.wsb, handle=handle)
        return dq, dk, dv

def check(L, w, left, right, offset=0):
    H, D = 4, 64
    x = torch.randn(3, 1, L, H, D, device=dev, dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x)
    ko, vo = k[:, :, offset:], v[:, :, offset:]
    b = Band(q, ko, left, right, D ** -0.5, seq_kv=(L - offset) if offset else None)
    o, st = b.fwd(q, ko, vo)
    i = torch.arange(L, device=dev); j = torch.arange(L - offset, device=dev) + offset
    m = (j[None, :] - offset > i[:, None] - left) & (j[None, :] - offset <= i[:, None] + right)
    qf, kf, vf = (t.float().detach().requires_grad_() for t in (q, ko, vo))
    s = (qf @ kf.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(~m, float("-inf"))
    lse = s.logsumexp(-1)
    ref = torch.nan_to_num(s.softmax(-1)) @ vf
    ok = m.any(-1)
    do = torch.randn_like(o)
    (ref * do.float()).sum().backward()
    dq, dk, dv = b.bwd(do, q, ko, vo, o, st)
    e = [(o.float() - ref)[..., ok, :].abs().max().item(), (st[..., 0] - lse)[..., ok].abs().max().item()] + [(a.float() - t.grad).abs().max().item() for a, t in ((dq, qf), (dk, kf), (dv, vf))]
    print(f"check L={L} w={w} left={left} right={right} offset={offset}: errs o/lse/dq/dk/dv", [f"{x:.4f}" for x in e],
          "empty rows:", (~ok).sum().item(), "o there", o[..., ~ok, :].float().abs().max().item() if (~ok).any() else None, "lse there", st[0, 0, ~ok, 0].tolist()[:3] if (~ok).any() else None, flush=True)

for args in [(1000, 37, 38, 0, 0), (1000, 37, 37, 0, 37), (1000, 37, 38, 37, 0)]:
    try: check(*args)
    except Exception as ex: print("check failed", args, repr(ex)[:400], flush=True)

rows = []
for L in (8192, 32768):
    H, w = 16, 256
    x = torch.randn(3, 1, L, H, 64, device=dev, dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x)
    do = torch.randn(1, H, L, 64, device=dev, dtype=torch.bfloat16)
    qh, kh, vh = (t.detach().requires_grad_() for t in (q, k, v))
    td = cuda_time_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh).backward(do), warmup=3, reps=10)
    res = {"L": L, "dense": td}
    for name, (left, right, off) in {"bidir": (w + 1, w, 0), "left_causal": (w + 1, 0, 0), "right_offset": (w, 0, w)}.items():
        try:
            ko, vo = k[:, :, off:], v[:, :, off:]
            b = Band(q, ko, left, right, 0.125, seq_kv=(L - off) if off else None)
            o, st = b.fwd(q, ko, vo)
            tf = cuda_time_ms(lambda: b.fwd(q, ko, vo), warmup=3, reps=20)
            tb = cuda_time_ms(lambda: b.bwd(do, q, ko, vo, o, st), warmup=3, reps=20)
            res[name] = (tf, tb)
        except Exception as ex:
            print("fail", name, repr(ex)[:300], flush=True)
    rows.append(res); print(res, flush=True)
# CUDA graph capture of one band call
try:
    L = 8192; x = torch.randn(3, 1, L, 16, 64, device=dev, dtype=torch.bfloat16); q, k, v = (t.transpose(1, 2) for t in x)
    b = Band(q, k, 257, 0, 0.125)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cudnn.set_stream(handle=handle, stream=s.cuda_stream); b.fwd(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        og, sg = b.fwd(q, k, v)
    gr.replay(); torch.cuda.synchronize()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    o2, _ = b.fwd(q, k, v)
    print("graph capture ok, diff", (og.float() - o2.float()).abs().max().item())
except Exception as ex:
    print("graph capture failed", repr(ex)[:300])
print("\n| L | dense | variant fwd / bwd ms |")
for r in rows:
    print(r["L"], f"{r['dense']:.3f}", {k: tuple(round(t, 3) for t in v) for k, v in r.items() if isinstance(v, tuple)})
