"""The bias + GELU kernels' erf: CUDA's erff (mode 0) against Abramowitz & Stegun's formula 7.1.26 on the fast
reciprocal, its exponential shared with the density (mode 1, what ``moe_kernels`` uses), and no arithmetic at all
(mode 2: the loads and stores alone, the memory-bound floor), forward and backward, for several launch settings at
8k and 32k tokens (8 experts near balance, width 1536, bf16; CUDA-graph replays); a plain copy for scale.

Modes 0 and 2 run ``moe_kernels``' own kernels with only ``_normal_cdf_and_pdf`` redefined: a copy of the module
with the other definition appended (and its custom ops renamed) is imported from a temporary file.

    PYTHONPATH=src python3 scripts/gpu_gelu_erf.py
"""
import importlib.util
import math
import tempfile

import torch

from sadiffuseq import moe_kernels
from sadiffuseq.bench import graph_time_ms

VARIANTS = {
    0: '''
@triton.jit
def _normal_cdf_and_pdf(z):
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)), tl.exp(-0.5 * z * z) * 0.3989422804014327
''',
    2: '''
@triton.jit
def _normal_cdf_and_pdf(z):
    return tl.full(z.shape, 1.0, tl.float32), tl.zeros(z.shape, tl.float32)
''',
}


def variant(mode):
    """moe_kernels as it is (mode 1) or with the erf of ``VARIANTS[mode]``."""
    if mode == 1:
        return moe_kernels
    src = open(moe_kernels.__file__).read() + VARIANTS[mode]
    src = src.replace('"sadiffuseq::', f'"sadiffuseq_erf{mode}::').replace("ops.sadiffuseq.", f"ops.sadiffuseq_erf{mode}.")
    path = tempfile.NamedTemporaryFile("w", suffix=f"_erf{mode}.py", delete=False).name
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"moe_kernels_erf{mode}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


modules = {mode: variant(mode) for mode in (0, 1, 2)}
E, W = 8, 1536
base = (8261, 8077, 8118, 7950, 8412, 8339, 8131, 8248)  # 32k tokens, top-2
SETTINGS = [(128, 16, 128, 8), (128, 16, 64, 4), (256, 16, 128, 8), (128, 32, 64, 8), (64, 16, 64, 4),
            (128, 8, 128, 4), (256, 32, 64, 8)]
for tokens in (8192, 32768):
    counts = [c * tokens // 32768 for c in base]
    M = sum(counts)
    u = torch.randn(M, W, device="cuda", dtype=torch.bfloat16) * 2
    g = torch.randn_like(u)
    b = torch.randn(E, W, device="cuda", dtype=torch.bfloat16) * 0.5
    ends = torch.tensor(counts, device="cuda").cumsum(0).int()
    expert = torch.repeat_interleave(torch.arange(E, device="cuda"), torch.tensor(counts, device="cuda"))
    z = u.double() + b.double()[expert]
    want_h = torch.nn.functional.gelu(z)
    want_du = g.double() * (0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
    x = torch.empty_like(u)
    print(f"{tokens} tokens, {M} rows; plain copy_ of u {graph_time_ms(lambda: x.copy_(u), reps=50) * 1e3:.1f} us")
    for R, BM, BN, w in SETTINGS:
        line = []
        for mode, mk in modules.items():
            launch = dict(ROWS=R, BM=BM, BN=BN, num_warps=w)
            mk.BIAS_GELU_FORWARD = mk.BIAS_GELU = mk.BIAS_GELU_SMALL = launch
            fwd = lambda: mk.bias_gelu_forward(u, b, expert, ends)  # noqa: E731
            bwd = lambda: mk.bias_gelu_backward(g, u, b, expert, ends)  # noqa: E731
            err = ""
            if mode < 2:
                ef = (fwd().double() - want_h).abs().max().item()
                eb = (bwd()[0].double() - want_du).abs().max().item()
                err = f" (max error {ef:.2g} / {eb:.2g})"
            tf, tb = graph_time_ms(fwd, reps=50) * 1e3, graph_time_ms(bwd, reps=50) * 1e3
            line.append(f"mode {mode}: fwd {tf:5.1f} bwd {tb:5.1f}{err}")
        print(f"  ROWS={R} BM={BM} BN={BN} warps={w}: " + " | ".join(line), flush=True)
