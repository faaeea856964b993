"""Time every cuDNN execution plan, and every knob value of the engines behind them, for the cuDNN band's main
calls (attention/cudnn_band.py) at 32k tokens on one GPU.

    PYTHONPATH=src:<cudnn frontend> python3 scripts/gpu_cudnn_plans.py

The benchmark pattern (16 heads × 64, window ±256, 8 plain heads and 8 heads dilated ×4 as residue-class views),
forward and backward of each group's main call: the plans heuristics A, B and the fallback propose, then
``create_execution_plan(engine, knobs)`` for every combination of the engines' knobs; each timed as a CUDA-graph
replay, its outputs compared with the first plan's. Needs NVIDIA's cudnn frontend (see
scripts/gpu_cudnn_causal_band.py).
"""
import itertools, sys
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

def run_all(tag, backward, data, left, right, padded):
    g, pack, handle, outputs = build(backward, data, left, right, padded)
    n = g.get_execution_plan_count()
    print(f"\n{tag}: {n} plans")
    first = None
    results = []
    for i in range(n):
        try:
            name = g.get_plan_name_at_index(i)
        except Exception as e:
            name = f"? {e}"
        try:
            ek = g.get_engine_and_knobs_at_index(i)
        except Exception as e:
            ek = f"? {str(e)[:60]}"
        try:
            ws = torch.empty(g.get_workspace_size_plan_at_index(i), dtype=torch.uint8, device=dev)
            def fn(i=i, ws=ws):
                c.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
                g.execute_plan_at_index(pack, ws, index=i, handle=handle)
            fn(); torch.cuda.synchronize()
            got = [t.float().clone() for t in data.values() if t is not None][-3:]
            if first is None:
                first = got
            err = max((a - b).abs().max().item() for a, b in zip(got, first))
            ms = graph_time_ms(fn, reps=20)
            print(f"  [{i}] {ms*1e3:8.1f} us  err {err:.3g}  ws {ws.numel()}  {name[:90]}  {ek}")
            results.append((ms, i, name, ek))
        except Exception as e:
            print(f"  [{i}] failed {type(e).__name__}: {str(e)[:150]}  {name[:80]}")
    results.sort(key=lambda r: r[0])
    print("  best heuristic plan:", results[0][:2], results[0][3] if results else None)
    # every KERNEL_CFG (and the other knob) of the engines the heuristics proposed
    engines = sorted({r[3][0] for r in results if isinstance(r[3], tuple)})
    by_value = {m.value if hasattr(m, "value") else int(m): m for m in c.knob_type.__members__.values()}
    sweep = []
    for eng in engines:
        try:
            kn = g.get_knobs_for_engine(eng)
        except Exception as e:
            print("  knobs query failed", eng, str(e)[:100]); continue
        import json
        specs = [json.loads(str(x)) if not isinstance(x, dict) else x for x in kn] if not isinstance(kn, str) else json.loads(kn)
        axes = []
        for sp in specs:
            kt = by_value.get(sp["knob_type"])
            axes.append([(kt, val) for val in range(sp["min_value"], sp["max_value"] + 1, sp["stride"])])
        for combo in itertools.product(*axes):
            knobs = dict(combo)
            try:
                g.create_execution_plan(eng, knobs)
                idx = g.get_execution_plan_count() - 1
                g.build_plan_at_index(idx)
                ws = torch.empty(g.get_workspace_size_plan_at_index(idx), dtype=torch.uint8, device=dev)
                def fn(i=idx, ws=ws):
                    c.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
                    g.execute_plan_at_index(pack, ws, index=i, handle=handle)
                fn(); torch.cuda.synchronize()
                got = [t.float().clone() for t in data.values() if t is not None][-3:]
                err = max((a - b).abs().max().item() for a, b in zip(got, first))
                ms = graph_time_ms(fn, reps=20)
                sweep.append((ms, eng, {str(k_).split('.')[-1]: v_ for k_, v_ in knobs.items()}, err))
            except Exception:  # noqa: BLE001 - a knob combination the engine refuses: skipped
                pass
    sweep.sort(key=lambda r: r[0])
    print(f"  knob sweep: {len(sweep)} variants built; best 6:")
    for r in sweep[:6]:
        print(f"    {r[0]*1e3:8.1f} us  engine {r[1]} {r[2]} err {r[3]:.3g}")
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
