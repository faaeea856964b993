"""Launch settings of the MoE layer's Triton grouped matmuls (``moe_gemm.LAUNCH``): for each of the five matmuls,
every candidate setting timed as a CUDA-graph replay at the layer's shapes (8 experts, top-2, d 768, width 1536,
bf16; tokens routed by a random router, as ``bench moe`` has it) at each length, checked against a float32
reference; the setting with the least total time over the lengths is printed for ``LAUNCH``. ``torch._grouped_mm``
and a dense matmul of the same FLOPs are timed beside each for scale.

    PYTHONPATH=src python3 scripts/gpu_tune_moe_gemm.py [TOKENS ...] [--ops OP ...]   (default 8192 32768, every op)
"""
import argparse

import torch

from sadiffuseq import moe_gemm
from sadiffuseq.bench import graph_time_ms

dev, dt = "cuda", torch.bfloat16
E, k, d, H = 8, 2, 768, 1536
parser = argparse.ArgumentParser()
parser.add_argument("lengths", type=int, nargs="*", default=[8192, 32768])
# (The matmuls with the GELU in their epilogues have scripts/gpu_moe_gelu_epilogue.py.)
OPS = [op for op in moe_gemm.LAUNCH if not op.endswith("_gelu")]
parser.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
args = parser.parse_args()
lengths = args.lengths
# (BM, BN, BK, warps, stages, GROUP_M, persistent: 0 no, 1 yes, 2 with warp specialisation, TMA stores: 0/1)
ROWS = [(128, 256, 64, 8, 3, 8, 0, 0), (128, 256, 64, 8, 4, 8, 0, 0), (256, 128, 64, 8, 3, 8, 0, 0),
        (128, 128, 64, 8, 3, 8, 0, 0), (128, 256, 64, 8, 3, 8, 1, 0), (128, 256, 64, 8, 4, 8, 1, 0),
        (128, 128, 64, 8, 4, 8, 1, 0), (128, 256, 64, 8, 3, 8, 2, 0), (128, 256, 64, 8, 4, 8, 2, 0),
        (128, 128, 64, 8, 4, 8, 2, 0), (128, 256, 64, 8, 3, 16, 2, 0), (128, 256, 64, 8, 3, 4, 2, 0),
        (64, 256, 64, 4, 4, 8, 1, 0), (128, 256, 64, 8, 3, 4, 0, 1), (128, 256, 64, 8, 3, 8, 0, 1),
        (128, 256, 64, 8, 3, 16, 0, 1), (128, 256, 64, 8, 3, 4, 1, 1), (128, 256, 64, 8, 3, 8, 1, 1),
        (128, 256, 64, 8, 3, 16, 1, 1), (128, 256, 64, 8, 3, 4, 2, 1), (128, 256, 64, 8, 3, 8, 2, 1),
        (128, 256, 64, 8, 3, 16, 2, 1), (128, 128, 64, 8, 4, 8, 0, 1), (128, 128, 64, 8, 4, 8, 1, 1),
        (128, 128, 64, 8, 4, 8, 2, 1), (128, 256, 64, 8, 2, 8, 2, 1)]
WEIGHTS = [(128, 128, 64, 8, 4, 8), (128, 128, 64, 4, 4, 8), (128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8),
           (256, 128, 64, 8, 3, 8), (128, 128, 128, 8, 3, 8), (64, 128, 64, 4, 4, 8), (128, 128, 64, 4, 3, 8),
           (128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 5, 8), (128, 128, 64, 8, 4, 4), (256, 128, 64, 8, 4, 8),
           (64, 256, 64, 4, 3, 8), (64, 256, 64, 4, 4, 8), (64, 256, 64, 8, 3, 8), (128, 256, 64, 8, 3, 4)]
print("torch", torch.__version__, torch.cuda.get_device_name())


def problem(S):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(S, d, device=dev, generator=g)
    router = torch.randn(E, d, device=dev, generator=g) * d**-0.5
    flat = (x @ router.t()).topk(k, dim=1).indices.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    M = flat.numel()
    ends = torch.cumsum(counts, 0).int()
    expert = torch.repeat_interleave(torch.arange(E, device=dev), counts)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt)

    t = dict(xs=rnd(M, d), w1=rnd(E, d, H, scale=d**-0.5), w2=rnd(E, H, d, scale=H**-0.5), dy=rnd(M, d),
             h=rnd(M, H), du=rnd(M, H))
    return M, counts, ends, expert, t


def references(t, counts):
    """float32 results of each matmul, one matmul per expert."""
    f = {name: v.float() for name, v in t.items()}
    parts = {name: v.split(counts.tolist()) for name, v in f.items() if v.shape[0] == f["xs"].shape[0]}
    per_expert = lambda fn: torch.cat([fn(e) for e in range(E)])  # noqa: E731
    return {
        "up": per_expert(lambda e: parts["xs"][e] @ f["w1"][e]),
        "down": per_expert(lambda e: parts["h"][e] @ f["w2"][e]),
        "down_input_grad": per_expert(lambda e: parts["dy"][e] @ f["w2"][e].t()),
        "up_input_grad": per_expert(lambda e: parts["du"][e] @ f["w1"][e].t()),
        "weight_grad": torch.stack([parts["h"][e].t() @ parts["dy"][e] for e in range(E)]),
    }


def calls(t, ends):
    ops = torch.ops.sadiffuseq
    return {
        "up": (lambda: ops.moe_gmm(t["xs"], t["w1"], ends, False, "up"),
               lambda: torch._grouped_mm(t["xs"], t["w1"], offs=ends), lambda: t["xs"] @ t["w1"][0]),
        "down": (lambda: ops.moe_gmm(t["h"], t["w2"], ends, False, "down"),
                 lambda: torch._grouped_mm(t["h"], t["w2"], offs=ends), lambda: t["h"] @ t["w2"][0]),
        "down_input_grad": (lambda: ops.moe_gmm(t["dy"], t["w2"], ends, True, "down_input_grad"),
                            lambda: torch._grouped_mm(t["dy"], t["w2"].transpose(1, 2), offs=ends),
                            lambda: t["dy"] @ t["w2"][0].t()),
        "up_input_grad": (lambda: ops.moe_gmm(t["du"], t["w1"], ends, True, "up_input_grad"),
                          lambda: torch._grouped_mm(t["du"], t["w1"].transpose(1, 2), offs=ends),
                          lambda: t["du"] @ t["w1"][0].t()),
        # Both weight gradients of a step (one launch; fp32 out, as the layer writes them), the first one checked.
        # torch._grouped_mm's bf16 results would still need casting to fp32.
        "weight_grad": (lambda: ops.moe_gmm_weight_grads(t["h"], t["dy"], t["xs"], t["du"], ends,
                                                         torch.float32)[0],
                        lambda: (torch._grouped_mm(t["h"].t(), t["dy"], offs=ends),
                                 torch._grouped_mm(t["xs"].t(), t["du"], offs=ends)),
                        lambda: (t["h"].t() @ t["dy"], t["xs"].t() @ t["du"])),
    }


times = {}  # (op, setting) -> [ms per length]
scale = {}  # (op, length) -> (grouped_mm ms, dense ms)
problems = {S: problem(S) for S in lengths}
for S, (M, counts, ends, expert, t) in problems.items():
    print(f"\n{S} tokens ({M} routed rows), counts {counts.tolist()}")
    want = references(t, counts)
    for op, (mine, grouped, dense) in calls(t, ends).items():
        if op not in args.ops:
            continue
        scale[op, S] = (graph_time_ms(grouped, reps=30), graph_time_ms(dense, reps=30))
        for setting in WEIGHTS if op == "weight_grad" else ROWS:
            moe_gemm.LAUNCH[op] = setting
            moe_gemm.LAUNCH_SMALL.pop(op, None)  # (the setting under test at every length)
            try:
                got = mine().float()
                err = ((got - want[op]).abs().max() / want[op].abs().max()).item()
                assert err < 2e-2, f"wrong result: relative error {err:.1e}"
                ms = graph_time_ms(mine, reps=30)
            except Exception as exc:  # noqa: BLE001 (a setting that does not compile or fit: skipped)
                print(f"  {op:14s} {setting}: {type(exc).__name__}: {str(exc)[:120]}")
                ms = float("inf")
            times.setdefault((op, setting), []).append(ms)
            fl = 2 * M * d * H * (2 if op == "weight_grad" else 1)
            print(f"  {op:14s} {setting}: {ms * 1e3:7.1f} us ({fl / ms / 1e9:4.0f} TFLOP/s)")

print("\nop | " + " | ".join(f"{S}: best us (TFLOP/s), grouped_mm, dense" for S in lengths) + " | setting")
for op in args.ops:
    candidates = {s: ms for (o, s), ms in times.items() if o == op}
    best = min(candidates, key=lambda s: sum(candidates[s]))
    cells = []
    for i, S in enumerate(lengths):
        fl = 2 * problems[S][0] * d * H * (2 if op == "weight_grad" else 1)
        g, dn = scale[op, S]
        ms = candidates[best][i]
        cells.append(f"{ms * 1e3:.1f} ({fl / ms / 1e9:.0f}), {g * 1e3:.1f}, {dn * 1e3:.1f}")
    print(f"{op} | " + " | ".join(cells) + f" | {best}")
