"""Time every cuDNN execution plan, and every knob value of the engines behind them, for the cuDNN band's main
calls (attention/cudnn_band.py) at 32k tokens on one GPU.

    PYTHONPATH=src:<cudnn frontend> python3 scripts/gpu_cudnn_plans.py

The benchmark pattern (16 heads × 64, window ±256, 8 plain heads and 8 heads dilated ×4 as residue-class views),
forward and backward of each group's main call: the plans heuristics A, B and the fallback propose, then
``create_execution_plan(engine, knobs)`` for every combination of the engines' knobs; each timed as a CUDA-graph
replay, its outputs compared with the first plan's. Needs NVIDIA's cudnn frontend (see
scripts/gpu_cudnn_causal_band.py).
"""
import itertools
import json
import sys
import torch
sys.path.insert(0, "src")
import cudnn
from sadiffuseq.attention import cudnn_band as cb
from sadiffuseq.bench import graph_time_ms

L, H, D, w = 32768, 16, 64, 256
dev, dt = "cuda", torch.bfloat16
scale = D ** -0.5
def seq():
    return torch.randn(1, H, L, D, device=dev, dtype=dt).transpose(1, 2)
q, k, v, dout = seq(), seq(), seq(), seq()
out = torch.randn(1, L, H, D, device=dev, dtype=dt)
lse = 8 + torch.rand(1, H, L, device=dev)
dq, dk, dv = (torch.empty(1, L, H, D, device=dev, dtype=dt) for _ in range(3))
c = cudnn

def build(backward, data, left, right, padded):
    specs = dict(cb._layout(data))
    io = c.data_type.BFLOAT16; fp32 = c.data_type.FLOAT
    handle = cb._handle(0)
    g = c.pygraph(io_data_type=io, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    tensors = {n: g.tensor(name=n, dim=list(d), stride=list(s), data_type=fp32 if n == "lse" else io)
               for n, (d, s) in specs.items() if n in ("q", "k", "v", "out", "dout", "lse") and (backward or n in ("q", "k", "v"))}
    band = dict(attn_scale=scale, diagonal_band_left_bound=left, diagonal_alignment=c.diagonal_alignment.TOP_LEFT)
    if right is not None:
        band["diagonal_band_right_bound"] = right
    lengths = {}
    if padded:
        B, Sq, Skv = specs["q"][0][0], specs["q"][0][2], specs["k"][0][2]
        for n in ("seq_q", "seq_kv"):
            tensors[n] = g.tensor(name=n, dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=c.data_type.INT32)
        band.update(use_padding_mask=True, seq_len_q=tensors["seq_q"], seq_len_kv=tensors["seq_kv"])
        lengths = {"seq_q": torch.full((B, 1, 1, 1), Sq, dtype=torch.int32, device=dev),
                   "seq_kv": torch.full((B, 1, 1, 1), Skv, dtype=torch.int32, device=dev)}
    if not backward:
        o, st = g.sdpa(name="band", q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=True, **band)
        outputs = {"out": o, "lse": st}
    else:
        a, b_, c_ = g.sdpa_backward(name="bb", q=tensors["q"], k=tensors["k"], v=tensors["v"], o=tensors["out"],
                                    dO=tensors["dout"], stats=tensors["lse"], **band)
        outputs = {"dq": a, "dk": b_, "dv": c_}
    for name, tt in outputs.items():
        d_, s_ = specs[name]
        tt.set_output(True).set_dim(list(d_)).set_stride(list(s_)).set_data_type(fp32 if name == "lse" else io)
    g.validate(); g.build_operation_graph()
    g.create_execution_plans([c.heur_mode.A, c.heur_mode.B, c.heur_mode.FALLBACK])
    g.check_support()
    try:
        g.build_plans(c.build_plan_policy.ALL)
    except Exception as e:
        print("   build ALL failed:", str(e)[:200])
    pack = {tensors[n] if n in tensors else outputs[n]: t for n, t in data.items()}
    for n, t in lengths.items():
        pack[tensors[n]] = t
    return g, pack, handle, outputs

def time_plan(g, pack, handle, data, index):
    """One plan of the graph: its outputs (the last three tensors of ``data``, fp32 copies) and replay time."""
    ws = torch.empty(g.get_workspace_size_plan_at_index(index), dtype=torch.uint8, device=dev)

    def call():
        c.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        g.execute_plan_at_index(pack, ws, index=index, handle=handle)

    call()
    torch.cuda.synchronize()
    outputs = [t.float().clone() for t in data.values()][-3:]
    return outputs, graph_time_ms(call, reps=20)


def max_error(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want))


def run_all(tag, backward, data, left, right, padded):
    g, pack, handle, outputs = build(backward, data, left, right, padded)
    n = g.get_execution_plan_count()
    print(f"\n{tag}: {n} plans")
    first = None
    results = []
    for i in range(n):
        name = g.get_plan_name_at_index(i)
        engine_knobs = g.get_engine_and_knobs_at_index(i)
        try:
            got, ms = time_plan(g, pack, handle, data, i)
        except Exception as e:  # noqa: BLE001 - a plan that does not run is reported and skipped
            print(f"  [{i}] failed {type(e).__name__}: {str(e)[:150]}  {name[:80]}")
            continue
        first = got if first is None else first
        print(f"  [{i}] {ms * 1e3:8.1f} us  err {max_error(got, first):.3g}  {name[:90]}  {engine_knobs}")
        results.append((ms, i, name, engine_knobs))
    if not results:
        return results
    print("  fastest heuristic plan:", min(results, key=lambda r: r[0]))
    # every knob value of the engines the heuristics proposed
    by_value = {int(m.value): m for m in c.knob_type.__members__.values()}
    sweep = []
    for engine in sorted({r[3][0] for r in results}):
        specs = [json.loads(str(x)) for x in g.get_knobs_for_engine(engine)]
        axes = [[(by_value[sp["knob_type"]], val) for val in range(sp["min_value"], sp["max_value"] + 1, sp["stride"])]
                for sp in specs]
        for combo in itertools.product(*axes):
            knobs = dict(combo)
            try:
                g.create_execution_plan(engine, knobs)
                index = g.get_execution_plan_count() - 1
                g.build_plan_at_index(index)
                got, ms = time_plan(g, pack, handle, data, index)
            except Exception:  # noqa: BLE001 - a knob combination the engine refuses: skipped
                continue
            sweep.append((ms, engine, {str(k_).split(".")[-1]: v_ for k_, v_ in knobs.items()}, max_error(got, first)))
    sweep.sort(key=lambda r: r[0])
    print(f"  knob sweep: {len(sweep)} variants built; best 6:")
    for r in sweep[:6]:
        print(f"    {r[0] * 1e3:8.1f} us  engine {r[1]} {r[2]} err {r[3]:.3g}")
    return results


for first_h, count, d in ((0, 8, 1), (8, 8, 4)):
    qg, kg, vg, og, dog, dqg, dkg, dvg = (cb._group_view(t, first_h, count, d) for t in (q, k, v, out, dout, dq, dk, dv))
    Bk, S = qg.shape[:2]
    lse_g = torch.empty((Bk, count, S), dtype=torch.float32, device=dev)
    fdata = {"q": qg, "k": kg[:, w:], "v": vg[:, w:], "out": og, "lse": lse_g}
    run_all(f"forward main d={d}", False, fdata, 2 * w + 1, 0, True)
    lse_b = (8 + torch.rand(Bk, count, S, device=dev)).contiguous()
    bdata = {"q": qg, "k": kg[:, w:], "v": vg[:, w:], "out": og, "dout": dog, "lse": lse_b,
             "dq": dqg, "dk": dkg[:, w:], "dv": dvg[:, w:]}
    run_all(f"backward main d={d}", True, bdata, 2 * w + 1, 0, True)
