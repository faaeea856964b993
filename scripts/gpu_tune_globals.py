"""Sweep the launch settings of the global-token Triton kernels (attention/globals_triton.py) on one GPU.

    python3 scripts/gpu_tune_globals.py [LENGTH] [--quick] [--model-layout]

The benchmark pattern's shapes (one row, 16 heads × 64, 16 global tokens, 8 heads dilated ×4, window ±256, bf16,
q/k/v/dO as the (B, H, L, hd) transposed views the layer passes): every setting of each kernel is checked against the
module's current one (the same outputs to bf16 rounding) and timed as a CUDA-graph replay; the best three per
kernel and the current one are printed with the bytes each moves at that time (GB/s). Settings that fail to compile
(too many registers or too much shared memory) are reported and skipped. ``--model-layout``: q, k, v as the model
passes them instead — views of one fused (B, L, 3, H, hd) projection, dO token-major (B, L, H, hd).
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sadiffuseq.attention import globals_triton as gt  # noqa: E402
from sadiffuseq.bench import graph_time_ms  # noqa: E402

L = int(next((a for a in sys.argv[1:] if a.isdigit()), 32768))
QUICK = "--quick" in sys.argv
MODEL_LAYOUT = "--model-layout" in sys.argv
B, H, D, G, W = 1, 16, 64, 16, 256
dev, dt = torch.device("cuda"), torch.bfloat16
gen = torch.Generator(device=dev).manual_seed(0)


def seq(layout="bhld"):
    x = torch.randn(B, H, L, D, device=dev, dtype=dt, generator=gen)
    return x.transpose(1, 2) if layout == "bhld" else x.transpose(1, 2).contiguous()


if MODEL_LAYOUT:
    q, k, v = torch.randn(B, L, 3, H, D, device=dev, dtype=dt, generator=gen).unbind(2)
    dout = seq("blhd")
else:
    q, k, v, dout = seq(), seq(), seq(), seq()
out, dq_band, dk_band, dv_band = seq("blhd"), seq("blhd"), seq("blhd"), seq("blhd")
lse = 8 + torch.rand(B, H, L, device=dev, generator=gen)
gpos = torch.arange(G, device=dev, dtype=torch.int32)
dil = torch.tensor([1] * 8 + [4] * 8, device=dev, dtype=torch.int32)
row_lse = 10 + torch.rand(B, H, G, device=dev, generator=gen)
lse_rest = lse.index_fill(2, gpos.long(), float("inf"))
scale = D ** -0.5
SEQ_BYTES = B * L * H * D * 2  # one sequence-long bf16 tensor

KERNELS = {
    # name: (module dict, settings grid, call, bytes moved: sequence-long tensors read + written)
    "merge": ("MERGE", dict(BM=[64, 128], num_warps=[4, 8], num_stages=[2, 3], HEADS_FAST=[False, True]),
              lambda: gt.merge_global_keys(q, k, v, out, lse, gpos, dil, W, scale), 3),
    "rows": ("ROWS", dict(BN=[64, 128], SPAN=[8, 16], num_warps=[4, 8], num_stages=[3], HEADS_FAST=[False, True]),
             lambda: gt.global_rows(q, k, v, gpos, scale), 2),
    "backward": ("BACKWARD", dict(BM=[32, 64], SPAN=[4, 8], num_warps=[4, 8], num_stages=[2, 3],
                                  HEADS_FAST=[False, True]),
                 lambda: gt.global_backward(dout, q, k, v, out, lse_rest, row_lse, dq_band, dk_band, dv_band, gpos,
                                            dil, W, scale), 11),
}

print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, L={L}, "
      f"{'model layout (fused projection views)' if MODEL_LAYOUT else 'bench layout (B, H, L, hd) views'}")
summary = []
for name, (attr, grid, call, n_seq) in KERNELS.items():
    current = dict(getattr(gt, attr))
    reference = [t.float().clone() for t in call()]  # every wrapper returns a tuple of tensors
    results = []
    keys = list(grid)
    combos = list(itertools.product(*grid.values()))
    if QUICK:
        combos = combos[:: max(1, len(combos) // 6)]
    for values in combos:
        setting = dict(zip(keys, values))
        setattr(gt, attr, setting)
        try:
            got = call()
            err = max((a.float() - b).abs().max().item() for a, b in zip(got, reference))
            ms = graph_time_ms(call, reps=30)
        except Exception as e:  # noqa: BLE001 - a setting the compiler refuses is skipped, not fatal
            print(f"  {name} {setting}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        finally:
            setattr(gt, attr, current)
        results.append((ms, setting, err))
    results.sort(key=lambda r: r[0])
    base = next((r for r in results if r[1] == current), None)
    print(f"\n{name}: {len(results)} settings timed")
    for ms, setting, err in results[:3] + ([base] if base and base not in results[:3] else []):
        tag = " (current)" if setting == current else ""
        print(f"  {ms * 1e3:8.1f} us  {n_seq * SEQ_BYTES / ms / 1e6:7.0f} GB/s  max err {err:.3g}  {setting}{tag}")
    if results:
        summary.append((name, base[0] if base else float("nan"), results[0][0], results[0][1], results[0][2]))

print("\nkernel     current us   best us   best setting (max err vs current)")
for name, cur, best, setting, err in summary:
    print(f"{name:10s} {cur * 1e3:10.1f} {best * 1e3:9.1f}   {setting} ({err:.3g})")
