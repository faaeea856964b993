"""The MoE router's fp32 matmuls and the token rows' gradient, as Triton kernels.

The router is a (d × E) matrix, E small (8 in the presets): its matmuls have almost no arithmetic and are bound by
reading the token rows x (N × d, fp32 in mixed precision). Left to ``F.linear``, they cost more than they should:
cuBLAS runs the forward as a general fp32 GEMM at about a third of the memory bandwidth; the input gradient
``dlogits · W`` becomes a matmul whose (N × d) result is written and read again, to be added to the gradient that
the dispatch sends back; and in the graph ``torch.compile`` traced for the layer inside a bf16 autocast region
(PyTorch 2.11, CUDA), the backward's matmuls ran in bf16 although the forward ran with autocast off. Here:

* :func:`router_logits_value` computes ``x Wᵀ`` reading each row once;
* :func:`token_grad` writes each token's input gradient in one pass: the sum of its k dispatched rows' gradients
  (gathered through ``slot``, no atomics) plus ``dlogits · W`` (E multiply-adds per element, done as a small dot
  per block of rows);
* :func:`router_weight_grad_of` computes ``dlogitsᵀ · x`` in fp32: each program reduces a span of rows and a
  fixed-order sum adds the spans (deterministic, no atomics).

A dropless layer on CUDA goes further (``sadiffuseq::moe_route_dispatch`` and ``moe_route_token_grad``, tied
together by ``moe._RouteDispatch``): the logits kernel also takes the softmax, the top-k, the gates and each block
of tokens' histogram of chosen experts; one program scans the histograms into every block's first sorted row per
expert (a stable counting sort) and sums the losses' means in a fixed order; a third kernel ranks each block's
pairs and stores the cast rows to their sorted places. Its backward finds the logits' gradient inside the kernel
that writes x's gradient.

Otherwise the layer ties them together in one autograd node (``moe._GatherRouted``): the dispatch's rows and the
router's logits leave the same forward, so their two gradients meet in one backward. The dot products run as ``tf32x3``
(three TF32 tensor-core products per block, as accurate as fp32 for these sums) by default;
``ROUTER["precision"] = "ieee"`` gives the plain fp32 product (always used on GPUs without TF32, before Ampere).
Off CUDA (and without Triton) the same numbers come from PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sadiffuseq.attention.globals_triton import interpreting, triton

if triton is not None:
    import triton.language as tl

# Launch settings (H100, d 768, 8 experts, 8k and 32k tokens; scripts/gpu_tune_moe_router.py): the logits take BM
# rows per program, BK columns at a time; the weight gradient's programs each reduce ROWS rows, BR at a time, over
# BD columns; the token gradient's take token_BM tokens and token_BD columns.
ROUTER = dict(BM=128, BK=64, warps=8, ROWS=512, BR=32, BD=128, grad_warps=4, token_BM=16, token_BD=128,
              token_warps=4, precision="tf32x3")
# Up to SMALL_TOKENS tokens the weight gradient takes these settings instead, chosen the same way at 8k tokens
# alone: 14.4 µs there in the layer where ROUTER's take 19.5 (shorter spans, more programs; their sum then reads
# twice the partial rows).
ROUTER_SMALL = dict(ROWS=256, BR=32, BD=64, grad_warps=4)
SMALL_TOKENS = 16384
# The fused routing of a dropless layer (``sadiffuseq::moe_route_dispatch``): the selection kernel takes BM tokens
# per program (BK columns at a time), and so does the dispatch, BD columns per program; the scan goes CH blocks at a
# time. Its backward takes grad_BM tokens and grad_BD columns per program. Retuned with the other MoE kernels in
# place (scripts/gpu_tune_moe_router.py 8192 32768 --only route route_grad): the forward's three kernels 40.0 µs at
# 8k tokens where the settings before (BM 128, BD 128, 8 dispatch warps) took 46.4; the same at 32k (132.6 / 133.4).
ROUTE = dict(BM=64, BK=64, warps=4, BD=256, dispatch_warps=4, CH=256, scan_warps=4, grad_BM=16, grad_BD=128,
             grad_warps=8)


def use_triton(x: Tensor) -> bool:
    """Whether the router's Triton kernels run for x: a CUDA tensor (a CPU one under Triton's interpreter)."""
    return triton is not None and x.is_cuda != interpreting()


if triton is not None:

    @triton.jit
    def _logits_block(X, W, rows, N, D, E, EP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      PRECISION: tl.constexpr):
        """``x · Wᵀ`` in fp32 for the token rows ``rows`` (BM of them, those ≥ N read as zero): (BM, EP), the lanes
        past E zero."""
        experts = tl.arange(0, EP)
        acc = tl.zeros((BM, EP), dtype=tl.float32)
        for k in range(0, D, BK):
            cols = k + tl.arange(0, BK)
            x = tl.load(X + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            w = tl.load(W + experts[None, :] * D + cols[:, None],
                        mask=(experts < E)[None, :] & (cols < D)[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _logits_kernel(X, W, OUT, N, D, E, EP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        experts = tl.arange(0, EP)
        acc = _logits_block(X, W, rows, N, D, E, EP, BM, BK, PRECISION)
        tl.store(OUT + rows.to(tl.int64)[:, None] * E + experts[None, :], acc,
                 mask=(rows < N)[:, None] & (experts < E)[None, :])

    @triton.jit
    def _weight_grad_kernel(X, G, PART, N, D, E, EP: tl.constexpr, ROWS: tl.constexpr, BR: tl.constexpr,
                            BD: tl.constexpr, PRECISION: tl.constexpr):
        span = tl.program_id(0)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        experts = tl.arange(0, EP)
        acc = tl.zeros((EP, BD), dtype=tl.float32)
        for r in range(0, ROWS, BR):
            rows = span * ROWS + r + tl.arange(0, BR)
            g = tl.load(G + rows.to(tl.int64)[None, :] * E + experts[:, None],
                        mask=(rows < N)[None, :] & (experts < E)[:, None], other=0.0).to(tl.float32)
            x = tl.load(X + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(g, x, acc, input_precision=PRECISION)
        tl.store(PART + (span.to(tl.int64) * E + experts[:, None]) * D + cols[None, :], acc,
                 mask=(experts < E)[:, None] & (cols < D)[None, :])

    @triton.jit
    def _token_grad_kernel(DR, SLOT, KEPT, DL, W, DX, N, D, E, K: tl.constexpr, HAS_KEPT: tl.constexpr,
                           EP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        tokens = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        experts = tl.arange(0, EP)
        inside = tokens < N
        col_ok = (cols < D)[None, :]
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        for j in tl.static_range(K):
            pair = tokens.to(tl.int64) * K + j
            row = tl.load(SLOT + pair, mask=inside, other=0)
            ok = inside
            if HAS_KEPT:
                ok = ok & (tl.load(KEPT + pair, mask=inside, other=0) != 0)
            acc += tl.load(DR + row[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok, other=0.0).to(tl.float32)
        g = tl.load(DL + tokens.to(tl.int64)[:, None] * E + experts[None, :],
                    mask=inside[:, None] & (experts < E)[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + experts[:, None] * D + cols[None, :], mask=(experts < E)[:, None] & col_ok,
                    other=0.0).to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        tl.store(DX + tokens.to(tl.int64)[:, None] * D + cols[None, :], acc.to(DX.dtype.element_ty),
                 mask=inside[:, None] & col_ok)


    # --- The fused routing of a dropless layer: selection, the counting sort and the dispatch, its backward ---

    @triton.jit
    def _route_kernel(X, W, BIAS, LOGITS, EXPERTS, GATES, HIST, PSUM, SSUM, N, D, E, K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      PRECISION: tl.constexpr):
        """BM tokens: their logits, softmax, top-k and gates, and the block's partial sums:
        pairs per expert (HIST), probabilities per expert (PSUM), logsumexp² and entropy (SSUM)."""
        b = tl.program_id(0)
        rows = b * BM + tl.arange(0, BM)
        inside = rows < N
        experts = tl.arange(0, EP)
        valid = (experts < E)[None, :]
        acc = _logits_block(X, W, rows, N, D, E, EP, BM, BK, PRECISION)
        tl.store(LOGITS + rows.to(tl.int64)[:, None] * E + experts[None, :], acc, mask=inside[:, None] & valid)
        logits = tl.where(valid, acc, float("-inf"))
        top = tl.max(logits, 1)
        ex = tl.exp(logits - top[:, None])
        total = tl.sum(ex, 1)
        probs = ex / total[:, None]
        lse = top + tl.log(total)
        score = probs
        if HAS_BIAS:
            score = probs + tl.load(BIAS + experts, mask=experts < E, other=0.0).to(tl.float32)[None, :]
        score = tl.where(valid, score, float("-inf"))
        # k rounds of argmax (the lowest index wins a tie, as torch.argmax); first for the sum of the chosen
        # probabilities, then again to store the renormalised gates (top_k = 1: the raw probability).
        chosen_sum = tl.zeros((BM,), dtype=tl.float32)
        s = score
        for j in tl.static_range(K):
            best = tl.argmax(s, 1, tie_break_left=True)
            pick = experts[None, :] == best[:, None]
            chosen_sum += tl.sum(tl.where(pick, probs, 0.0), 1)
            s = tl.where(pick, float("-inf"), s)
        if K == 1:
            chosen_sum = tl.full((BM,), 1.0, tl.float32)
        count = tl.zeros((EP,), dtype=tl.int32)
        s = score
        for j in tl.static_range(K):
            best = tl.argmax(s, 1, tie_break_left=True)
            pick = experts[None, :] == best[:, None]
            at = rows.to(tl.int64) * K + j
            tl.store(EXPERTS + at, best.to(tl.int64), mask=inside)
            tl.store(GATES + at, tl.sum(tl.where(pick, probs, 0.0), 1) / chosen_sum, mask=inside)
            count += tl.sum((pick & inside[:, None]).to(tl.int32), 0)
            s = tl.where(pick, float("-inf"), s)
        tl.store(HIST + b * EP + experts, count)
        tl.store(PSUM + b * EP + experts, tl.sum(tl.where(inside[:, None], probs, 0.0), 0))
        # Entropy: -Σ p log p = lse - Σ p · logit (the padded lanes hold p = 0 and logit = -inf: left out).
        entropy = lse - tl.sum(tl.where(valid, probs * acc, 0.0), 1)
        tl.store(SSUM + b * 2, tl.sum(tl.where(inside, lse * lse, 0.0), 0))
        tl.store(SSUM + b * 2 + 1, tl.sum(tl.where(inside, entropy, 0.0), 0))

    @triton.jit
    def _route_scan_kernel(HIST, PSUM, SSUM, BASE, COUNTS, ENDS, PMEAN, STATS, N, B, E, EP: tl.constexpr,
                           CH: tl.constexpr):
        """One program: the blocks' histograms to each block's first sorted row per expert (BASE: the rows of the
        experts before, then of the blocks before), the counts and their running sums, and the means of the
        probabilities (PMEAN), of logsumexp² and of the entropy (STATS), summed block by block in order."""
        experts = tl.arange(0, EP)
        total = tl.zeros((EP,), dtype=tl.int32)
        psum = tl.zeros((EP,), dtype=tl.float32)
        ssum = tl.zeros((2,), dtype=tl.float32)
        for c in range(0, B, CH):
            blocks = c + tl.arange(0, CH)
            ok = (blocks < B)[:, None]
            total += tl.sum(tl.load(HIST + blocks[:, None] * EP + experts[None, :], mask=ok, other=0), 0)
            psum += tl.sum(tl.load(PSUM + blocks[:, None] * EP + experts[None, :], mask=ok, other=0.0), 0)
            ssum += tl.sum(tl.load(SSUM + blocks[:, None] * 2 + tl.arange(0, 2)[None, :], mask=ok, other=0.0), 0)
        running = tl.cumsum(total, 0) - total
        for c in range(0, B, CH):
            blocks = c + tl.arange(0, CH)
            ok = (blocks < B)[:, None]
            h = tl.load(HIST + blocks[:, None] * EP + experts[None, :], mask=ok, other=0)
            tl.store(BASE + blocks[:, None] * EP + experts[None, :], tl.cumsum(h, 0) - h + running[None, :], mask=ok)
            running += tl.sum(h, 0)
        tl.store(COUNTS + experts, total.to(tl.int64), mask=experts < E)
        tl.store(ENDS + experts, tl.cumsum(total, 0), mask=experts < E)
        tl.store(PMEAN + experts, psum / N, mask=experts < E)
        tl.store(STATS + tl.arange(0, 2), ssum / N)

    @triton.jit
    def _route_dispatch_kernel(X, EXPERTS, BASE, ROWS_OUT, SLOT, PAIR, TOKEN, SORTED_EXPERT, N, D,
                               K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr,
                               BD: tl.constexpr):
        """BM tokens' k pairs to their sorted rows — the block's first row per expert plus the pair's rank among the
        block's pairs of that expert, in token order — and the tokens' rows, cast, stored to those rows (BD columns
        per program). The programs of the first column block also write the index arrays. (Pairs are laid out
        (token, KP ≥ k lanes) and flattened in that order: the same order as the pairs themselves.)"""
        b = tl.program_id(0)
        tokens = b * BM + tl.arange(0, BM)
        lanes = tl.arange(0, KP)
        pairs = tl.reshape(tokens[:, None] * K + lanes[None, :], (BM * KP,))
        ok = tl.reshape((tokens < N)[:, None] & (lanes < K)[None, :], (BM * KP,))
        expert = tl.load(EXPERTS + pairs, mask=ok, other=0)
        experts = tl.arange(0, EP)
        onehot = (expert[:, None] == experts[None, :]) & ok[:, None]
        rank = tl.cumsum(onehot.to(tl.int32), 0) - 1
        base = tl.load(BASE + b * EP + experts)
        slot = tl.sum(tl.where(onehot, rank + base[None, :], 0), 1)
        if tl.program_id(1) == 0:
            tl.store(SLOT + pairs, slot.to(tl.int64), mask=ok)
            tl.store(PAIR + slot, pairs.to(tl.int64), mask=ok)
            tl.store(TOKEN + slot, (pairs // K).to(tl.int64), mask=ok)
            tl.store(SORTED_EXPERT + slot, expert.to(tl.int64), mask=ok)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        col_ok = (cols < D)[None, :]
        x = tl.load(X + tokens.to(tl.int64)[:, None] * D + cols[None, :], mask=(tokens < N)[:, None] & col_ok,
                    other=0.0).to(ROWS_OUT.dtype.element_ty)
        slots = tl.reshape(slot, (BM, KP))
        for j in tl.static_range(K):
            row = tl.sum(tl.where(lanes[None, :] == j, slots, 0), 1)
            tl.store(ROWS_OUT + row.to(tl.int64)[:, None] * D + cols[None, :], x,
                     mask=(tokens < N)[:, None] & col_ok)

    @triton.jit
    def _route_token_grad_kernel(DR, SLOT, LOGITS, EXPERTS, DG, DPM, DZ, W, DX, DL, N, D, E, K: tl.constexpr,
                                 HAS_DG: tl.constexpr, HAS_DPM: tl.constexpr, HAS_DZ: tl.constexpr,
                                 EP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """``_token_grad_kernel`` for the fused routing, which first finds the logits' gradient itself: from the
        gates' (DG), the mean probabilities' (DPM) and the z-loss's (DZ), through the gates' renormalisation and
        the softmax, and writes it (DL) for the router's weight gradient; then x's gradient, BD columns at a time."""
        tokens = tl.program_id(0) * BM + tl.arange(0, BM)
        inside = tokens < N
        experts = tl.arange(0, EP)
        valid = (experts < E)[None, :]
        lmask = inside[:, None] & valid
        logits = tl.load(LOGITS + tokens.to(tl.int64)[:, None] * E + experts[None, :], mask=lmask,
                         other=float("-inf"))
        top = tl.where(inside, tl.max(logits, 1), 0.0)
        ex = tl.where(lmask, tl.exp(logits - top[:, None]), 0.0)
        total = tl.where(inside, tl.sum(ex, 1), 1.0)  # (rows past N: all zero, no 0 / 0)
        probs = ex / total[:, None]
        dprobs = tl.zeros((BM, EP), dtype=tl.float32)
        if HAS_DPM:
            dprobs += tl.load(DPM + experts, mask=experts < E, other=0.0)[None, :] / N
        if HAS_DG:
            # gates g_j = p_j / S (S = Σ_j p_j over the chosen): dL/dp_j = (dg_j - Σ_i dg_i g_i) / S; top_k = 1: dg.
            chosen_sum = tl.zeros((BM,), dtype=tl.float32)
            weighted = tl.zeros((BM,), dtype=tl.float32)
            for j in tl.static_range(K):
                e_j = tl.load(EXPERTS + tokens.to(tl.int64) * K + j, mask=inside, other=0)
                p_j = tl.sum(tl.where(experts[None, :] == e_j[:, None], probs, 0.0), 1)
                dg_j = tl.load(DG + tokens.to(tl.int64) * K + j, mask=inside, other=0.0)
                chosen_sum += p_j
                weighted += dg_j * p_j
            chosen_sum = tl.where(inside, chosen_sum, 1.0)
            if K == 1:
                chosen_sum = tl.full((BM,), 1.0, tl.float32)
                weighted = tl.zeros((BM,), dtype=tl.float32)
            for j in tl.static_range(K):
                e_j = tl.load(EXPERTS + tokens.to(tl.int64) * K + j, mask=inside, other=0)
                dg_j = tl.load(DG + tokens.to(tl.int64) * K + j, mask=inside, other=0.0)
                d_j = (dg_j - weighted / chosen_sum) / chosen_sum
                dprobs += tl.where(experts[None, :] == e_j[:, None], d_j[:, None], 0.0)
        dl = probs * (dprobs - tl.sum(probs * dprobs, 1)[:, None])
        if HAS_DZ:
            lse = top + tl.log(total)
            dl += (2.0 * tl.load(DZ) / N) * lse[:, None] * probs
        dl = tl.where(lmask, dl, 0.0)
        tl.store(DL + tokens.to(tl.int64)[:, None] * E + experts[None, :], dl, mask=lmask)
        for c in range(0, D, BD):
            cols = c + tl.arange(0, BD)
            col_ok = (cols < D)[None, :]
            acc = tl.zeros((BM, BD), dtype=tl.float32)
            for j in tl.static_range(K):
                row = tl.load(SLOT + tokens.to(tl.int64) * K + j, mask=inside, other=0)
                acc += tl.load(DR + row[:, None] * D + cols[None, :], mask=inside[:, None] & col_ok,
                               other=0.0).to(tl.float32)
            w = tl.load(W + experts[:, None] * D + cols[None, :], mask=(experts < E)[:, None] & col_ok,
                        other=0.0).to(tl.float32)
            acc = tl.dot(dl, w, acc, input_precision=PRECISION)
            tl.store(DX + tokens.to(tl.int64)[:, None] * D + cols[None, :], acc.to(DX.dtype.element_ty),
                     mask=inside[:, None] & col_ok)


def _padded_experts(E: int) -> int:
    return max(16, triton.next_power_of_2(E))  # tl.dot needs blocks of at least 16


def _precision(device: torch.device) -> str:
    """The dot products' precision: ``ROUTER["precision"]``, but plain fp32 on GPUs without TF32 (before Ampere)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "ieee"
    return ROUTER["precision"]


@torch.library.custom_op("sadiffuseq::moe_router_logits", mutates_args=())
def _router_logits_op(x: Tensor, weight: Tensor) -> Tensor:
    """``x · weightᵀ`` in fp32: (N, E) from x (N, d) and weight (E, d), any float dtypes."""
    x, weight = x.contiguous(), weight.contiguous()
    (N, D), E = x.shape, weight.shape[0]
    out = torch.empty(N, E, dtype=torch.float32, device=x.device)
    BM, BK = ROUTER["BM"], ROUTER["BK"]
    _logits_kernel[(triton.cdiv(N, BM),)](x, weight, out, N, D, E, EP=_padded_experts(E), BM=BM, BK=BK,
                                          PRECISION=_precision(x.device), num_warps=ROUTER["warps"])
    return out


@_router_logits_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def weight_grad_settings(tokens: int) -> dict:
    """The router's weight-gradient launch settings for ``tokens`` rows: ``ROUTER`` with ``ROUTER_SMALL`` over it up
    to :data:`SMALL_TOKENS` tokens."""
    return {**ROUTER, **ROUTER_SMALL} if tokens <= SMALL_TOKENS else ROUTER


@torch.library.custom_op("sadiffuseq::moe_router_weight_grad", mutates_args=())
def _router_weight_grad_op(grad: Tensor, x: Tensor) -> Tensor:
    """``gradᵀ · x`` in fp32: (E, d) from grad (N, E) and x (N, d); spans of ``ROUTER["ROWS"]`` rows reduced by one
    program each, the spans then added in order."""
    grad, x = grad.contiguous(), x.contiguous()
    (N, D), E = x.shape, grad.shape[1]
    launch = weight_grad_settings(N)
    ROWS, BR, BD = launch["ROWS"], launch["BR"], launch["BD"]
    spans = triton.cdiv(N, ROWS)
    part = torch.empty(spans, E, D, dtype=torch.float32, device=x.device)
    _weight_grad_kernel[(spans, triton.cdiv(D, BD))](x, grad, part, N, D, E, EP=_padded_experts(E), ROWS=ROWS,
                                                     BR=BR, BD=BD, PRECISION=_precision(x.device),
                                                     num_warps=launch["grad_warps"])
    return part.sum(0)


@_router_weight_grad_op.register_fake
def _(grad, x):
    return x.new_empty(grad.shape[1], x.shape[1], dtype=torch.float32)


@torch.library.custom_op("sadiffuseq::moe_token_grad", mutates_args=())
def _token_grad_op(grad_rows: Tensor, slot: Tensor, kept: Tensor | None, grad_logits: Tensor, weight: Tensor, k: int,
                   dtype: torch.dtype) -> Tensor:
    grad_rows, slot, grad_logits, weight = (t.contiguous() for t in (grad_rows, slot, grad_logits, weight))
    (N, E), D = grad_logits.shape, grad_rows.shape[1]
    dx = torch.empty(N, D, dtype=dtype, device=grad_rows.device)
    BM, BD = ROUTER["token_BM"], ROUTER["token_BD"]
    _token_grad_kernel[(triton.cdiv(N, BM), triton.cdiv(D, BD))](
        grad_rows, slot, slot if kept is None else kept.contiguous(), grad_logits, weight, dx, N, D, E, K=k,
        HAS_KEPT=kept is not None, EP=_padded_experts(E), BM=BM, BD=BD, PRECISION=_precision(dx.device),
        num_warps=ROUTER["token_warps"])
    return dx


@_token_grad_op.register_fake
def _(grad_rows, slot, kept, grad_logits, weight, k, dtype):
    return grad_rows.new_empty(grad_logits.shape[0], grad_rows.shape[1], dtype=dtype)


@torch.library.custom_op("sadiffuseq::moe_route_dispatch", mutates_args=())
def _route_dispatch_op(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, dtype: torch.dtype) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, weight = x.contiguous(), weight.contiguous()
    (N, D), E = x.shape, weight.shape[0]
    BM, EP = ROUTE["BM"], _padded_experts(E)
    B = triton.cdiv(N, BM)
    dev = x.device
    logits = torch.empty(N, E, dtype=torch.float32, device=dev)
    experts = torch.empty(N, k, dtype=torch.long, device=dev)
    gates = torch.empty(N, k, dtype=torch.float32, device=dev)
    hist = torch.empty(B, EP, dtype=torch.int32, device=dev)
    psum = torch.empty(B, EP, dtype=torch.float32, device=dev)
    ssum = torch.empty(B, 2, dtype=torch.float32, device=dev)
    _route_kernel[(B,)](x, weight, logits if bias is None else bias.contiguous(), logits, experts, gates, hist, psum,
                        ssum, N, D, E, K=k, HAS_BIAS=bias is not None, EP=EP, BM=BM, BK=ROUTE["BK"],
                        PRECISION=_precision(dev), num_warps=ROUTE["warps"])
    base = torch.empty(B, EP, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.long, device=dev)
    ends = torch.empty(E, dtype=torch.int32, device=dev)
    pmean = torch.empty(E, dtype=torch.float32, device=dev)
    stats = torch.empty(2, dtype=torch.float32, device=dev)
    _route_scan_kernel[(1,)](hist, psum, ssum, base, counts, ends, pmean, stats, N, B, E, EP=EP, CH=ROUTE["CH"],
                             num_warps=ROUTE["scan_warps"])
    M = N * k
    rows = torch.empty(M, D, dtype=dtype, device=dev)
    slot, pair, token, expert = (torch.empty(M, dtype=torch.long, device=dev) for _ in range(4))
    _route_dispatch_kernel[(B, triton.cdiv(D, ROUTE["BD"]))](x, experts, base, rows, slot, pair, token, expert, N,
                                                             D, K=k, KP=triton.next_power_of_2(k), EP=EP, BM=BM,
                                                             BD=ROUTE["BD"], num_warps=ROUTE["dispatch_warps"])
    return rows, logits, experts, gates, slot, pair, token, expert, counts, ends, pmean, stats


@_route_dispatch_op.register_fake
def _(x, weight, bias, k, dtype):
    (N, D), E, M = x.shape, weight.shape[0], x.shape[0] * k
    f32, i64 = torch.float32, torch.long
    return (x.new_empty(M, D, dtype=dtype), x.new_empty(N, E, dtype=f32), x.new_empty(N, k, dtype=i64),
            x.new_empty(N, k, dtype=f32), *(x.new_empty(M, dtype=i64) for _ in range(4)), x.new_empty(E, dtype=i64),
            x.new_empty(E, dtype=torch.int32), x.new_empty(E, dtype=f32), x.new_empty(2, dtype=f32))


@torch.library.custom_op("sadiffuseq::moe_route_token_grad", mutates_args=())
def _route_token_grad_op(grad_rows: Tensor, slot: Tensor, logits: Tensor, experts: Tensor, grad_gates: Tensor | None,
                         grad_pmean: Tensor | None, grad_z: Tensor | None, weight: Tensor, k: int,
                         dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    grad_rows, slot, logits, experts, weight = (t.contiguous() for t in (grad_rows, slot, logits, experts, weight))
    (N, E), D = logits.shape, grad_rows.shape[1]
    dx = torch.empty(N, D, dtype=dtype, device=grad_rows.device)
    dlogits = torch.empty(N, E, dtype=torch.float32, device=grad_rows.device)
    BM, BD = ROUTE["grad_BM"], ROUTE["grad_BD"]
    _route_token_grad_kernel[(triton.cdiv(N, BM),)](
        grad_rows, slot, logits, experts, logits if grad_gates is None else grad_gates.contiguous(),
        logits if grad_pmean is None else grad_pmean.contiguous(), logits if grad_z is None else grad_z.contiguous(),
        weight, dx, dlogits, N, D, E, K=k, HAS_DG=grad_gates is not None, HAS_DPM=grad_pmean is not None,
        HAS_DZ=grad_z is not None, EP=_padded_experts(E), BM=BM, BD=BD, PRECISION=_precision(dx.device),
        num_warps=ROUTE["grad_warps"])
    return dx, dlogits


@_route_token_grad_op.register_fake
def _(grad_rows, slot, logits, experts, grad_gates, grad_pmean, grad_z, weight, k, dtype):
    N, E = logits.shape
    return grad_rows.new_empty(N, grad_rows.shape[1], dtype=dtype), logits.new_empty(N, E)


def token_grad(grad_rows: Tensor, slot: Tensor, kept: Tensor | None, grad_logits: Tensor, weight: Tensor, k: int,
               dtype: torch.dtype) -> Tensor:
    """``dx[t] = Σ_j grad_rows[slot[t·k + j]] (kept pairs only) + grad_logits[t] · weight`` in ``dtype``: (N, d)."""
    if use_triton(grad_rows):
        return torch.ops.sadiffuseq.moe_token_grad(grad_rows, slot, kept, grad_logits, weight, k, dtype)
    n, d = grad_logits.shape[0], grad_rows.shape[1]
    pairs = grad_rows.index_select(0, slot).view(n, k, d).float()
    if kept is not None:
        pairs = pairs * kept.view(n, k, 1)
    return (pairs.sum(1) + grad_logits.float() @ weight.float()).to(dtype)


def router_logits_value(x: Tensor, weight: Tensor) -> Tensor:
    """``x · weightᵀ`` in fp32 (N, E), no gradient (the layer's autograd node returns it with one)."""
    x, weight = x.detach(), weight.detach()
    if use_triton(x):
        return torch.ops.sadiffuseq.moe_router_logits(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def router_weight_grad_of(grad_logits: Tensor, x: Tensor) -> Tensor:
    """``grad_logitsᵀ · x`` in fp32 (E, d)."""
    if use_triton(x):
        return torch.ops.sadiffuseq.moe_router_weight_grad(grad_logits, x)
    return grad_logits.float().t() @ x.float()
