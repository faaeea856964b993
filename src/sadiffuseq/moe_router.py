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

The layer ties them together in one autograd node (``moe._GatherRouted``): the dispatch's rows and the router's
logits leave the same forward, so their two gradients meet in one backward. The dot products run as ``tf32x3``
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


def use_triton(x: Tensor) -> bool:
    """Whether the router's Triton kernels run for x: a CUDA tensor (a CPU one under Triton's interpreter)."""
    return triton is not None and x.is_cuda != interpreting()


if triton is not None:

    @triton.jit
    def _logits_kernel(X, W, OUT, N, D, E, EP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        experts = tl.arange(0, EP)
        acc = tl.zeros((BM, EP), dtype=tl.float32)
        for k in range(0, D, BK):
            cols = k + tl.arange(0, BK)
            x = tl.load(X + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            w = tl.load(W + experts[None, :] * D + cols[:, None],
                        mask=(experts < E)[None, :] & (cols < D)[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
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


@torch.library.custom_op("sadiffuseq::moe_router_weight_grad", mutates_args=())
def _router_weight_grad_op(grad: Tensor, x: Tensor) -> Tensor:
    """``gradᵀ · x`` in fp32: (E, d) from grad (N, E) and x (N, d); spans of ``ROUTER["ROWS"]`` rows reduced by one
    program each, the spans then added in order."""
    grad, x = grad.contiguous(), x.contiguous()
    (N, D), E = x.shape, grad.shape[1]
    ROWS, BR, BD = ROUTER["ROWS"], ROUTER["BR"], ROUTER["BD"]
    spans = triton.cdiv(N, ROWS)
    part = torch.empty(spans, E, D, dtype=torch.float32, device=x.device)
    _weight_grad_kernel[(spans, triton.cdiv(D, BD))](x, grad, part, N, D, E, EP=_padded_experts(E), ROWS=ROWS,
                                                     BR=BR, BD=BD, PRECISION=_precision(x.device),
                                                     num_warps=ROUTER["grad_warps"])
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
