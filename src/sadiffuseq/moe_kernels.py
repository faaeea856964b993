"""The MoE layer's up-projection bias and GELU, with a fused backward (a Triton kernel on CUDA, PyTorch elsewhere).

The expert rows are sorted by expert (``counts[e]`` contiguous rows of expert e, ``ends = cumsum(counts)``). Each
expert's up projection is ``h = GELU(u + b[e])`` with ``u`` the output of the grouped matmul. Its backward needs

    du   = dh · GELU'(u + b[e])              (M × H, the input gradient of the up projection)
    db_e = Σ_{rows of e} du                   (E × H, the bias gradient: a segmented column sum)

Written in PyTorch the bias gradient is a second pass over du (a one-hot matmul, or ``index_add_``'s atomic adds
onto the same few addresses). :func:`bias_gelu_backward` computes both in one pass over dh and u: the rows are cut
into tiles of ``ROWS`` rows *per expert* (at most ``cdiv(M, ROWS) + E`` tiles, a static bound), so every tile lies
in one expert; each program writes its tile's du and the column sum of its tile, and a second small kernel adds up
each expert's tile sums in a fixed order (deterministic, no atomics). The forward, ``GELU(u + b[e])``, runs over the
same tiles (:func:`bias_gelu_forward`: each tile reads its expert's bias row once); where the experts' matmuls are
the Triton kernels of :mod:`sadiffuseq.moe_gemm`, their up projection does the forward in its epilogue instead.
The GELU's erf is Abramowitz & Stegun's formula 7.1.26 (:func:`_normal_cdf_and_pdf`).

Keeping the bias out of the matmul keeps its inner dimension at d_model: carried as an extra weight row (against a
ones column of the rows), it made the up projection's matmuls 776 wide instead of 768, which costs the grouped
kernels far more than 1% (docs/benchmarks.md).

Needs Triton (shipped with PyTorch's CUDA wheels); the tests also run the kernels through Triton's CPU interpreter
where Triton is installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sadiffuseq.attention.globals_triton import interpreting, triton

if triton is not None:
    import triton.language as tl

# Launch settings of the backward: a program takes a tile of ROWS rows (of one expert) and BN columns, BM rows at a
# time; the sums over the tiles of one expert take BN_SUM columns per program. Chosen on an H100 among 70 settings
# (32k tokens, 8 experts, width 1536, bf16): 247 µs where the first setting took 376 µs; PyTorch's own GELU backward
# (compiled, no bias gradient) takes 215 µs there.
BIAS_GELU = dict(ROWS=256, BM=16, BN=128, num_warps=8)
# Up to SMALL_ROWS routed rows (8k tokens of top-2: 16k rows), BIAS_GELU_SMALL, chosen the same way at 8k tokens:
# smaller programs, 75.6 µs there against 80.0 for BIAS_GELU (scripts/gpu_gelu_erf.py).
BIAS_GELU_SMALL = dict(ROWS=64, BM=16, BN=64, num_warps=4)
SMALL_ROWS = 32768
BN_SUM = 64
BT_SUM = 16  # tiles summed at a time (in a fixed order: deterministic)
# The forward (``GELU(u + b[e])`` alone, bias loaded once per tile): scripts/gpu_tune_moe_kernels.py --forward.
BIAS_GELU_FORWARD = dict(ROWS=128, BM=16, BN=128, num_warps=8)
# The combine's backward (:func:`combine_backward`): a program takes BM sorted rows of one expert, BD columns at a
# time.
COMBINE_BACKWARD = dict(BM=64, BD=128, num_warps=4)


def gelu_grad(z: Tensor) -> Tensor:
    """The derivative of the exact GELU ``z · Φ(z)``: ``Φ(z) + z · φ(z)`` (the standard normal's cdf and pdf)."""
    return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def bias_gelu_backward_torch(grad: Tensor, u: Tensor, bias: Tensor, expert: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of ``GELU(u + bias[expert])`` in PyTorch (fp32 inside): ``(du, dbias)``."""
    z = u.float() + bias.float().index_select(0, expert)
    du = grad.float() * gelu_grad(z)
    dbias = F.one_hot(expert, bias.shape[0]).to(du.dtype).t() @ du
    return du.to(u.dtype), dbias.to(bias.dtype)


def use_triton(u: Tensor) -> bool:
    """Whether :func:`bias_gelu_backward` runs the Triton kernels for u: a CUDA tensor (a CPU one under Triton's
    interpreter)."""
    return triton is not None and u.is_cuda != interpreting()


def bias_gelu_backward(grad: Tensor, u: Tensor, bias: Tensor, expert: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
    """``(du, dbias)`` of ``h = GELU(u + bias[expert])`` for rows sorted by expert; ``ends`` (E,) int32: the running
    row counts (``cumsum(counts)``). Triton where :func:`use_triton` says so, else :func:`bias_gelu_backward_torch`."""
    if use_triton(u):
        return torch.ops.sadiffuseq.moe_bias_gelu_backward(grad, u, bias, ends)
    return bias_gelu_backward_torch(grad, u, bias, expert)


def bias_gelu_forward(u: Tensor, bias: Tensor, expert: Tensor, ends: Tensor) -> Tensor:
    """``GELU(u + bias[expert])`` for rows sorted by expert: the Triton kernel where :func:`use_triton` says so (each
    tile of rows reads its expert's bias once; ``torch.compile``'s fused pass gathers it per element and ran 13 %
    slower at the layer's 32k shape), else PyTorch."""
    if use_triton(u):
        return torch.ops.sadiffuseq.moe_bias_gelu(u, bias, ends)
    return F.gelu(u + bias.index_select(0, expert))


def combine_backward(grad: Tensor, ys: Tensor, bias: Tensor | None, gates: Tensor, pair: Tensor, token: Tensor,
                     ends: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The backward of ``y[n] = Σ_j gates[n, j] · (ys[slot(n, j)] + bias[experts[n, j]])`` for a dropless layer, on
    the Triton kernel (:func:`use_triton`): the sorted rows' gradients (M, d), the gates' (N, k) and the bias's (E,
    d), the last as per-tile column sums added in a fixed order — one pass over ``grad`` and ``ys`` where PyTorch
    takes that pass plus an (E × N)(N × d) product of the gate matrix. ``bias=None``: the rows hold their biases
    already (no bias gradient here)."""
    grad_rows, grad_gates, grad_bias = torch.ops.sadiffuseq.moe_combine_backward(grad, ys, bias, gates, pair, token,
                                                                                 ends)
    return grad_rows, grad_gates, grad_bias if bias is not None else None


class BiasGELU(torch.autograd.Function):
    """``GELU(u + bias[expert])`` for rows sorted into contiguous expert segments (see the module docstring)."""

    @staticmethod
    def forward(ctx, u: Tensor, bias: Tensor, expert: Tensor, ends: Tensor) -> Tensor:
        ctx.save_for_backward(u, bias, expert, ends)
        return bias_gelu_forward(u, bias, expert, ends)

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, bias, expert, ends = ctx.saved_tensors
        du, dbias = bias_gelu_backward(grad, u, bias, expert, ends)
        return du, dbias, None, None


def bias_gelu(u: Tensor, bias: Tensor, expert: Tensor, ends: Tensor) -> Tensor:
    return BiasGELU.apply(u, bias, expert, ends)


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels (registered as a custom op, so that torch.compile keeps it as one opaque call)

if triton is not None:

    @triton.jit
    def _expert_tiles(ENDS, E, EP: tl.constexpr, ROWS: tl.constexpr):
        """Per expert (a vector of EP ≥ E lanes, zero past E; returned first): its first row, its end row, its number
        of tiles of ROWS rows, and one past its last tile in the order of the tiles."""
        idx = tl.arange(0, EP)
        ends = tl.load(ENDS + idx, mask=idx < E, other=0)
        starts = tl.load(ENDS + idx - 1, mask=(idx >= 1) & (idx < E), other=0)
        tiles = (ends - starts + ROWS - 1) // ROWS
        return idx, starts, ends, tiles, tl.cumsum(tiles, 0)

    @triton.jit
    def _locate_tile(t, idx, starts, ends, tiles, last, ROWS: tl.constexpr):
        """Tile t's expert, first row and the expert's end row, from :func:`_expert_tiles`. The expert is the number
        of experts whose tiles all come before t; past the last tile it is E or more, and the row range is empty."""
        e = tl.sum((last <= t).to(tl.int32), 0)
        this = idx == e
        first_tile = tl.sum(tl.where(this, last - tiles, 0), 0)
        row0 = tl.sum(tl.where(this, starts, 0), 0) + (t - first_tile) * ROWS
        return e, row0, tl.sum(tl.where(this, ends, 0), 0)

    @triton.jit
    def _normal_cdf_and_pdf(z):
        """Φ(z) and φ(z) of the standard normal, in fp32, with one exponential for both: erf by Abramowitz & Stegun's
        formula 7.1.26 (|error| ≤ 1.5e-7, about fp32's resolution near 1 and far below bf16's), on the fast
        reciprocal. With CUDA's erff and a separate exp the forward kernel took 8 % longer at 16k rows
        (scripts/gpu_gelu_erf.py, docs/benchmarks.md)."""
        e = tl.exp(-0.5 * z * z)
        t = tl.fdiv(1.0, 1.0 + 0.2316419 * tl.abs(z), ieee_rounding=False)  # p / √2 = 0.3275911 / √2
        q = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) * e
        return tl.where(z >= 0, 1.0 - 0.5 * q, 0.5 * q), e * 0.3989422804014327

    @triton.jit
    def _bias_gelu_backward_kernel(G, U, B, DU, PART, ENDS, F, E, EP: tl.constexpr, ROWS: tl.constexpr,
                                   BM: tl.constexpr, BN: tl.constexpr):
        t = tl.program_id(0)
        idx, starts, ends, tiles, last = _expert_tiles(ENDS, E, EP, ROWS)
        e, row0, end = _locate_tile(t, idx, starts, ends, tiles, last, ROWS)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        # (Past the last tile no row is valid: any expert's bias will do.)
        b = tl.load(B + tl.minimum(e, E - 1) * F + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)  # the column sums, reduced over the rows once at the end
        for r in range(0, ROWS, BM):
            rows = row0 + r + tl.arange(0, BM)
            mask = (rows < end)[:, None] & (cols < F)[None, :]
            at = rows.to(tl.int64)[:, None] * F + cols[None, :]
            g = tl.load(G + at, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(U + at, mask=mask, other=0.0).to(tl.float32) + b
            cdf, pdf = _normal_cdf_and_pdf(z)
            du = g * (cdf + z * pdf)
            tl.store(DU + at, du.to(DU.dtype.element_ty), mask=mask)
            acc += tl.where(mask, du, 0.0)
        tl.store(PART + t.to(tl.int64) * F + cols, tl.sum(acc, 0), mask=cols < F)

    @triton.jit
    def _bias_gelu_forward_kernel(U, B, H, ENDS, F, E, EP: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr,
                                  BN: tl.constexpr):
        t = tl.program_id(0)
        idx, starts, ends, tiles, last = _expert_tiles(ENDS, E, EP, ROWS)
        e, row0, end = _locate_tile(t, idx, starts, ends, tiles, last, ROWS)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        b = tl.load(B + tl.minimum(e, E - 1) * F + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
        for r in range(0, ROWS, BM):
            rows = row0 + r + tl.arange(0, BM)
            mask = (rows < end)[:, None] & (cols < F)[None, :]
            at = rows.to(tl.int64)[:, None] * F + cols[None, :]
            z = tl.load(U + at, mask=mask, other=0.0).to(tl.float32) + b
            h = z * _normal_cdf_and_pdf(z)[0]
            tl.store(H + at, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_tiles_kernel(PART, DB, ENDS, F, E, EP: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
                          BT: tl.constexpr):
        """Expert e's bias gradient: the column sums of its tiles (rows of PART), BT tiles at a time, in order."""
        e = tl.program_id(0)
        idx, starts, ends, tiles, last = _expert_tiles(ENDS, E, EP, ROWS)
        this = idx == e
        stop = tl.sum(tl.where(this, last, 0), 0)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for t0 in range(stop - tl.sum(tl.where(this, tiles, 0), 0), stop, BT):
            t = t0 + tl.arange(0, BT)
            acc += tl.sum(tl.load(PART + t.to(tl.int64)[:, None] * F + cols[None, :],
                                  mask=(t < stop)[:, None] & (cols < F)[None, :], other=0.0), 0)
        tl.store(DB + e * F + cols, acc.to(DB.dtype.element_ty), mask=cols < F)

    @triton.jit
    def _combine_backward_kernel(G, Y, B, GATES, PAIR, TOKEN, DY, DGATE, PART, ENDS, D, E, EP: tl.constexpr,
                                 BM: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The backward of the gate-weighted combine for a tile of BM sorted rows of one expert, all D columns: each
        row's gradient ``gate · grad_y[token]``, its gate's gradient ``(y + b[e]) · grad_y[token]`` (stored at the
        row's pair: distinct places) and the tile's column sums of the rows' gradients (the down bias's
        gradient, summed over the expert's tiles by ``_sum_tiles_kernel``). Without HAS_BIAS the rows already hold
        their expert's bias (added by the down projection's matmul, which also takes its gradient)."""
        t = tl.program_id(0)
        idx, starts, ends, tiles, last = _expert_tiles(ENDS, E, EP, BM)
        e, row0, end = _locate_tile(t, idx, starts, ends, tiles, last, BM)
        rows = row0 + tl.arange(0, BM)
        valid = rows < end
        token = tl.load(TOKEN + rows, mask=valid, other=0)
        pair = tl.load(PAIR + rows, mask=valid, other=0)
        gate = tl.load(GATES + pair, mask=valid, other=0.0).to(tl.float32)
        eb = tl.minimum(e, E - 1)
        dot = tl.zeros((BM,), dtype=tl.float32)
        for c in range(0, D, BD):
            cols = c + tl.arange(0, BD)
            mask = valid[:, None] & (cols < D)[None, :]
            g = tl.load(G + token[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = gate[:, None] * g
            tl.store(DY + rows.to(tl.int64)[:, None] * D + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                y += tl.load(B + eb * D + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
                tl.store(PART + t.to(tl.int64) * D + cols, tl.sum(dy, 0), mask=cols < D)
            dot += tl.sum(y * g, 1)
        tl.store(DGATE + pair, dot.to(DGATE.dtype.element_ty), mask=valid)

@torch.library.custom_op("sadiffuseq::moe_bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad: Tensor, u: Tensor, bias: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
    grad, u, bias, ends = grad.contiguous(), u.contiguous(), bias.contiguous(), ends.contiguous()
    M, width = u.shape
    E = bias.shape[0]
    launch = BIAS_GELU_SMALL if M <= SMALL_ROWS else BIAS_GELU
    ROWS, BM, BN, warps = (launch[key] for key in ("ROWS", "BM", "BN", "num_warps"))
    n_tiles = triton.cdiv(M, ROWS) + E  # every expert's last tile may be partial
    EP = max(2, triton.next_power_of_2(E))
    du = torch.empty_like(u)
    part = torch.empty((n_tiles, width), dtype=torch.float32, device=u.device)
    dbias = torch.empty_like(bias)
    _bias_gelu_backward_kernel[(n_tiles, triton.cdiv(width, BN))](grad, u, bias, du, part, ends, width, E,
                                                                EP=EP, ROWS=ROWS, BM=BM, BN=BN, num_warps=warps)
    _sum_tiles_kernel[(E, triton.cdiv(width, BN_SUM))](part, dbias, ends, width, E, EP=EP, ROWS=ROWS, BN=BN_SUM,
                                                       BT=BT_SUM, num_warps=4)
    return du, dbias


@_bias_gelu_backward_op.register_fake
def _(grad, u, bias, ends):
    return torch.empty_like(u), torch.empty_like(bias)


@torch.library.custom_op("sadiffuseq::moe_bias_gelu", mutates_args=())
def _bias_gelu_op(u: Tensor, bias: Tensor, ends: Tensor) -> Tensor:
    u, bias, ends = u.contiguous(), bias.contiguous(), ends.contiguous()
    M, width = u.shape
    E = bias.shape[0]
    ROWS, BM, BN, warps = (BIAS_GELU_FORWARD[key] for key in ("ROWS", "BM", "BN", "num_warps"))
    h = torch.empty_like(u)
    _bias_gelu_forward_kernel[(triton.cdiv(M, ROWS) + E, triton.cdiv(width, BN))](
        u, bias, h, ends, width, E, EP=max(2, triton.next_power_of_2(E)), ROWS=ROWS, BM=BM, BN=BN, num_warps=warps)
    return h


@_bias_gelu_op.register_fake
def _(u, bias, ends):
    return torch.empty_like(u)


@torch.library.custom_op("sadiffuseq::moe_combine_backward", mutates_args=())
def _combine_backward_op(grad: Tensor, ys: Tensor, bias: Tensor | None, gates: Tensor, pair: Tensor, token: Tensor,
                         ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad, ys, gates = grad.contiguous(), ys.contiguous(), gates.contiguous()
    M, D = ys.shape
    E = ends.shape[0]
    BM, BD, warps = (COMBINE_BACKWARD[key] for key in ("BM", "BD", "num_warps"))
    n_tiles = triton.cdiv(M, BM) + E  # every expert's last tile may be partial
    EP = max(2, triton.next_power_of_2(E))
    grad_rows = torch.empty_like(ys)
    grad_gates = torch.empty(gates.shape, dtype=gates.dtype, device=ys.device)
    has_bias = bias is not None
    part = torch.empty((n_tiles if has_bias else 0, D), dtype=torch.float32, device=ys.device)
    grad_bias = torch.empty_like(bias) if has_bias else ys.new_empty(0, D)
    _combine_backward_kernel[(n_tiles,)](grad, ys, bias.contiguous() if has_bias else ys, gates, pair, token,
                                         grad_rows, grad_gates, part, ends, D, E, EP=EP, BM=BM, BD=BD,
                                         HAS_BIAS=has_bias, num_warps=warps)
    if has_bias:
        _sum_tiles_kernel[(E, triton.cdiv(D, BN_SUM))](part, grad_bias, ends, D, E, EP=EP, ROWS=BM, BN=BN_SUM,
                                                       BT=BT_SUM, num_warps=4)
    return grad_rows, grad_gates, grad_bias


@_combine_backward_op.register_fake
def _(grad, ys, bias, gates, pair, token, ends):
    return torch.empty_like(ys), torch.empty_like(gates), torch.empty_like(bias) if bias is not None else \
        ys.new_empty(0, ys.shape[1])
