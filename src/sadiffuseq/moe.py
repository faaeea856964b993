"""Mixture-of-Experts feed-forward (MoE-DiffuSeq): router, dropless expert dispatch, auxiliary losses, statistics.

A block with ``model.ffn=moe`` replaces its dense feed-forward by E experts (each a GELU MLP of width
``expert_hidden(cfg)``) and a router. Every token (every position of every row) goes to ``top_k`` of them::

    logits = x W_r            (fp32, autocast off)        probs = softmax(logits)          (fp32)
    chosen = top_k(probs + b)  (b: optional balancing bias, selection only)
    gates  = probs[chosen] / sum(probs[chosen])            (top_k > 1)   |   probs[chosen]   (top_k = 1)
    y      = sum_j gates_j · FFN_{chosen_j}(x)  (+ shared_FFN(x) when model.moe_shared_expert)

**Why route on the hidden state.** The router sees the block's input, which already carries the diffusion time
embedding (added to every position before the first block) as well as the token's content. A heavily noised
input (large t) and a nearly clean one (small t) need different computation — at large t the network mostly
guesses x0 from the source and the context, at small t it mostly cleans up one token's embedding — so a
time-aware router lets experts specialise by noise level as well as by content, at the cost of one d × E
matrix. (Routing is per position; source, target and padding positions all pass through the router.)

Our choices (the MoE-DiffuSeq papers give no code and few hyper-parameters; everything here is ours):

* **Gates** are renormalised over the chosen k experts (as Mixtral's softmax over the top-k logits), so the
  output scale does not shrink as E grows. With ``top_k = 1`` the renormalised gate would be the constant 1
  and the task loss would never reach the router, so there we keep the raw probability (as Switch).
* **Expert width** ``moe_ffn_mult = 0`` means ``ffn_mult / (top_k + shared)``: every token then costs the same
  FLOPs as the dense FFN (plus the d × E router), so MoE-vs-dense comparisons are at equal active compute.
* **Dropless dispatch** (``moe_capacity_factor = 0``): the N·k (token, expert) pairs are sorted by expert; per-
  expert counts give the offsets; each projection is then one grouped matmul over the sorted rows — Triton
  kernels on Hopper GPUs (:mod:`sadiffuseq.moe_gemm`), else ``torch._grouped_mm`` — or, where neither supports
  the dtype/device/shape, one matmul per expert over its contiguous slice (the same numbers). Each token gathers
  its k results back through the inverse of the sort (``slot``), with its experts' down-projection biases,
  weighted by the gates (the sum over the k slots accumulates in fp32). Nothing in the forward or backward uses atomic adds or waits for the
  device: every data movement is a gather or a store to distinct rows (dropless, each token's row stored to its
  k sorted rows; with a capacity, the rows gathered from their tokens; a token's input gradient gathered from
  its k pairs; each sorted row's output gradient from its token), the up projection's bias is added with the
  GELU and its gradient summed per expert in the GELU's backward pass (:mod:`sadiffuseq.moe_kernels`:
  per-expert tiles, their sums added in a fixed order), the down biases' gradient is the (E × N) gate matrix
  times the output gradient (the Triton experts add both biases in their matmuls instead and take both gradients
  as column sums in their weight-gradient launch), and the per-expert counts are a one-hot sum. Dropless, the
  layer is therefore one graph with static shapes under ``torch.compile``, and a compiled model traces it into its blocks' graphs.
  On CUDA a dropless layer routes with :class:`_RouteDispatch` instead (the same results from three Triton
  kernels: selection with per-block histograms, their scan, a counting sort that stores the rows), and the
  combine's backward is one kernel (:func:`~sadiffuseq.moe_kernels.combine_backward`).
* **Capacity** (``moe_capacity_factor = c > 0``): each expert keeps at most ``ceil(c · N · k / E)`` pairs, in
  token order (earlier positions first); the rest are dropped (that expert contributes nothing to that token;
  the remaining gates are *not* renormalised) and counted in the statistics.
* **Auxiliary losses** (per MoE layer, summed over layers, weighted by ``moe_aux_weight`` / ``moe_z_weight``):
  Switch load balancing ``E · Σ_e f_e · P_e`` (f_e: fraction of the N·k assignments that went to e, before any
  capacity drop; P_e: mean router probability of e; 1.0 when balanced) and the router z-loss
  ``mean(logsumexp(logits)²)`` (keeps logits small so the fp32 softmax stays well conditioned).
* **Auxiliary-loss-free balancing** (``moe_bias_update = γ > 0``, DeepSeek-V3): a per-expert bias b, added to
  the probabilities for *selection only* (gates still come from the probabilities), is moved by
  ``γ · sign(mean load − load_e)`` once per training step. The assignment counts of a training forward are
  accumulated in ``route_pending`` and applied at the start of the next training forward of the
  :class:`~sadiffuseq.model.Denoiser`, so an activation-checkpointing recompute routes exactly as the original
  forward did. ``route_bias`` and ``route_pending`` are non-trainable parameters so they are saved in both
  the raw and the EMA checkpoint (the EMA model routes with the averaged bias) and resume is exact. Under
  DDP each rank updates from its own counts (the bias may then differ slightly between ranks).

Per forward, each :class:`MoEFFN` leaves ``last_aux`` (``balance``, ``z``: scalar tensors with gradients) and
``last_stats`` (``load``: (E,) fraction of assignments per expert, ``entropy``: mean router entropy in nats,
``dropped``: number of dropped pairs; detached tensors, no device sync). The Denoiser collects them through
:func:`collect_aux_losses` and :func:`collect_stats`; :class:`MoEStatsMeter` averages them between log steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sadiffuseq import moe_gemm, moe_kernels, moe_router
from sadiffuseq.config import ModelConfig
from sadiffuseq.errors import UserError
from sadiffuseq.moe_gemm import experts_ffn
from sadiffuseq.moe_kernels import bias_gelu, combine_backward
from sadiffuseq.moe_router import router_logits_value, router_weight_grad_of, token_grad


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in for input x: autocast's where autocast is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def uses_moe(cfg: ModelConfig, layer: int) -> bool:
    """Whether block ``layer`` holds experts: ``model.ffn=moe`` and the layer is listed (empty list: all)."""
    return cfg.ffn == "moe" and (not cfg.moe_layers or layer in cfg.moe_layers)


def expert_hidden(cfg: ModelConfig) -> int:
    """Width of one expert's hidden layer (see the module docstring for the default)."""
    mult = cfg.moe_ffn_mult or cfg.ffn_mult / (cfg.moe_top_k + int(cfg.moe_shared_expert))
    return max(1, int(round(mult * cfg.d_model)))


# ---------------------------------------------------------------------------------------------------------
# Routing and dispatch (pure functions, tested on their own)


@dataclass
class Routing:
    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32
    experts: torch.Tensor  # (N, k) int64, the chosen experts of each token
    gates: torch.Tensor  # (N, k) fp32, their weights


def select_experts(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The top-k experts of each token (N, k), largest first, by router probability (plus the balancing bias)."""
    with torch.no_grad():
        probs = logits.float().softmax(-1)
        return top_k_indices(probs if bias is None else probs + bias.float(), top_k)


def route(logits: torch.Tensor, experts: torch.Tensor) -> Routing:
    """The routing of tokens with router logits (N, E) (fp32, with their gradient) to the chosen ``experts`` (N, k):
    probabilities and gate weights."""
    probs = logits.softmax(-1)
    gates = probs.gather(-1, experts)
    if experts.shape[1] > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    return Routing(logits, probs, experts, gates)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest entries of each row, largest first: the indices of ``torch.topk``, as k rounds of
    argmax. Under ``torch.compile`` the rounds fuse with the softmax into the router's one kernel, where
    ``torch.topk`` is a separate sort-based kernel (2 % of the layer's GPU time at 32k tokens, 8 experts)."""
    picks = []
    for _ in range(k):
        best = scores.argmax(-1, keepdim=True)
        picks.append(best)
        scores = scores.scatter(-1, best, float("-inf"))
    return torch.cat(picks, -1)


@dataclass
class Dispatch:
    pair: torch.Tensor  # (M,) index into the flattened (N·k) pairs, sorted by expert; kept pairs only
    token: torch.Tensor  # (M,) the token of each sorted pair
    expert: torch.Tensor  # (M,) the expert of each sorted pair (non-decreasing)
    slot: torch.Tensor  # (N·k,) the inverse of ``pair``: the sorted row holding each pair's result (dropped: 0)
    kept: torch.Tensor | None  # (N·k,) bool, False for pairs dropped by a capacity; None when dropless
    routed: torch.Tensor  # (E,) pairs routed to each expert (before any capacity drop)
    counts: torch.Tensor  # (E,) pairs each expert computes (after the capacity drop)
    dropped: torch.Tensor  # () number of dropped pairs
    ends: torch.Tensor | None = None  # (E,) int32, the running sums of ``counts`` (None: computed when needed)


def capacity_of(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int | None:
    """Static per-expert capacity ``ceil(c · N · k / E)``; None (dropless) when c = 0."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def dispatch(experts: torch.Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Sort the (token, expert) pairs by expert (stable: token order within an expert); apply the capacity.

    Dropless, every shape is static and nothing waits for the device: the per-expert counts are a one-hot sum
    (``torch.bincount`` would size its output from the data, a host sync and a graph break under
    ``torch.compile``), and ``slot`` is the inverse permutation of ``pair``. A capacity keeps a data-dependent
    number of pairs."""
    n_tokens, k = experts.shape
    flat = experts.reshape(-1)
    positions = torch.arange(flat.numel(), device=flat.device)
    # Sorting 8-bit keys is one radix pass instead of eight for int64 (the order, stable, is the same).
    keys = flat.to(torch.uint8) if n_experts <= 256 else flat
    pair = torch.argsort(keys, stable=True)
    expert = flat[pair]
    routed = (flat[:, None] == torch.arange(n_experts, device=flat.device)).sum(0)
    counts, dropped, kept = routed, torch.zeros((), dtype=torch.long, device=flat.device), None
    if capacity is not None:
        starts = torch.cumsum(routed, 0) - routed
        keep = positions - starts[expert] < capacity
        pair, expert = pair[keep], expert[keep]
        counts = routed.clamp(max=capacity)
        dropped = (routed - counts).sum()
        kept = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, pair, True)
    slot = torch.zeros_like(flat).scatter_(0, pair, positions[: pair.numel()])
    return Dispatch(pair, torch.div(pair, k, rounding_mode="floor"), expert, slot, kept, routed, counts, dropped)


class _GatherRouted(torch.autograd.Function):
    """The rows of x (N, w) for the sorted token–expert pairs in ``dtype`` (``x[token]``, (M, w)), and the router's
    logits (N, E) with their gradient: one autograd node, so that both gradients with respect to x are written in
    one pass (:func:`sadiffuseq.moe_router.token_grad`).

    ``logits`` come in computed (:func:`~sadiffuseq.moe_router.router_logits_value`, they chose the experts) and
    leave as this node's output, the router's weight gradient and its share of x's gradient computed here. The cast
    to the compute dtype happens here, where ``torch.compile`` fuses it into the one pass that writes the sorted rows.
    Backward without atomics (autograd's would scatter-add every row into its token): each token gathers its k
    pairs' gradients through ``slot``; dropped pairs (``kept`` False) contribute nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, logits, token, slot, kept, k: int, dtype: torch.dtype):
        ctx.save_for_backward(x, weight, slot, kept)
        ctx.k = k
        xc = x.to(dtype)
        if kept is None:
            # Dropless, every sorted row is one token's pair: each token's row is read once and written to its k
            # rows (distinct destinations: a plain store), instead of k gathers of the same row.
            src = xc.unsqueeze(1).expand(-1, k, -1).reshape(-1, x.shape[1])
            rows = xc.new_empty(slot.numel(), x.shape[1]).index_copy(0, slot, src)
        else:
            rows = xc.index_select(0, token)
        return rows, logits.clone()

    @staticmethod
    def backward(ctx, grad_rows, grad_logits):
        x, weight, slot, kept = ctx.saved_tensors
        # With autocast off: a traced backward would otherwise run under the forward's ambient autocast.
        with torch.autocast(x.device.type, enabled=False):
            if grad_logits is None:
                grad_logits = x.new_zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
            if grad_rows is None:
                grad_rows = x.new_zeros(slot.numel(), x.shape[1])
            grad_x = token_grad(grad_rows, slot, kept, grad_logits, weight, ctx.k, x.dtype)
            grad_w = router_weight_grad_of(grad_logits, x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None, None, None, None


class _RouteDispatch(torch.autograd.Function):
    """The whole routing of a dropless layer on the GPU, three kernels forward and one backward
    (:mod:`sadiffuseq.moe_router`): the router's logits, softmax, top-k and gates with each block's histogram of
    chosen experts; a scan of the histograms (each block's first sorted row per expert, the counts, the mean
    probabilities, logsumexp² and entropy, all summed in a fixed order); the counting sort's ranks and the cast
    rows stored to their sorted places. What the PyTorch path does in about twenty small kernels, a radix sort
    among them.

    Outputs with gradients: the sorted rows (M, w) in ``dtype``, the gates (N, k), the mean probability per expert
    (E, for the balance loss) and ``stats`` = (mean logsumexp², mean entropy) (the first is the z-loss). Then the
    integer outputs: experts (N, k), slot, pair, token, sorted expert (M,), counts (E,) and their running sums (E,
    int32). The backward finds the logits' gradient from those of the gates, the mean probabilities and the
    z-loss, and writes x's gradient in one pass (:func:`~sadiffuseq.moe_router.token_grad`'s gather-sum plus
    ``dlogits · W``); the router's weight gradient is fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, dtype: torch.dtype):
        out = torch.ops.sadiffuseq.moe_route_dispatch(x, weight, bias, k, dtype)
        rows, logits, experts, gates, slot, pair, token, expert, counts, ends, pmean, stats = out
        ctx.save_for_backward(x, weight, logits, experts, slot)
        ctx.k = k
        ctx.mark_non_differentiable(experts, slot, pair, token, expert, counts, ends)
        return rows, gates, pmean, stats, experts, slot, pair, token, expert, counts, ends

    @staticmethod
    def backward(ctx, grad_rows, grad_gates, grad_pmean, grad_stats, *_):
        x, weight, logits, experts, slot = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            if grad_rows is None:
                grad_rows = x.new_zeros(slot.numel(), x.shape[1])
            grad_z = None if grad_stats is None else grad_stats[:1]
            grad_x, grad_logits = torch.ops.sadiffuseq.moe_route_token_grad(
                grad_rows, slot, logits, experts, grad_gates, grad_pmean, grad_z, weight, ctx.k, x.dtype)
            grad_w = router_weight_grad_of(grad_logits, x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None


class _CombinePairs(torch.autograd.Function):
    """``y[n] = Σ_j gates[n, j] · (rows[slot(n, j)] + bias[experts[n, j]])``: each token's k expert outputs (sorted
    rows, (M, d)) plus their experts' down-projection biases, gate-weighted, back in token order, (N, d).

    Written slot by slot, so that ``torch.compile`` makes each direction one pass with no (N, k, d) buffer and no
    atomics. Forward: per token, k gathered rows, summed in fp32. Backward: per *sorted* row m (token t, pair p),
    the row's gradient ``gates[p] · grad_y[t]`` and its gate's gradient ``(rows[m] + bias[expert[m]]) · grad_y[t]``
    in the same pass over the same gathered ``grad_y[t]``; the gate gradients then go back to (token, slot) order
    through ``slot``. The bias gradient is one (E × N)(N × d) product of the gate matrix. Dropped pairs must carry
    a zero gate. Dropless on the GPU, with the experts' row ranges ``ends``, all three gradients come from one Triton
    kernel instead (:func:`~sadiffuseq.moe_kernels.combine_backward`). ``bias=None`` where the rows hold their
    experts' biases already (the Triton experts add it in the down projection's matmul).
    """

    @staticmethod
    def backward_on_triton(rows: torch.Tensor, kept: torch.Tensor | None, ends: torch.Tensor | None) -> bool:
        """Whether the backward is the Triton kernel: dropless, with the experts' row ranges, on its device."""
        return kept is None and ends is not None and moe_kernels.use_triton(rows)

    @staticmethod
    def forward(ctx, rows, gates, bias, experts, expert, pair, token, slot, kept, ends):
        ctx.save_for_backward(rows, gates, bias, experts, expert, pair, token, slot, kept, ends)
        n, k = gates.shape
        slots, chosen = slot.view(n, k), experts.view(n, k)
        y = None
        for j in range(k):
            out = rows.index_select(0, slots[:, j])
            if bias is not None:
                out = out + bias.index_select(0, chosen[:, j])
            term = gates[:, j, None].float() * out.float()
            y = term if y is None else y + term
        return y.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        rows, gates, bias, experts, expert, pair, token, slot, kept, ends = ctx.saved_tensors
        if _CombinePairs.backward_on_triton(grad, kept, ends):
            grad_rows, grad_gates, grad_bias = combine_backward(grad, rows, bias, gates, pair, token, ends)
            return grad_rows, grad_gates, grad_bias, None, None, None, None, None, None, None
        grad_token = grad.index_select(0, token)
        grad_rows = grad_token * gates.view(-1).index_select(0, pair)[:, None]
        out = rows if bias is None else rows + bias.index_select(0, expert)
        dots = (out.float() * grad_token.float()).sum(-1)
        grad_gates = dots.index_select(0, slot).view_as(gates)
        if kept is not None:  # a dropped pair's slot points at an unrelated row
            grad_gates = grad_gates * kept.view_as(gates)
        grad_bias = None
        if bias is not None:
            gate_matrix = torch.zeros(gates.shape[0], bias.shape[0], dtype=grad.dtype, device=grad.device)
            grad_bias = gate_matrix.scatter(1, experts, gates).t() @ grad
        return grad_rows, grad_gates.to(gates.dtype), grad_bias, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Expert matmuls: grouped (one kernel per projection) or a loop over experts


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (the grouped-mm backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of a (M, K) times b[e] (K, N), as one ``torch._grouped_mm`` call."""
    return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offsets))


def loop_matmul(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The same product as :func:`grouped_matmul`, one matmul per expert (the reference and the fallback)."""
    outs = [rows @ b[e] for e, rows in enumerate(a.split(counts)) if counts[e]]
    return torch.cat(outs) if outs else a.new_zeros(0, b.shape[-1])


class _SegmentBias(torch.autograd.Function):
    """``rows + bias[e]`` for rows sorted into contiguous expert segments of sizes ``counts``.

    The same numbers as ``rows + bias[expert]``, but the bias gradient is one small matmul, ``onehot(expert)ᵀ ·
    grad`` (E × M times M × h on the tensor cores, fp32 accumulation): the gather's backward would scatter-add
    every row into one of E bias rows, tens of thousands of atomic adds contending for the same few addresses.
    """

    @staticmethod
    def forward(ctx, rows, bias, counts, expert):
        ctx.save_for_backward(expert)
        ctx.n_experts = bias.shape[0]
        return rows + bias.repeat_interleave(counts, dim=0, output_size=rows.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (expert,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = F.one_hot(expert, ctx.n_experts).to(grad.dtype).t() @ grad
        return grad, grad_bias, None, None


def experts_forward(
    x: torch.Tensor,
    expert: torch.Tensor,
    counts: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    impl: str,
    ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """``GELU(x W_up[e] + b_up[e]) W_down[e] + b_down[e]`` for rows x (M, d) sorted by expert ``expert`` (M,)
    (``counts[e]`` rows of expert e, contiguous), in x's dtype (the parameters are cast to it). With ``b_down=None``
    the down projection's bias is left to the caller (the layer adds it gate-weighted per token).

    ``impl``: ``triton`` — Triton grouped matmuls, the weight gradients written in the parameters' dtype
    (:mod:`sadiffuseq.moe_gemm`); ``grouped`` — one ``torch._grouped_mm`` per projection, the up projection's bias
    and the GELU one autograd node with a fused backward (:mod:`sadiffuseq.moe_kernels`); ``loop`` — one matmul per
    expert (the reference and the fallback). ``ends``: the running sums of ``counts`` (int32), where the caller has
    them."""
    offsets = torch.cumsum(counts, 0).to(torch.int32) if ends is None else ends
    if impl == "triton":  # the down projection's bias added in its matmul's epilogue
        return experts_ffn(x, w_up, b_up, w_down, expert, offsets, b_down)
    else:
        if impl == "grouped":
            mm = lambda a, b: grouped_matmul(a, b, offsets)  # noqa: E731
        elif impl == "loop":
            sizes = counts.tolist()
            mm = lambda a, b: loop_matmul(a, b, sizes)  # noqa: E731
        else:
            raise ValueError(f"unknown expert matmul implementation {impl!r}")
        h = bias_gelu(mm(x, w_up.to(x.dtype)), b_up.to(x.dtype), expert, offsets)
        y = mm(h, w_down.to(x.dtype))
    return y if b_down is None else _SegmentBias.apply(y, b_down.to(x.dtype), counts, expert)


_GROUPED_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


@torch.compiler.disable
def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` exists and gives the loop's numbers, forward and backward, for this
    device type and dtype (probed once on a small problem, then cached)."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_SUPPORT:
        _GROUPED_SUPPORT[key] = _probe_grouped_mm(torch.device(device), dtype)
    return _GROUPED_SUPPORT[key]


@torch.compiler.disable
def grouped_mm_traceable(dtype: torch.dtype) -> bool:
    """Whether ``torch.compile`` can trace ``torch._grouped_mm`` for this dtype: its meta function (what tracing
    runs) may accept fewer dtypes than the eager kernels — in torch 2.13 bf16 only, where the CPU kernel also takes
    fp32."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    a, b = torch.empty(16, 16, dtype=dtype, device="meta"), torch.empty(2, 16, 16, dtype=dtype, device="meta")
    try:
        torch._grouped_mm(a, b, offs=torch.empty(2, dtype=torch.int32, device="meta"))
    except Exception:  # the meta function's dtype and shape checks
        return False
    return True


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(10, 16, generator=g), torch.randn(3, 16, 32, generator=g)
    counts = [3, 0, 7]  # an empty group included
    results = []
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for use_grouped in (True, False):
                a = a0.to(device, dtype).requires_grad_()
                b = b0.to(device, dtype).requires_grad_()
                if use_grouped:
                    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
                    y = grouped_matmul(a, b, offsets)
                else:
                    y = loop_matmul(a, b, counts)
                y.float().sum().backward()
                results.append([y.float().cpu(), a.grad.float().cpu(), b.grad.float().cpu()])
    except Exception:  # missing kernel, unsupported dtype/device, alignment rules: use the loop
        return False
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    return all(torch.allclose(u, v, rtol=tol, atol=tol * 10) for u, v in zip(*results))


# The implementations whose shapes never depend on the routing (no host sync): traceable into one graph.
STATIC_IMPLS = ("triton", "grouped")

# ---------------------------------------------------------------------------------------------------------
# The module


class MoEFFN(nn.Module):
    """Drop-in replacement for :class:`~sadiffuseq.model.DenseFFN`: ``forward(x)`` maps (..., d) to (..., d)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.bias_rate = cfg.moe_bias_update
        self.impl = cfg.moe_impl
        d, h, E = cfg.d_model, expert_hidden(cfg), cfg.moe_experts
        self.d_model, self.hidden = d, h
        self.router = nn.Linear(d, E, bias=False)
        # Stacked expert weights, initialised like nn.Linear (uniform in ±1/sqrt(fan_in)).
        self.w_up = nn.Parameter(torch.empty(E, d, h).uniform_(-(d**-0.5), d**-0.5))
        self.b_up = nn.Parameter(torch.empty(E, h).uniform_(-(d**-0.5), d**-0.5))
        self.w_down = nn.Parameter(torch.empty(E, h, d).uniform_(-(h**-0.5), h**-0.5))
        self.b_down = nn.Parameter(torch.empty(E, d).uniform_(-(h**-0.5), h**-0.5))
        self.shared = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) if cfg.moe_shared_expert else None
        if self.bias_rate > 0:
            self.route_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
            self.route_pending = nn.Parameter(torch.zeros(E), requires_grad=False)
        else:
            self.route_bias = self.route_pending = None
        self._resolved: dict[tuple[str, torch.dtype, bool], str] = {}
        self._compiled = None  # compile_routed
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.n_experts}, top_k={self.top_k}, hidden={self.hidden}"

    def resolve_impl(self, device: torch.device, dtype: torch.dtype, traced: bool = False) -> str:
        """The expert-matmul implementation a forward uses (``model.moe_impl`` resolved; cached per device type,
        dtype and whether the forward is being traced by ``torch.compile``, so a compiled forward finds it without
        re-probing)."""
        if self.impl == "loop":
            return "loop"
        key = (torch.device(device).type, dtype, traced)
        if key not in self._resolved:
            self._resolved[key] = self._resolve_impl(device, dtype, traced)
        return self._resolved[key]

    def _resolve_impl(self, device: torch.device, dtype: torch.dtype, traced: bool) -> str:
        if self.impl in ("auto", "triton") and moe_gemm.supported(device, dtype, self.d_model, self.hidden):
            if moe_gemm.works(device, dtype):
                return "triton"
            if self.impl == "triton":
                raise UserError(
                    f"model.moe_impl=triton: the Triton expert kernels failed to build or to match a per-expert loop "
                    f"for {dtype} on {torch.device(device).type} "
                    f"(Triton {getattr(moe_gemm.triton, '__version__', None)}); "
                    "use model.moe_impl=auto, grouped or loop"
                )
        if self.impl == "triton":
            raise UserError(
                f"model.moe_impl=triton needs Triton and a CUDA GPU of compute capability 9.0 or newer, fp16/bf16, and "
                f"d_model and the expert width giving rows of whole multiples of 16 bytes (got {dtype} on "
                f"{torch.device(device).type}, d_model={self.d_model}, expert width={self.hidden}); use "
                "model.moe_impl=auto, grouped or loop"
            )
        ok = moe_gemm.rows_aligned(dtype, self.d_model, self.hidden) and grouped_mm_supported(device, dtype)
        if ok and (not traced or grouped_mm_traceable(dtype)):
            return "grouped"
        if self.impl == "grouped":
            raise UserError(
                f"model.moe_impl=grouped: torch._grouped_mm (torch {torch.__version__}) is unavailable or unsupported "
                f"for {dtype} on {torch.device(device).type} with d_model={self.d_model}, expert width={self.hidden} "
                "(row strides must be multiples of 16 bytes)" + (", or cannot be compiled for it" if traced else "")
                + "; use model.moe_impl=auto or loop"
            )
        return "loop"

    @torch.no_grad()
    def apply_bias_update(self) -> None:
        """Move the selection bias toward balance using the counts of the training forwards since the last call."""
        if self.route_bias is None:
            return
        c = self.route_pending
        self.route_bias.add_(self.bias_rate * torch.sign(c.mean() - c))  # all zero (no forward yet): no change
        c.zero_()

    def compile_routed(self, **compile_options) -> "MoEFFN":
        """Compile the layer (:meth:`routed_forward`) as a region of its own, for the calls that a compiled block
        does not trace into its graph (see :meth:`forward`) and for ``bench moe --compile``. Dropless, the whole
        layer — router, top-k, dispatch, gathers, GELU, combine, forward and backward — is one graph."""
        self._compiled = torch.compile(self.routed_forward, **compile_options)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inside a compiled block, a dropless layer on the grouped matmuls is traced into the block's graph: static
        # shapes, no host sync, and no exit from the graph (at 8k tokens each exit and re-entry cost more host time
        # than the layer's GPU time). Everything else runs outside the graph.
        if torch.compiler.is_compiling() and self.capacity_factor <= 0:
            if self._resolved.get((x.device.type, compute_dtype(x), True)) in STATIC_IMPLS:  # resolved by prepare
                return self.routed_forward(x)
        return self._forward_outside(x)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Resolve the expert-matmul implementation before any graph is traced (the probe runs kernels, which a
        trace cannot); the Denoiser calls this before its blocks run."""
        self.resolve_impl(device, dtype, traced=True)

    # Outside the graphs: the expert-matmul probe (resolve_impl) runs kernels, which cannot be traced, and a
    # capacity makes shapes data-dependent. Compiled as a region of its own after compile_routed.
    @torch.compiler.disable
    def _forward_outside(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.routed_forward(x)
        if self.resolve_impl(x.device, compute_dtype(x), traced=True) not in STATIC_IMPLS:
            # The loop reads the per-expert counts on the host: under torch.compile a graph break and a recompile
            # for every new set of counts. Eager is the faster way to run it.
            return self.routed_forward(x)
        return self._compiled(x)

    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer itself, eager or compiled (:meth:`compile_routed`; ``bench moe --compile`` compiles this too,
        after :meth:`resolve_impl` has run outside the graph)."""
        shape, d = x.shape, x.shape[-1]
        flat = x.reshape(-1, d)
        n = flat.shape[0]
        dev = x.device.type
        dtype = compute_dtype(x)

        weight = self.router.weight
        cap = capacity_of(self.capacity_factor, n, self.top_k, self.n_experts)
        with torch.autocast(dev, enabled=False):
            if cap is None and moe_router.use_triton(flat):
                rows, gates, experts, disp, aux, entropy = self._route_fused(flat, dtype)
            else:
                rows, gates, experts, disp, aux, entropy = self._route(flat, dtype, cap)
            impl = self.resolve_impl(x.device, dtype, torch.compiler.is_compiling()) if disp.pair.numel() else "loop"
            # The Triton experts add the down projection's bias in its matmul (and take its gradient with the
            # weights'); the others leave it to the combine.
            in_experts = impl == "triton"
            ys = experts_forward(rows, disp.expert, disp.counts, self.w_up, self.b_up, self.w_down,
                                 self.b_down if in_experts else None, impl, disp.ends)
            # The gates go to the combine in the compute dtype, except where its backward is the Triton kernel (which
            # reads them in any dtype and returns their gradient in theirs): there they stay fp32, which costs no
            # traffic to speak of (k numbers per token) and saves a cast kernel each way.
            if not _CombinePairs.backward_on_triton(ys, disp.kept, disp.ends):
                gates = gates.to(dtype)
            if disp.kept is not None:  # a dropped pair contributes nothing, its expert's bias included
                gates = gates * disp.kept.view(n, self.top_k).to(dtype)
            # Back to token order, gate-weighted, with the down projections' biases. In the compute dtype: the sum
            # over the k slots accumulates in fp32 inside the reduction, and fp32 copies of the (N, k, d) outputs
            # would double the memory traffic of the combine and of its backward.
            y = _CombinePairs.apply(
                ys, gates, None if in_experts else self.b_down.to(dtype), experts, disp.expert, disp.pair,
                disp.token, disp.slot, disp.kept, disp.ends
            )
        if self.shared is not None:
            y = y + self.shared(flat)

        self.last_aux = aux
        self.last_stats = {"load": disp.routed.float().detach() / max(1, n * self.top_k), "entropy": entropy,
                           "dropped": disp.dropped}
        if self.route_pending is not None and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.route_pending.add_(disp.routed.float())
        return y.view(shape)

    def _route(self, flat: torch.Tensor, dtype: torch.dtype, cap: int | None):
        """Routing and dispatch in PyTorch (any device, and with a capacity): the sorted rows in ``dtype``, the
        gates (N, k) fp32, the chosen experts (N, k), the :class:`Dispatch`, the auxiliary losses and the mean
        router entropy."""
        n = flat.shape[0]
        weight = self.router.weight
        logits = router_logits_value(flat, weight)  # fp32, no gradient yet: it chooses the experts
        experts = select_experts(logits, self.top_k, self.route_bias)
        disp = dispatch(experts, self.n_experts, cap)
        # The logits get their gradient from the node that also gathers the rows.
        rows, logits = _GatherRouted.apply(flat, weight, logits, disp.token, disp.slot, disp.kept, self.top_k, dtype)
        r = route(logits, experts)
        frac = disp.routed.float() / max(1, n * self.top_k)
        aux = {"balance": self.n_experts * (frac * r.probs.mean(0)).sum(),
               "z": torch.logsumexp(r.logits, -1).pow(2).mean()}
        with torch.no_grad():
            entropy = -(r.probs * r.logits.log_softmax(-1)).sum(-1).mean()
        return rows, r.gates, experts, disp, aux, entropy

    def _route_fused(self, flat: torch.Tensor, dtype: torch.dtype):
        """:meth:`_route` for a dropless layer on the GPU: the same results from :class:`_RouteDispatch`."""
        n = flat.shape[0]
        out = _RouteDispatch.apply(flat, self.router.weight, self.route_bias, self.top_k, dtype)
        rows, gates, pmean, stats, experts, slot, pair, token, expert, counts, ends = out
        disp = Dispatch(pair, token, expert, slot, None, counts, counts, flat.new_zeros((), dtype=torch.long), ends)
        frac = counts.float() / max(1, n * self.top_k)
        aux = {"balance": self.n_experts * (frac * pmean).sum(), "z": stats[0]}
        return rows, gates, experts, disp, aux, stats[1].detach()


# ---------------------------------------------------------------------------------------------------------
# Collecting losses and statistics over the layers of a model


def moe_modules(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def collect_aux_losses(modules: list[MoEFFN], cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, float]] | None:
    """``{name: (value summed over MoE layers, weight)}`` from the last forward, or None without MoE layers.

    The sum over layers (not the mean) gives every layer's router the same pressure whatever the depth, as in
    Switch / ST-MoE; a perfectly balanced model therefore reports ``moe_aux`` = the number of MoE layers.
    """
    if not modules or not modules[0].last_aux:
        return None
    return {
        "moe_aux": (sum(m.last_aux["balance"] for m in modules), cfg.moe_aux_weight),
        "moe_z": (sum(m.last_aux["z"] for m in modules), cfg.moe_z_weight),
    }


def collect_stats(modules: list[MoEFFN]) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: last_stats}`` of every MoE layer that has run a forward."""
    return {m.layer: m.last_stats for m in modules if m.last_stats}


class MoEStatsMeter:
    """Averages per-layer MoE statistics over the steps between two log lines (no device sync until flush).

    A flush gives, per MoE layer i: ``moe_load_l{i}`` (mean fraction of assignments per expert, a list of E),
    ``moe_entropy_l{i}`` (mean router entropy, nats) and ``moe_dropped_l{i}`` (mean dropped pairs per step).
    """

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.steps = 0

    def add(self, stats: dict[int, dict[str, torch.Tensor]]) -> None:
        for layer, s in stats.items():
            acc = self.sums.setdefault(layer, {})
            for key, v in s.items():
                v = v.detach().float()
                acc[key] = acc[key] + v if key in acc else v.clone()
        self.steps += 1

    def flush(self) -> dict[str, float | list[float]]:
        n = max(1, self.steps)
        record: dict[str, float | list[float]] = {}
        for layer in sorted(self.sums):
            s = self.sums[layer]
            record[f"moe_load_l{layer}"] = [round(v, 6) for v in (s["load"] / n).tolist()]
            record[f"moe_entropy_l{layer}"] = float(s["entropy"]) / n
            record[f"moe_dropped_l{layer}"] = float(s["dropped"]) / n
        self.sums, self.steps = {}, 0
        return record
