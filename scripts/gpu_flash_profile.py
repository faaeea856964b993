"""Profile the flash backend on the benchmark pattern: wall time, the profiler's kernel table, queued time.

    python3 scripts/gpu_flash_profile.py LENGTH [KERNEL]

KERNEL: the band kernel, cudnn or fa2 (default cudnn; needs NVIDIA's cudnn frontend importable, see
scripts/gpu_cudnn_causal_band.py). 16 heads × 64, window ±256, 8 heads dilated ×4, 16 global tokens, bf16, one row,
forward + backward of the attention alone, five profiled steps.
"""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sadiffuseq.attention.layer import SparseSelfAttention  # noqa: E402
from sadiffuseq.bench import pattern_config, queued_time_ms  # noqa: E402

L = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
layer = SparseSelfAttention(pattern_config(16, 64, 256, 8, 4, 16, backend="flash")).cuda()
layer.flash_kernel = sys.argv[2] if len(sys.argv) > 2 else "cudnn"
q, k, v = (torch.randn(1, 16, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)


def step():
    layer.attend(q, k, v).backward(g)
    q.grad = k.grad = v.grad = None


for _ in range(3):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(5):
    step()
torch.cuda.synchronize()
print(f"L={L} kernel={layer.flash_kernel}: wall ms/step {(time.perf_counter() - t) / 5 * 1e3:.3f}")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=50))
print(f"queued ms/step {queued_time_ms(step, 20):.3f}")
