"""Where does the MoE layer's time go? Profiles forward+backward of one MoE feed-forward and of the dense FFN of
the same active FLOPs on the GPU (bf16 autocast) and prints the kernels that take the most GPU time.

Usage: python3 scripts/gpu_moe_profile.py [TOKENS] [--compile MODE]   (default 32768 tokens, eager)
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sadiffuseq.config import ModelConfig
from sadiffuseq.model import DenseFFN
from sadiffuseq.moe import MoEFFN

parser = argparse.ArgumentParser()
parser.add_argument("tokens", type=int, nargs="?", default=32768)
parser.add_argument("--compile", default="", help="torch.compile mode for both layers (default: eager)")
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--brief", action="store_true", help="one line per GPU kernel instead of the profiler's table")
args = parser.parse_args()
N, steps = args.tokens, args.steps
cfg = ModelConfig(d_model=768, ffn="moe", moe_experts=8, moe_top_k=2)
dev = torch.device("cuda")
for name, layer in (("dense", DenseFFN(cfg)), ("moe", MoEFFN(cfg))):
    layer = layer.to(dev).train()
    options = {"mode": args.compile} if args.compile not in ("", "default") else {}
    fn = layer
    if args.compile:  # as a compiled model runs them
        fn = layer.compile_routed(**options) if name == "moe" else torch.compile(layer, **options)
    x = torch.randn(1, N, 768, device=dev, requires_grad=True)
    grad = torch.randn(1, N, 768, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.backward(grad.to(y.dtype))
        layer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels) / steps
    print(f"=== {name}, {N} tokens, compile={args.compile or 'eager'}: {gpu_us / 1000:.3f} ms of GPU time per step")
    if args.brief:  # one line per kernel: GPU time per step, launches per step, name
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:40]:
            print(f"  {e.self_device_time_total / steps:8.1f} us  x{e.count / steps:4.1f}  {e.key[:110]}")
    else:
        print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
