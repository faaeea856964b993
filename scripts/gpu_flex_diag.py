"""Where does the sparse attention time go? One group of heads at a time, forward and forward+backward.

Usage: python3 scripts/gpu_flex_diag.py [LENGTH] [--autotune]   (--autotune adds max-autotune kernels)
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from sadiffuseq.attention import patterns
from sadiffuseq.attention.backends import _compiled_flex, block_density, block_mask_for, flex_attention
from sadiffuseq.bench import cuda_time_ms

L = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
H, hd, w = 8, 64, 256
flex = _compiled_flex()
dev = torch.device("cuda")
q, k, v = (torch.randn(1, H, L, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)


def fb(fn):
    def step():
        fn().backward(g)
        q.grad = k.grad = v.grad = None
    return step


rows = []
rows.append(("dense sdpa", 1.0, cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v)),
             cuda_time_ms(fb(lambda: F.scaled_dot_product_attention(q, k, v)))))
full = create_block_mask(lambda b, h, qi, ki: qi >= 0, None, None, L, L, device=dev)
rows.append(("flex, all tiles", 1.0, cuda_time_ms(lambda: flex(q, k, v, block_mask=full)),
             cuda_time_ms(fb(lambda: flex(q, k, v, block_mask=full)))))
sw = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= w, None, None, L, L, device=dev)
rows.append(("flex, window only", block_density(sw), cuda_time_ms(lambda: flex(q, k, v, block_mask=sw)),
             cuda_time_ms(fb(lambda: flex(q, k, v, block_mask=sw)))))
isg = patterns.global_positions(L, 16, 0, device=dev)
for d in (1, 4):
    lay = patterns.make_layout(isg, d)
    bm = block_mask_for(lay, w, L)
    rows.append((f"ours d={d} (permuted)", block_density(bm), cuda_time_ms(lambda: flex(q, k, v, block_mask=bm)),
                 cuda_time_ms(fb(lambda: flex(q, k, v, block_mask=bm)))))
    for schedule in ("copies", "split"):
        rows.append((f"ours d={d}, globals {schedule}", float("nan"),
                     cuda_time_ms(lambda: flex_attention(q, k, v, lay, w, schedule=schedule)),
                     cuda_time_ms(fb(lambda: flex_attention(q, k, v, lay, w, schedule=schedule)))))
if "--autotune" in sys.argv:  # the same kernels with Inductor's block-size / warp / stage search
    from torch.nn.attention.flex_attention import flex_attention as raw_flex

    tuned = torch.compile(raw_flex, dynamic=False, mode="max-autotune-no-cudagraphs")
    bm1 = block_mask_for(patterns.make_layout(isg, 1), w, L)
    for name, bm in (("window only, autotuned", sw), ("ours d=1, autotuned", bm1)):
        rows.append((name, block_density(bm), cuda_time_ms(lambda: tuned(q, k, v, block_mask=bm)),
                     cuda_time_ms(fb(lambda: tuned(q, k, v, block_mask=bm)))))
print(f"L={L}, H={H}, hd={hd}, bf16")
print(f"{'variant':<24}{'density':>9}{'fwd ms':>9}{'fwd+bwd ms':>12}")
for name, dens, f, fbm in rows:
    print(f"{name:<24}{dens:>9.4f}{f:>9.3f}{fbm:>12.3f}")
