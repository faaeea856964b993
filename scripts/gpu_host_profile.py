"""How much of a step's wall time is the host? For the sparse attention (benchmark pattern, split and inline
schedules, default compile) and for the compiled MoE layer and its dense FFN, forward + backward, bf16:

* ``sync ms``: median wall time of one step between CUDA events with a synchronisation after every step (what
  ``sadiffuseq bench`` reports: the GPU starts each step idle, so host time that the GPU cannot hide shows);
* ``queued ms``: wall time per step of 20 steps queued back to back (the host runs ahead when it can: a training
  step of many layers sees this when the host is not its bottleneck);
* ``GPU ms``: kernel time per step from the profiler;
* device-to-host synchronisations inside a step (``torch.cuda.set_sync_debug_mode``), and the host operators that
  take the most CPU time.

With ``model``: one training step (forward, backward, AdamW) of the base-size model with dense and with sparse
attention, blocks compiled, the benchmark pattern of ``bench model`` (window ±256, 6 of 12 heads dilated ×4, 16
global tokens); ``moe`` adds MoE feed-forwards in every other layer.

Usage: python3 scripts/gpu_host_profile.py attention [LENGTH] [MODE ...]   (MODE: model.flex_compile values)
       python3 scripts/gpu_host_profile.py moe [LENGTH]
       python3 scripts/gpu_host_profile.py model [LENGTH] [moe]
"""

import sys
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sadiffuseq.bench import cuda_time_ms, queued_time_ms

what = sys.argv[1] if len(sys.argv) > 1 else "attention"
L = int(sys.argv[2]) if len(sys.argv) > 2 else (32768 if what == "moe" else 8192)
dev = torch.device("cuda")
TOP = 25 if what == "model" else 12


def report(name, step):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message).lower()]
    s, qd = cuda_time_ms(step, warmup=0, reps=30), queued_time_ms(step, reps=20)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 5
    print(f"{name:32s} sync {s:7.3f} ms  queued {qd:7.3f} ms  GPU {gpu / 1000:7.3f} ms  host syncs per step {len(syncs)}")
    for line in sorted(set(syncs)):
        print("    sync:", line)
    cpu_ops = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    for e in cpu_ops:
        print(f"    host {e.self_cpu_time_total / 5 / 1000:7.3f} ms/step  {e.count // 5:4d}×  {e.key[:90]}")
    return s, qd, gpu / 1000


if what == "attention":
    from sadiffuseq.attention import patterns
    from sadiffuseq.attention.backends import flex_attention

    H, hd = 16, 64
    q, k, v = (torch.randn(1, H, L, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    heads = patterns.cached_head_layouts(L, 16, 0, (1,) * 8 + (4,) * 8, 256, dev)

    def attention_step(fn):
        def step():
            fn().backward(g)
            q.grad = k.grad = v.grad = None
        return step

    report("dense SDPA", attention_step(lambda: F.scaled_dot_product_attention(q, k, v)))
    for mode in sys.argv[3:] or ["default"]:
        for schedule in ("inline", "split"):
            report(f"sparse, {schedule}, {mode}",
                   attention_step(lambda: flex_attention(q, k, v, heads, schedule=schedule, compile_mode=mode)))
elif what == "model":
    from sadiffuseq.config import load_config
    from sadiffuseq.diffusion.process import Diffusion
    from sadiffuseq.model import Denoiser

    overrides = ["--model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4]", "--model.window=256", "--model.global_first=16",
                 "--model.dropout=0.0"]
    if "moe" in sys.argv[3:]:
        overrides += ["--model.ffn=moe", "--model.moe_layers=[1,3,5,7,9,11]"]
    cfg = load_config(None, overrides)  # the defaults are the base size, as in `bench model`
    diffusion = Diffusion(cfg.diffusion)
    vocab = 16000
    for attention in ("dense", "sparse"):
        cfg.model.attention = attention
        torch.manual_seed(0)
        model = Denoiser(cfg.model, vocab, absorbing=cfg.diffusion.absorbing).to(dev).compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(4, vocab, (1, L), device=dev)
        mask = torch.zeros(1, L, dtype=torch.bool, device=dev)
        mask[:, L // 8:] = True

        def step():
            t = torch.randint(0, diffusion.steps, (1,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = diffusion.training_losses(model, {"ids": ids, "input_mask": mask}, t)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        report(f"model, {attention} attention, {L} tokens", step)
        del model, opt
        torch.cuda.empty_cache()
else:
    from sadiffuseq.config import ModelConfig
    from sadiffuseq.model import DenseFFN
    from sadiffuseq.moe import MoEFFN

    cfg = ModelConfig(d_model=768, ffn="moe", moe_experts=8, moe_top_k=2)
    x = torch.randn(1, L, 768, device=dev, requires_grad=True)
    g = torch.randn(1, L, 768, device=dev, dtype=torch.bfloat16)
    for name, layer in (("dense FFN", DenseFFN(cfg)), ("MoE", MoEFFN(cfg))):
        layer = layer.to(dev).train()
        fn = layer.compile_routed() if name == "MoE" else torch.compile(layer)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(x)
            y.backward(g)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        report(f"{name}, compiled, {L} tokens", step)
