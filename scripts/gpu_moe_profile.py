"""Where does the MoE layer's time go? Profiles forward+backward of one MoE feed-forward and of the dense FFN of
the same active FLOPs on the GPU (bf16 autocast) and prints the kernels that take the most GPU time.

Usage: python3 scripts/gpu_moe_profile.py [TOKENS]   (default 32768)
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sadiffuseq.config import ModelConfig
from sadiffuseq.model import DenseFFN
from sadiffuseq.moe import MoEFFN

N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
cfg = ModelConfig(d_model=768, ffn="moe", moe_experts=8, moe_top_k=2)
dev = torch.device("cuda")
for name, layer in (("dense", DenseFFN(cfg)), ("moe", MoEFFN(cfg))):
    layer = layer.to(dev).train()
    x = torch.randn(1, N, 768, device=dev, requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"=== {name}, {N} tokens, 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
