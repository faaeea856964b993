"""Profile the flash backend on the benchmark pattern: wall time, CUDA-graph replay time, kernels per step.

    python3 scripts/gpu_flash_profile.py LENGTH [KERNEL]

KERNEL: the band kernel, cudnn or fa2 (default cudnn; needs NVIDIA's cudnn frontend importable, see
scripts/gpu_cudnn_causal_band.py). 16 heads × 64, window ±256, 8 heads dilated ×4, 16 global tokens, bf16, one row,
forward + backward of the attention alone on (1, 16, L, 64) inputs, as `sadiffuseq bench attention` times it; five
profiled steps, the kernels listed with their GPU time per step.
"""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sadiffuseq.attention.layer import SparseSelfAttention  # noqa: E402
from sadiffuseq.bench import _fwd_bwd, graph_time_ms, pattern_config, queued_time_ms  # noqa: E402

L = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
layer = SparseSelfAttention(pattern_config(16, 64, 256, 8, 4, 16, backend="flash")).cuda()
layer.flash_kernel = sys.argv[2] if len(sys.argv) > 2 else "cudnn"
q, k, v = (torch.randn(1, 16, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
step = _fwd_bwd(layer.attend, q, k, v, torch.randn_like(q))

for _ in range(3):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(5):
    step()
torch.cuda.synchronize()
print(f"L={L} kernel={layer.flash_kernel}: wall ms/step {(time.perf_counter() - t) / 5 * 1e3:.3f}, "
      f"queued {queued_time_ms(step, 20):.3f}, CUDA-graph replay {graph_time_ms(step, 20):.3f}")
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
events = sorted(p.key_averages(), key=lambda e: -e.self_device_time_total)
for e in events[:60]:
    if e.self_device_time_total > 0 and not e.key.startswith("## Call"):
        print(f"{e.self_device_time_total / 5:9.1f} us/step {e.count / 5:5.1f} calls/step  {e.key[:100]}")
