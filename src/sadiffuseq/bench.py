"""``sadiffuseq bench``: side-by-side GPU timings, written as CSV and PNG.

* ``bench attention`` — forward+backward of the attention core (after the projections) for dense SDPA (the fused
  kernel SDPA picks: cuDNN or FlashAttention), our sparse pattern (permuted FlexAttention under each global-token
  schedule: inline, split), and optionally the *naive* FlexAttention of the same pattern (dilated mask in the
  original order).
  Reports block density (fraction of 128×128 tiles of the pattern visited), the ideal time density × dense,
  efficiency = ideal / sparse and the speed-up over dense, for the default schedule and for each one.
* ``bench model`` — one full training step (forward, backward, AdamW) of the denoiser with dense attention and
  with sparse attention, same sizes, same data, one process.
* ``bench moe`` — forward+backward of one MoE feed-forward layer against the dense FFN of the same active FLOPs,
  with the achieved TFLOP/s of both (see :func:`bench_moe`). Runs on the CPU too (fp32, host clock).
* ``bench sample`` — quality against speed of several ``sampler:steps`` settings on the same sources of a trained
  checkpoint: seconds per document, target tokens/s, BLEU and ROUGE-L (see :func:`bench_sample`).

Timings are medians over repeated runs between CUDA events after warm-up (which also triggers compilation).
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sadiffuseq.attention import flash, patterns
from sadiffuseq.attention.backends import (
    GLOBAL_SCHEDULES,
    resolve_compile_mode,
    resolve_schedule,
    _compiled_create_block_mask,
    _compiled_flex,
    block_density,
    block_mask_for,
)
from sadiffuseq.attention.layer import SparseSelfAttention
from sadiffuseq.config import Config, ModelConfig
from sadiffuseq.errors import UserError


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` between CUDA events, synchronising after every call (host clock on CPU).

    The GPU starts every call idle, so host time that the GPU cannot hide counts: the latency of one call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def queued_time_ms(fn, reps: int = 10) -> float:
    """Milliseconds per call of ``reps`` calls of ``fn()`` queued back to back (after :func:`cuda_time_ms` has
    warmed it up): the host runs ahead of the GPU where it can, as in a training step of many layers, so this is
    the GPU-bound cost when the host keeps up and the host-bound one when it does not."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graphed(fn, warmup: int = 3):
    """``fn`` (a forward + backward that allocates nothing the caller keeps) captured as one CUDA graph; returns
    the graph's ``replay``. Warm-up runs on a side stream first (compilation, autotuning, cuDNN plans), as
    ``torch.cuda.graph`` requires. A replay is one launch: no Python, no dispatcher, no per-kernel launch cost —
    what a training loop that captures its whole step sees, and the GPU-bound cost of the call."""
    if not torch.cuda.is_available():
        raise UserError("--cuda-graph captures CUDA graphs: it needs a CUDA GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:  # e.g. a device-to-host copy inside the call
        raise UserError(f"--cuda-graph: the call cannot be captured as a CUDA graph ({err})") from err
    return graph.replay


GRAPHING_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs of their own


def graph_time_ms(fn, reps: int = 10) -> float:
    """Median milliseconds of one replay of ``fn`` captured as a CUDA graph (:func:`graphed`), synchronised after
    every replay like :func:`cuda_time_ms`."""
    replay = graphed(fn)
    return cuda_time_ms(replay, warmup=2, reps=reps)


def _compile_options(compile: str | bool) -> dict:
    """``torch.compile`` keyword arguments for a ``--compile [MODE]`` value (True / "default": none)."""
    return {"mode": compile} if isinstance(compile, str) and compile not in ("", "default") else {}


def _fwd_bwd(attend, q, k, v, grad):
    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays
        out = attend(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return step


def pattern_config(heads: int, head_dim: int, window: int, dilated_heads: int, dilation: int, n_global: int,
                   backend: str = "auto", compile_mode: str = "auto") -> ModelConfig:
    dilations = [1] * (heads - dilated_heads) + [dilation] * dilated_heads
    cfg = ModelConfig(d_model=heads * head_dim, n_heads=heads, window=window, dilations=dilations,
                      global_first=n_global, attention="sparse", attention_backend=backend, dropout=0.0,
                      flex_compile=compile_mode)
    cfg.validate()
    return cfg


def naive_flex(cfg: ModelConfig, length: int, device):
    """FlexAttention of the same pattern in the original token order (no permutation), one call per dilation."""
    create_block_mask = _compiled_create_block_mask()
    is_global = patterns.global_positions(length, cfg.global_first, cfg.global_every, device=device)
    groups = sorted(set(cfg.dilations))
    masks = [create_block_mask(patterns.head_mask_mod(cfg.window, d, is_global), None, None, length, length,
                               device=device) for d in groups]
    sizes = [cfg.dilations.count(d) for d in groups]
    flex = _compiled_flex()

    def attend(q, k, v):
        outs, start = [], 0
        for n, bm in zip(sizes, masks):
            outs.append(flex(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], block_mask=bm))
            start += n
        return torch.cat(outs, dim=1)

    density = sum(block_density(bm) * n for bm, n in zip(masks, sizes)) / sum(sizes)
    return attend, density


def bench_attention(lengths: list[int], heads: int = 16, head_dim: int = 64, window: int = 256,
                    dilated_heads: int = 8, dilation: int = 4, n_global: int = 16, batch: int = 1,
                    naive: bool = True, reps: int = 10, out_dir: str | Path = "bench_out",
                    schedules: tuple[str, ...] = GLOBAL_SCHEDULES, compile_mode: str = "auto",
                    backends: tuple[str, ...] = ("flex",), flash_kernel: str = "auto",
                    cuda_graph: bool = False) -> list[dict]:
    """Dense SDPA vs the sparse pattern (fwd+bwd, bf16) per length, on the sparse ``backends`` (``flex``:
    FlexAttention, the default, timed under each global-token schedule of ``schedules``; ``flash``: the band
    through FlashAttention-2's sliding window). The ``sparse_*`` columns are flex under the default global-token
    schedule (``model.flex_globals``, resolved per length) when it is among ``schedules``, else the first of them
    (``flash`` when flex is not timed); ``flash_ms`` and ``<schedule>_ms`` columns are every timed variant.
    Times are synchronised after every call (latency, :func:`cuda_time_ms`); the ``*_queued_ms`` columns and
    ``queued_speedup`` queue the calls back to back (:func:`queued_time_ms`), which hides the host where the GPU
    is the bottleneck. ``compile_mode``: ``model.flex_compile`` for FlexAttention. ``cuda_graph``: also time every
    variant captured as one CUDA graph and replayed (``*_graph_ms``, ``graph_speedup``, ``*graph_efficiency``;
    :func:`graphed`): the GPU-bound cost, host dispatch removed for dense and sparse alike."""
    bad = [s for s in schedules if s not in GLOBAL_SCHEDULES]
    if bad:
        raise UserError(f"unknown global-token schedule(s) {bad}; choose from {', '.join(GLOBAL_SCHEDULES)}")
    bad = [b for b in backends if b not in ("flash", "flex")]
    if bad or not backends:
        raise UserError(f"unknown sparse backend(s) {bad}; choose from flash, flex")
    if "flex" not in backends:
        schedules = ()
    cfg = pattern_config(heads, head_dim, window, dilated_heads, dilation, n_global, backend="flex",
                         compile_mode=compile_mode)  # checks the mode
    if cuda_graph and compile_mode in GRAPHING_MODES:
        raise UserError(f"--cuda-graph captures each call itself; --flex-compile {compile_mode} would capture graphs "
                        "inside it: use --flex-compile auto, default or max-autotune-no-cudagraphs with it")
    if not torch.cuda.is_available():
        raise UserError("bench attention measures GPU kernels (FlexAttention, fused SDPA): it needs a CUDA GPU")
    device = torch.device("cuda")
    layer = SparseSelfAttention(cfg).to(device)
    flash_layer = None
    if "flash" in backends:
        flash_layer = SparseSelfAttention(pattern_config(heads, head_dim, window, dilated_heads, dilation, n_global,
                                                         backend="flash", compile_mode=compile_mode)).to(device)
        flash_layer.flash_kernel = flash_kernel
    rows = []
    for L in tqdm(lengths, desc="lengths"):
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, L, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, L, head_dim, device=device, dtype=torch.bfloat16)
        dense_step = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), q, k, v, grad)
        dense_ms = cuda_time_ms(dense_step, reps=reps)
        dense_queued_ms = queued_time_ms(dense_step, reps=reps)
        graph_ms = {"dense": graph_time_ms(dense_step, reps)} if cuda_graph else {}
        # flash, then flex under each global-token schedule (attention/backends.py); the default is "sparse"
        default = resolve_schedule(cfg.flex_globals, L)
        if schedules and default not in schedules:  # only the schedules asked for are timed
            default = schedules[0]
        schedule_ms, schedule_queued_ms = {}, {}
        if "flash" in backends:
            if "flex" not in backends:
                default = "flash"
            step = _fwd_bwd(flash_layer.attend, q, k, v, grad)
            schedule_ms["flash"] = cuda_time_ms(step, reps=reps)
            schedule_queued_ms["flash"] = queued_time_ms(step, reps=reps)
            if cuda_graph:
                graph_ms["flash"] = graph_time_ms(step, reps)
        for schedule in dict.fromkeys(schedules):
            layer.global_schedule = schedule
            step = _fwd_bwd(layer.attend, q, k, v, grad)
            schedule_ms[schedule] = cuda_time_ms(step, reps=reps)
            schedule_queued_ms[schedule] = queued_time_ms(step, reps=reps)
            if cuda_graph:
                graph_ms[schedule] = graph_time_ms(step, reps)
        layer.global_schedule = cfg.flex_globals
        sparse_ms = schedule_ms[default]
        # the tiles of the whole pattern (band + global rows and columns), whatever the schedule
        all_heads = patterns.cached_head_layouts(L, cfg.global_first, cfg.global_every, layer.dilations, cfg.window,
                                                 device)
        density = block_density(block_mask_for(all_heads, L))
        row = {"length": L, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "density": density,
               "ideal_ms": density * dense_ms, "efficiency": density * dense_ms / sparse_ms,
               "speedup": dense_ms / sparse_ms, "schedule": default,
               "compile": resolve_compile_mode(compile_mode, L), "dense_queued_ms": dense_queued_ms,
               "sparse_queued_ms": schedule_queued_ms[default],
               "queued_speedup": dense_queued_ms / schedule_queued_ms[default]}
        if cuda_graph:
            row.update(dense_graph_ms=graph_ms["dense"], sparse_graph_ms=graph_ms[default],
                       graph_speedup=graph_ms["dense"] / graph_ms[default],
                       graph_efficiency=density * graph_ms["dense"] / graph_ms[default])
            for variant, ms in graph_ms.items():
                if variant != "dense":
                    row[f"{variant}_graph_ms"] = ms
                    row[f"{variant}_graph_efficiency"] = density * graph_ms["dense"] / ms
        if flash_layer is not None:  # which band kernel the flash backend ran (model.flash_kernel, auto: cudnn if installed)
            row["flash_kernel"] = flash.resolve_kernel(flash_layer.flash_kernel, device, L)
        for schedule, ms in schedule_ms.items():
            row[f"{schedule}_ms"], row[f"{schedule}_speedup"] = ms, dense_ms / ms
            row[f"{schedule}_queued_ms"] = schedule_queued_ms[schedule]
        if naive:
            attend, naive_density = naive_flex(cfg, L, device)
            row["naive_ms"] = cuda_time_ms(_fwd_bwd(attend, q, k, v, grad), reps=reps)
            row["naive_density"] = naive_density
            row["naive_speedup"] = dense_ms / row["naive_ms"]
        rows.append(row)
        _write(rows, Path(out_dir), "attention")  # after every length: a long sweep keeps what it measured
        del q, k, v, grad
        torch.cuda.empty_cache()
    _plot_attention(rows, Path(out_dir) / "attention.png", cfg)
    return rows


def bench_model(cfg: Config, length: int, vocab: int = 16000, batch: int = 1, reps: int = 5,
                out_dir: str | Path = "bench_out", compile: str | bool = "") -> list[dict]:
    """One training step of the dense-attention model and of the sparse one, same sizes, side by side."""
    import copy

    from sadiffuseq.diffusion.process import Diffusion
    from sadiffuseq.model import Denoiser

    if not torch.cuda.is_available():
        raise UserError("bench model times training steps on a CUDA GPU")
    device = torch.device("cuda")
    diffusion = Diffusion(cfg.diffusion)
    rows = []
    for attention in ("dense", "sparse"):
        mcfg = copy.deepcopy(cfg.model)
        mcfg.attention = attention
        mcfg.dropout = 0.0
        torch.manual_seed(0)
        model = Denoiser(mcfg, vocab, absorbing=cfg.diffusion.absorbing).to(device)
        fwd = model.compile_blocks(**_compile_options(compile)) if compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(4, vocab, (batch, length), device=device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, length // 8:] = True
        batch_ = {"ids": ids, "input_mask": mask}

        def step():
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays
            t = torch.randint(0, diffusion.steps, (batch,), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = diffusion.training_losses(fwd, batch_, t)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time_ms(step, warmup=2, reps=reps)
        rows.append({"attention": attention, "length": length, "batch": batch, "step_ms": ms,
                     "tokens_per_s": batch * length / ms * 1e3,
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                     "params_m": model.num_parameters() / 1e6})
        del model, opt, fwd
        torch.cuda.empty_cache()
    rows[1]["speedup"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    for r in rows:
        r["compiled"] = compile
    _write(rows, Path(out_dir), f"model_{length}{'_compiled' if compile else ''}")
    return rows


def moe_flops(tokens: int, d_model: int, hidden: int, top_k: int = 1) -> int:
    """FLOPs of forward + backward of the two projections of a GELU MLP (d → hidden → d) for ``tokens`` tokens,
    each sent to ``top_k`` such MLPs: 2·tokens·top_k·d·hidden per projection, two projections, ×3 for fwd+bwd
    (the backward computes the input and the weight gradients: twice the forward). Biases, GELU, routing ignored.
    """
    return 3 * 2 * (2 * tokens * top_k * d_model * hidden)


def bench_moe(lengths: list[int], d_model: int = 768, ffn_mult: float = 4.0, experts: int = 8, top_k: int = 2,
              batch: int = 1, reps: int = 10, out_dir: str | Path = "bench_out", device: str | torch.device = "auto",
              impl: str = "auto", warmup: int = 3, compile: str | bool = "", cuda_graph: bool = False) -> list[dict]:
    """Forward+backward of one MoE feed-forward layer and of the dense FFN of the same active FLOPs, side by side.

    The dense FFN has width ``H = ffn_mult · d_model``; the MoE layer has ``experts`` experts of width
    ``H / top_k`` (``model.moe_ffn_mult = 0``), so each token costs the same expert-matmul FLOPs as in the dense
    FFN (plus the d × E router). Inputs are (batch, L, d_model); bf16 autocast on CUDA, fp32 on the CPU (timed by
    the host clock there, as :func:`cuda_time_ms` does).

    Both modules are timed in train mode, as training runs them. The MoE layer's auxiliary-loss-free balancing bias
    (``route_bias``) only moves when the Denoiser calls ``apply_bias_update`` at the start of a training step, which
    never happens here, so every repetition routes with the same (zero) bias; the bias is checked unchanged at the
    end. (Routing still depends on the random input and router weights, fixed per length by the seed.)

    Per length the row gives ``dense_ms``, ``moe_ms``, ``ratio`` = moe / dense (each call synchronised: latency,
    :func:`cuda_time_ms`), ``dense_queued_ms``, ``moe_queued_ms``, ``queued_ratio`` (calls queued back to back:
    the GPU-bound cost where the host keeps up, :func:`queued_time_ms`), ``impl`` (the expert-matmul
    implementation the layer resolved to: triton, grouped or loop), and ``dense_tflops`` / ``moe_tflops``: the FLOPs of
    :func:`moe_flops` (the two projections, forward + backward) divided by the measured time of the whole layer.
    For the MoE layer that time includes the router, the sort/dispatch, the gathers and the weighted
    gate weighting, so ``moe_tflops`` is a *lower bound* of the rate of the expert matmuls themselves.

    ``compile``: both layers through ``torch.compile`` (a mode name, e.g. ``"reduce-overhead"`` for CUDA graphs, or
    ``"default"``/True; the MoE layer through :meth:`~sadiffuseq.moe.MoEFFN.compile_routed`: one graph that fuses
    the routing, gathers, GELU and gate-weighted combine around the grouped matmuls — the graph a compiled model's
    blocks trace the layer into). ``cuda_graph``: also time both layers' forward + backward captured as one CUDA
    graph each and replayed (``dense_graph_ms``, ``moe_graph_ms``, ``graph_ratio``; :func:`graphed`; CUDA only, and
    not with a compile mode that captures graphs of its own, :data:`GRAPHING_MODES`).
    """
    from sadiffuseq.model import DenseFFN
    from sadiffuseq.moe import MoEFFN, expert_hidden
    from sadiffuseq.utils import resolve_device

    if top_k > experts:
        raise UserError(f"--top-k {top_k} exceeds --experts {experts}: a token cannot go to more experts than exist")
    if min(d_model, experts, top_k, batch, reps) < 1 or ffn_mult <= 0:
        raise UserError("bench moe: --d-model, --experts, --top-k, --batch, --reps and --ffn-mult must be positive")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    on_cuda = dev.type == "cuda"
    if cuda_graph and not on_cuda:
        raise UserError("bench moe --cuda-graph captures CUDA graphs: it needs --device cuda")
    if cuda_graph and compile in GRAPHING_MODES:
        raise UserError(f"bench moe: --cuda-graph captures each call itself; --compile {compile} would capture "
                        "graphs inside it: use --compile default, max-autotune-no-cudagraphs or none with it")
    cfg = ModelConfig(d_model=d_model, n_heads=1, ffn_mult=ffn_mult, ffn="moe", moe_experts=experts,
                      moe_top_k=top_k, moe_ffn_mult=0.0, moe_impl=impl, dropout=0.0)
    torch.manual_seed(0)
    dense = DenseFFN(cfg).to(dev).train()
    moe = MoEFFN(cfg).to(dev).train()
    dense_width, hidden = dense.up.out_features, expert_hidden(cfg)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    impl_used = moe.resolve_impl(dev, dtype, traced=bool(compile))
    options = _compile_options(compile)
    dense_fn = torch.compile(dense, **options) if compile else dense
    moe_fn = moe.compile_routed(**options) if compile else moe
    bias_before = None if moe.route_bias is None else moe.route_bias.detach().clone()

    def fwd_bwd(module, layer, x, grad):
        def step():
            if on_cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = module(x)
            else:
                y = module(x)
            y.backward(grad.to(y.dtype))
            layer.zero_grad(set_to_none=True)
            x.grad = None
            # The MoE layer keeps its auxiliary losses (with their autograd graph) until the next forward; released
            # here, the router's gradient accumulators are made anew on the stream of each call, which a CUDA-graph
            # capture needs (an accumulator made on the default stream would tie that stream to the capture).
            if hasattr(layer, "last_aux"):
                layer.last_aux = {}

        return step

    rows = []
    for L in tqdm(lengths, desc="lengths", disable=not on_cuda):
        torch.manual_seed(L)
        x = torch.randn(batch, L, d_model, device=dev, requires_grad=True)
        # The output's gradient in the layers' output dtype (bf16 under autocast), cast once here: a cast inside
        # the step would add the same 12 µs to both layers' times at 8k tokens.
        grad = torch.randn(batch, L, d_model, device=dev).to(dtype)
        dense_step, moe_step = fwd_bwd(dense_fn, dense, x, grad), fwd_bwd(moe_fn, moe, x, grad)
        dense_ms = cuda_time_ms(dense_step, warmup=warmup, reps=reps)
        moe_ms = cuda_time_ms(moe_step, warmup=warmup, reps=reps)
        dense_queued_ms, moe_queued_ms = queued_time_ms(dense_step, reps), queued_time_ms(moe_step, reps)
        graphs = {}
        if cuda_graph:
            graphs = {"dense_graph_ms": graph_time_ms(dense_step, reps), "moe_graph_ms": graph_time_ms(moe_step, reps)}
            graphs["graph_ratio"] = graphs["moe_graph_ms"] / graphs["dense_graph_ms"]
        tokens = batch * L
        dense_flops = moe_flops(tokens, d_model, dense_width)
        expert_flops = moe_flops(tokens, d_model, hidden, top_k)
        rows.append({"length": L, "batch": batch, "d_model": d_model, "dense_width": dense_width,
                     "experts": experts, "top_k": top_k, "expert_width": hidden, "device": dev.type,
                     "dtype": str(dtype).removeprefix("torch."), "impl": impl_used, "compiled": compile or False,
                     "dense_ms": dense_ms, "moe_ms": moe_ms, "ratio": moe_ms / dense_ms,
                     "dense_queued_ms": dense_queued_ms, "moe_queued_ms": moe_queued_ms,
                     "queued_ratio": moe_queued_ms / dense_queued_ms,
                     "dense_flops": dense_flops, "moe_flops": expert_flops,
                     "dense_tflops": dense_flops / (dense_ms * 1e-3) / 1e12,
                     "moe_tflops": expert_flops / (moe_ms * 1e-3) / 1e12, **graphs})
        _write(rows, Path(out_dir), "moe")
        del x, grad
        if on_cuda:
            torch.cuda.empty_cache()
    if bias_before is not None and not torch.equal(bias_before, moe.route_bias.detach()):
        raise RuntimeError("bench moe: the routing bias changed between repetitions")  # cannot happen: see above
    return rows


# ---------------------------------------------------------------------------------------------------------
# bench sample: quality against speed of several samplers


def parse_samplers(text: str, total_steps: int | None = None) -> list[tuple[str, int]]:
    """``"ddpm:2000,dpm++2m:10"`` → ``[("ddpm", 2000), ("dpm++2m", 10)]``; a UserError names any bad item.

    With ``total_steps`` (the checkpoint's diffusion.steps T) every step count must also be at most T.
    """
    from sadiffuseq.diffusion.samplers import SAMPLERS

    example = "e.g. --samplers ddpm:2000,ddim:50,dpm++2m:10"
    items = [x.strip() for x in (text or "").split(",")]
    if not text or not text.strip() or any(not x for x in items):
        raise UserError(f"--samplers {text!r}: give comma-separated sampler:steps pairs, {example}")
    out: list[tuple[str, int]] = []
    for item in items:
        name, sep, steps = item.partition(":")
        name, steps = name.strip(), steps.strip()
        if not sep:
            raise UserError(f"--samplers: {item!r} has no step count; write sampler:steps, {example}")
        if name not in SAMPLERS:
            raise UserError(f"--samplers: unknown sampler {name!r} in {item!r}; choose from {', '.join(SAMPLERS)}")
        if not steps.isdigit() or int(steps) < 1:
            raise UserError(f"--samplers: {item!r}: the step count must be a positive integer, {example}")
        n = int(steps)
        if total_steps is not None and n > total_steps:
            raise UserError(f"--samplers: {item!r}: {n} steps exceeds the checkpoint's diffusion.steps={total_steps} "
                            "(a sampler visits a subset of the training steps)")
        if (name, n) in out:
            raise UserError(f"--samplers: {item!r} is listed twice")
        out.append((name, n))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sample(checkpoint: str | Path, samplers: list[tuple[str, int]] | str, num_examples: int = 8,
                 length: int | None = None, split: str = "test", input_path: str | Path | None = None,
                 spacing: str = "time", device: str | torch.device = "auto", out_dir: str | Path = "bench_out",
                 overrides: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Generate for the same sources with every ``(sampler, steps)`` and compare speed and quality.

    Sources (and references) are the first ``num_examples`` of the checkpoint's data split ``split``, or of the
    jsonl file ``input_path``. ``length`` replaces ``data.seq_len`` for generation (rows are
    ``[BOS] src [SEP]`` + positions to generate, padded to it). ``overrides`` are ``--sample.key=value`` settings
    (batch size, clamp, seed, weights, ...) applied to every sampler; sampler, steps and spacing come from here.

    Each setting starts from the same seed. The first one is preceded by untimed warm-up generations (two steps,
    one per batch shape the timed runs use). Per setting the row gives ``seconds_per_doc`` (synchronised wall time of the whole
    generation, rounding and decoding included, / documents), ``target_tokens_per_s`` (positions generated per
    row, summed over rows, / time) and, when references exist, ``bleu`` (sacrebleu corpus BLEU), ``sentence_bleu``
    and ``rougeL`` from :func:`~sadiffuseq.evaluate.compute_metrics`. Writes ``sample.csv`` and ``sample.png``.
    """
    from sadiffuseq.checkpoint import load_model
    from sadiffuseq.config import apply_override
    from sadiffuseq.diffusion.samplers import SPACINGS
    from sadiffuseq.evaluate import compute_metrics
    from sadiffuseq.generate import file_sources, generate_records, split_sources
    from sadiffuseq.utils import resolve_device

    if spacing not in SPACINGS:
        raise UserError(f"--spacing {spacing!r}: choose from {', '.join(SPACINGS)}")
    if num_examples < 1:
        raise UserError(f"--num-examples {num_examples}: give at least 1")
    if isinstance(samplers, str):
        samplers = parse_samplers(samplers)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    overrides = list(overrides or [])
    bad = [o for o in overrides if not o.startswith("--sample.")]
    if bad:
        raise UserError(f"bench sample takes only --sample.key=value settings, not {' '.join(bad)}")
    weights = next((o.split("=", 1)[1] for o in overrides if o.startswith("--sample.weights=")), "ema")
    model, cfg, tokenizer = load_model(checkpoint, dev, weights if weights in ("ema", "raw") else "ema")
    cfg.train.device = str(dev)
    for item in overrides:
        apply_override(cfg, item)
    if length is not None:
        cfg.data.seq_len = length
    cfg.sample.spacing = spacing
    cfg.validate()
    samplers = parse_samplers(",".join(f"{n}:{s}" for n, s in samplers), cfg.diffusion.steps)
    if input_path:
        srcs, refs = file_sources(cfg, tokenizer, input_path, num_examples)
    else:
        srcs, refs = split_sources(cfg, tokenizer, split, num_examples)
    if not srcs:
        raise UserError("nothing to generate: the input has no examples")
    seq_len = cfg.data.seq_len
    longest = max(len(s) for s in srcs)
    if seq_len < longest + 3:
        raise UserError(f"--length {seq_len} leaves no room to generate after a source of {longest} tokens "
                        f"([BOS] src [SEP] needs {longest + 2}); give a longer --length")
    target_positions = sum(seq_len - len(s) - 2 for s in srcs)
    has_refs = any(r.strip() for r in refs)

    import copy

    # Untimed warm-up with every batch shape the timed runs will use (a full batch and the remainder): compiled
    # kernels (FlexAttention on CUDA) specialise on the batch size, and compiling must not count as sampling time.
    warm = copy.deepcopy(cfg)
    warm.sample.sampler, warm.sample.steps, warm.sample.mbr = samplers[0][0], min(2, samplers[0][1]), 1
    batch = max(1, cfg.sample.batch_size)
    for size in sorted({min(batch, len(srcs)), len(srcs) % batch} - {0}):
        generate_records(model, warm, tokenizer, srcs[:size], refs[:size], dev, progress=False)

    rows = []
    for name, steps in samplers:
        cfg.sample.sampler, cfg.sample.steps = name, steps
        torch.manual_seed(cfg.sample.seed)
        _sync(dev)
        t0 = time.perf_counter()
        records = generate_records(model, cfg, tokenizer, srcs, refs, dev, progress=progress)
        _sync(dev)
        elapsed = time.perf_counter() - t0
        row = {"sampler": name, "steps": steps, "label": f"{name}:{steps}", "spacing": spacing,
               "documents": len(records), "seq_len": seq_len, "target_positions": target_positions,
               "device": dev.type, "seconds": elapsed, "seconds_per_doc": elapsed / len(records),
               "target_tokens_per_s": target_positions / elapsed}
        if has_refs:
            m = compute_metrics([r["generated"] for r in records], [r["reference"] for r in records])
            row.update({"bleu": m["bleu"], "sentence_bleu": m["sentence_bleu"], "rougeL": m["rougeL"],
                        "mean_len": m["mean_len"]})
        rows.append(row)
        _write(rows, Path(out_dir), "sample")
    _plot_sample(rows, Path(out_dir) / "sample.png", f"{Path(checkpoint).name}, {len(srcs)} documents of "
                 f"{seq_len} positions, {spacing} spacing, {dev.type}")
    return rows


def _plot_sample(rows: list[dict], path: Path, title: str) -> None:
    from sadiffuseq.plots import plt

    metrics = [("bleu", "BLEU (corpus)"), ("rougeL", "ROUGE-L F1")] if "bleu" in rows[0] else \
        [("target_tokens_per_s", "target tokens / s")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), dpi=120, squeeze=False)
    x = [r["seconds_per_doc"] for r in rows]
    for ax, (key, label) in zip(axes[0], metrics):
        y = [r[key] for r in rows]
        for r in rows:
            ax.plot(r["seconds_per_doc"], r[key], "o")
            ax.annotate(r["label"], (r["seconds_per_doc"], r[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        if min(x) == max(x):  # one point (or equal times): give the log axis some room
            ax.set_xlim(min(x) / 2, max(x) * 2)
        if y and min(y) == max(y):
            ax.set_ylim(max(0.0, min(y) - 1), max(y) + 1)  # the metrics are never negative
        ax.set_xlabel("seconds per document")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write(rows: list[dict], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _plot_attention(rows: list[dict], path: Path, cfg: ModelConfig) -> None:
    from sadiffuseq.plots import plt

    L = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.loglog(L, [r["dense_ms"] for r in rows], "o-", color="C0", label="dense SDPA (fused kernel)")
    variants = [s for s in ("flash", *GLOBAL_SCHEDULES) if all(f"{s}_ms" in r for r in rows)]
    band = {"cudnn": "cuDNN band", "fa2": "FlashAttention-2 band"}.get(rows[0].get("flash_kernel"), "band kernel")
    names = {"flash": f"sparse, flash ({band})", **{s: f"sparse, flex, globals {s}" for s in GLOBAL_SCHEDULES}}
    for i, (variant, marker) in enumerate(zip(variants, "*sdv")):
        color = f"C{i + 1}"
        ax.loglog(L, [r[f"{variant}_ms"] for r in rows], marker + "-", color=color, label=names[variant])
        if all(f"{variant}_graph_ms" in r for r in rows):  # --cuda-graph: the same calls replayed as CUDA graphs
            ax.loglog(L, [r[f"{variant}_graph_ms"] for r in rows], marker + "--", color=color, alpha=0.6,
                      label=f"{names[variant]}, CUDA graph")
    if all("dense_graph_ms" in r for r in rows):
        ax.loglog(L, [r["dense_graph_ms"] for r in rows], "o--", color="C0", alpha=0.6, label="dense, CUDA graph")
    ax.loglog(L, [r["ideal_ms"] for r in rows], ":", color="gray", label="ideal = density × dense")
    if "naive_ms" in rows[0]:
        ax.loglog(L, [r["naive_ms"] for r in rows], "^--", label="naive FlexAttention mask")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"{cfg.n_heads} heads × {cfg.d_model // cfg.n_heads}, window ±{cfg.window}, "
                 f"dilations {sorted(set(cfg.dilations))}, {cfg.global_first} global", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_rows(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [keys] + [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)
