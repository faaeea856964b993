"""FlashAttention-2's sliding-window kernels (as PyTorch ships them) on the band alone, against dense SDPA.

    python3 scripts/gpu_band_kernels.py

Checks the window semantics and the strided residue-class view against a masked dense reference, then times
forward + backward (bf16, batch 1, 16 heads × 64, window ±256) of: every head on the plain band; half the heads
plain and half on the residue classes mod 4 (the benchmark pattern without its global tokens). "eff" is the
band's block density (128×128 tiles) times the dense time, over the band's time.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sadiffuseq.attention.flash import _fa2_backward, _fa2_forward  # noqa: E402
from sadiffuseq.bench import cuda_time_ms  # noqa: E402

dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())


def fa_fwd(q, k, v, w):
    o, lse, state = _fa2_forward(q, k, v, None, q.shape[1], w, q.shape[-1] ** -0.5)
    return o, lse, *state


def fa_bwd(do, q, k, v, o, lse, rng, unused, w):
    return _fa2_backward(do, q, k, v, o, lse, None, q.shape[1], w, q.shape[-1] ** -0.5, (rng, unused))


# correctness: band, strided class view
L, H, D, w, d = 1000, 4, 64, 37, 4
x = torch.randn(3, 1, L, H, D, device=dev, dtype=torch.bfloat16)
q, k, v = x[0], x[1], x[2]
o, lse, rng, un = fa_fwd(q, k, v, w)
i = torch.arange(L, device=dev)
m = (i[:, None] - i[None, :]).abs() <= w
ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), attn_mask=m).transpose(1, 2)
print("band fwd max err", (o.float() - ref).abs().max().item(), "lse shape", tuple(lse.shape), lse.dtype)
# class view: (d, L/d, H, D)
Lc = 1000 // d
qv = q.view(Lc, d, H, D).transpose(0, 1)
kv_ = k.view(Lc, d, H, D).transpose(0, 1)
vv = v.view(Lc, d, H, D).transpose(0, 1)
print("view strides", qv.stride())
try:
    oc, lsec, _, _ = fa_fwd(qv, kv_, vv, w // 4)
    md = ((i[:, None] - i[None, :]) % d == 0) & ((i[:, None] - i[None, :]).abs() <= (w // 4) * d)
    refd = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), attn_mask=md).transpose(1, 2)
    print("class view fwd max err", (oc.transpose(0, 1).reshape(L, H, D).float() - refd[0]).abs().max().item())
except Exception as e:
    print("class view failed", e)
# backward vs autograd of dense
do = torch.randn_like(o)
dq, dk, dv = fa_bwd(do, q, k, v, o, lse, rng, un, w)
qf, kf, vf = (t.float().transpose(1, 2).requires_grad_() for t in (q, k, v))
F.scaled_dot_product_attention(qf, kf, vf, attn_mask=m).backward(do.float().transpose(1, 2))
print("band bwd max err", max((a.float() - b.grad.transpose(1, 2)).abs().max().item() for a, b in ((dq, qf), (dk, kf), (dv, vf))))


def timeit(fn, reps=30):
    return cuda_time_ms(fn, warmup=5, reps=reps)

for L in (8192, 32768, 131072):
    H = 16
    x = torch.randn(3, 1, L, H, 64, device=dev, dtype=torch.bfloat16)
    q, k, v = x[0], x[1], x[2]
    do = torch.randn_like(q)
    def band():
        o, lse, rng, un = fa_fwd(q, k, v, 256)
        fa_bwd(do, q, k, v, o, lse, rng, un, 256)
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    doh = do.transpose(1, 2)
    def dense():
        F.scaled_dot_product_attention(qh, kh, vh).backward(doh)
    # half heads as class view (d=4), half heads plain
    def mixed():
        a = fa_fwd(q[:, :, :8], k[:, :, :8], v[:, :, :8], 256)
        fa_bwd(do[:, :, :8], q[:, :, :8], k[:, :, :8], v[:, :, :8], *a, 256)
        qc = q[:, :, 8:].view(L // 4, 4, 8, 64).transpose(0, 1)
        kc = k[:, :, 8:].view(L // 4, 4, 8, 64).transpose(0, 1)
        vc = v[:, :, 8:].view(L // 4, 4, 8, 64).transpose(0, 1)
        dc = do[:, :, 8:].view(L // 4, 4, 8, 64).transpose(0, 1)
        b = fa_fwd(qc, kc, vc, 256)
        fa_bwd(dc, qc, kc, vc, *b, 256)
    def band_fwd():
        fa_fwd(q, k, v, 256)
    tb = timeit(band); tm = timeit(mixed); tf = timeit(band_fwd)
    td = timeit(dense, 10 if L > 40000 else 30)
    nb = L // 128
    dens = sum(min(nb - 1, r + 2) - max(0, r - 2) + 1 for r in range(nb)) / nb / nb
    print(f"L={L} dense {td:.3f} ms  FA2 band fwd+bwd {tb:.3f} (fwd {tf:.3f}) mixed-view {tm:.3f}  speedup {td/tb:.1f}x  window density {dens:.4f} eff {dens*td/tb:.3f}")
