"""The MoE layer's expert matmuls as Triton grouped matmuls, and the experts' feed-forward built on them.

The rows are sorted by expert (``counts[e]`` contiguous rows of expert e, ``ends = cumsum(counts)``); expert e
computes ``y = GELU(x W_up[e] + b_up[e]) W_down[e] (+ b_down[e])``. :class:`TritonExperts` is that expression,
forward and backward, on kernels of two kinds:

* **Row-grouped** (:func:`_rows_kernel`): ``C[rows of e] = A[rows of e] · B[e]`` (or ``· B[e]ᵀ``). The rows are cut
  into tiles of BM rows *per expert*, every tile multiplied by its own expert's weights; rows past an expert's end
  inside its last tile are computed but not stored. Either one program per (row tile, column tile) over the static
  bound ``cdiv(M, BM) + E`` of the row tiles, or one persistent program per multiprocessor looping over the tiles
  that hold rows (counted on the device), optionally warp-specialised (Triton splits the tile loads, the
  tensor-core work and the stores between warps, so that one tile's stores overlap the next tile's loads).
  Nothing waits for the host either way: the launch can be captured in a CUDA graph.
* **Weight-gradient** (:func:`_weights_kernel`): ``dW[e] = A[rows of e]ᵀ · G[rows of e]``, a reduction over each
  expert's rows, written straight in the parameters' dtype (fp32 in mixed precision): no bf16 result to cast. Both
  projections' weight gradients run as one launch: twice the tiles fill the multiprocessors more evenly.

Around the matmuls, in their epilogues (:func:`_epilogue`, on slices of each tile's columns to keep the registers
in hand): the up projection's bias and GELU (the forward stores both the pre-activation u, kept for the backward,
and h), the GELU's derivative in the backward (``du = dh · GELU'(u + b)``, u read back per tile), and the down
projection's bias. The biases' gradients are column sums of du and of the output's gradient over each expert's
rows: programs of the weight-gradient launch take them (:func:`_column_sums_tile`), which costs less than summing
per tile in the epilogue (docs/benchmarks.md). With ``FUSED_GELU`` off the bias + GELU run as kernels of their own
(:func:`sadiffuseq.moe_kernels.bias_gelu_forward`, :func:`~sadiffuseq.moe_kernels.bias_gelu_backward`). The fp32
parameters are cast to bf16 in one launch (:func:`cast_params`).

What this gains over ``torch._grouped_mm`` (PyTorch 2.11 runs one CUTLASS configuration on sm90 whatever the
shapes, plus a setup kernel per call): launch settings chosen per matmul on an H100, persistent warp-specialised
programs, and weight gradients without the casts.

The operands are read through tensor descriptors (TMA on Hopper GPUs): rows and columns past a tensor's edge read
as zero, so any widths work whose row strides are multiples of 16 bytes. Needs Triton on a GPU of compute
capability 9.0 or newer (:func:`supported`); the tests run the kernels through Triton's CPU interpreter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sadiffuseq.attention.globals_triton import interpreting, triton
from sadiffuseq.moe_kernels import BN_SUM, BT_SUM, SMALL_ROWS, bias_gelu_backward, bias_gelu_forward

if triton is not None:
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from sadiffuseq.moe_kernels import _expert_tiles, _locate_tile, _normal_cdf_and_pdf, _sum_tiles_kernel

# Launch settings per matmul: (BM, BN, BK) the tile, warps, software-pipeline stages, GROUP_M (how many row tiles
# are launched together over all column tiles: they share their rows in L2), the grid (0 a program per tile, 1
# persistent, 2 persistent and warp-specialised) and whether whole tiles are stored through a tensor descriptor
# (TMA; 1-2 % faster than masked stores, and needs the tile's bf16 copy in shared memory, so at most 3 stages of
# 128 x 256). Chosen on an H100 at the layer's shapes (8 experts, top-2, d 768, width 1536, 8k and 32k tokens;
# scripts/gpu_tune_moe_gemm.py).
LAUNCH = {
    "up": (128, 256, 64, 8, 3, 8, 2, 1),  # x · W_up
    "down": (128, 256, 64, 8, 3, 4, 2, 1),  # h · W_down
    "down_input_grad": (128, 256, 64, 8, 3, 4, 2, 1),  # dy · W_downᵀ
    "up_input_grad": (128, 256, 64, 8, 3, 8, 1, 1),  # du · W_upᵀ
    "weight_grad": (128, 256, 64, 8, 4, 8),  # xᵀ · du and hᵀ · dy, one launch
    # With the up projection's bias and GELU in the epilogue (FUSED_GELU), a ninth field: the epilogue works on
    # that many slices of the tile's columns, one after the other (fewer registers live at once).
    "up_gelu": (128, 256, 64, 8, 3, 8, 1, 1, 2),  # x · W_up, then h = GELU(u + b)
    "down_input_grad_gelu": (128, 256, 64, 8, 3, 4, 1, 1, 2),  # dy · W_downᵀ, then du = dh · GELU'(u + b)
}
# Up to SMALL_ROWS routed rows (moe_kernels' limit for its own small-problem settings; 8k tokens of top-2: 16k
# rows) these settings replace LAUNCH's, chosen the same way at 8k tokens alone (scripts/gpu_tune_moe_gemm.py
# 8192): the rows' gradient 64.0 µs there against 69.7 with LAUNCH's setting, which is the better one at 32k.
LAUNCH_SMALL = {
    "up_input_grad": (128, 256, 64, 8, 4, 8, 2, 0),
}
# Whether the up projection's bias and GELU run in the matmuls' epilogues (forward, backward) instead of kernels
# of their own.
FUSED_GELU = (True, True)
# Where the up projection's bias gradient is summed when the backward's GELU is in the matmul's epilogue: 0 by
# programs of the weight-gradient launch (WEIGHT_GRAD_BIAS); in the epilogue, per tile, 1 as a reduction across the
# warps or 2 on the tensor cores (ones · du). At 8k tokens the epilogue's sums cost 25 (1) or 15 µs (2), the weight
# launch's programs about 6 (scripts/gpu_moe_bias_grad.py).
BIAS_SUMS = 0
# The bias gradient's programs in the weight-gradient launch (when the backward's epilogue does not sum): where in
# the grid (1 first, 2 last), and the rows and columns each takes at a time.
WEIGHT_GRAD_BIAS = (1, 64, 256)


def supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether :class:`TritonExperts` runs on this device and dtype: Triton, a CUDA GPU of compute capability ≥ 9.0
    (tensor descriptors) and fp16/bf16 — or the CPU and fp32 under Triton's interpreter (whose tensor-descriptor
    loads of bf16 data give garbage, Triton 3.9) — with row strides (``widths`` elements) of whole multiples of 16
    bytes."""
    device = torch.device(device)
    if triton is None:
        return False
    if interpreting():
        ok = device.type == "cpu" and dtype == torch.float32
    else:
        ok = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
              and torch.cuda.get_device_capability(device) >= (9, 0))
    return ok and rows_aligned(dtype, *widths)


def rows_aligned(dtype: torch.dtype, *widths: int) -> bool:
    """Whether rows ``widths`` elements wide are whole multiples of 16 bytes (what tensor descriptors and
    ``torch._grouped_mm`` ask of row strides)."""
    size = torch.empty((), dtype=dtype).element_size()
    return all((w * size) % 16 == 0 for w in widths)


_WORKS: dict[tuple[str, torch.dtype], bool] = {}


@torch.compiler.disable
def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`TritonExperts` compiles and gives a per-expert loop's numbers, output and gradients, on this
    device type and dtype with the launch settings of :data:`LAUNCH` (probed once on a small problem with an empty
    expert, then cached): a Triton release that cannot build one of the kernels (warp specialisation, say) makes
    ``model.moe_impl: auto`` fall back instead of failing."""
    key = (torch.device(device).type, dtype)
    if key not in _WORKS:
        _WORKS[key] = _probe(torch.device(device), dtype)
    return _WORKS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    counts, d, H = (70, 0, 200), 64, 128
    rows = torch.randn(sum(counts), d, generator=g).to(device, dtype)
    params = [torch.randn(*shape, generator=g) * 0.1 for shape in ((3, d, H), (3, H), (3, H, d))]
    expert = torch.repeat_interleave(torch.arange(3), torch.tensor(counts)).to(device)
    ends = torch.tensor(counts).cumsum(0).to(device, torch.int32)
    results = []
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for triton_path in (True, False):
                x = rows.clone().requires_grad_()
                w_up, b_up, w_down = (p.to(device).requires_grad_() for p in params)
                if triton_path:
                    y = experts_ffn(x, w_up, b_up, w_down, expert, ends)
                else:
                    parts = x.float().split(list(counts))
                    y = torch.cat([F.gelu(parts[e] @ w_up[e] + b_up[e]) @ w_down[e] for e in range(3)])
                y.float().square().sum().backward()
                results.append([t.float().cpu() for t in (y, x.grad, w_up.grad, b_up.grad, w_down.grad)])
    except Exception:  # noqa: BLE001 (a kernel that does not build or launch here: use another implementation)
        return False
    tol = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    return all((u - v).abs().max() <= tol * v.abs().max() for u, v in zip(*results))


# ---------------------------------------------------------------------------------------------------------
# Kernels

if triton is not None:

    @triton.jit
    def _swizzle(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """Program id to (row tile, column tile), GROUP_M row tiles at a time over every column tile."""
        width = GROUP_M * tiles_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _store_rows(C, C_desc, val, row0, n0, end, N, whole, BM: tl.constexpr, BN: tl.constexpr):
        """val (BM, BN) to C's rows row0 .. and columns n0 ..: whole tiles through the descriptor, else the rows
        before ``end`` and the columns before N."""
        if whole:
            C_desc.store([row0, n0], val.to(C.dtype.element_ty))
        else:
            rows = row0 + tl.arange(0, BM)
            cols = n0 + tl.arange(0, BN)
            mask = (rows < end)[:, None] & (cols < N)[None, :]
            tl.store(C + rows.to(tl.int64)[:, None] * N + cols[None, :], val.to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _epilogue(val, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0, whole,
                  BM: tl.constexpr, BN: tl.constexpr, EPILOGUE: tl.constexpr, SUMS: tl.constexpr):
        """A bias, and the up projection's GELU, on a slice of a result tile (BN columns from n0).

        EPILOGUE 3 (the down projection): val + b[e] to C. EPILOGUE 1 (the forward, val = x · W_up): val to C (the
        pre-activation u, bias excluded, kept for the backward) and GELU(u + b) to X. EPILOGUE 2 (the backward,
        val = dh = dy · W_downᵀ): u read from X, du = dh · GELU'(u + b) to C, and with SUMS 1 or 2 du's column sums
        over the rows this tile owns (from ``first``; a tile moved back shares its first rows with the tile before)
        to PART, the bias gradient's per-tile share (:data:`BIAS_SUMS`)."""
        cols = n0 + tl.arange(0, BN)
        b = tl.load(BIAS + eb * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 3:
            _store_rows(C, C_desc, val + b, row0, n0, end, N, whole, BM, BN)
        elif EPILOGUE == 1:
            _store_rows(C, C_desc, val, row0, n0, end, N, whole, BM, BN)
            z = val + b
            _store_rows(X, X_desc, z * _normal_cdf_and_pdf(z)[0], row0, n0, end, N, whole, BM, BN)
        else:
            rows = row0 + tl.arange(0, BM)
            if whole:
                u = X_desc.load([row0, n0])
            else:
                u = tl.load(X + rows.to(tl.int64)[:, None] * N + cols[None, :],
                            mask=(rows < end)[:, None] & (cols < N)[None, :], other=0.0)
            z = u.to(tl.float32) + b
            cdf, pdf = _normal_cdf_and_pdf(z)
            du = val * (cdf + z * pdf)
            _store_rows(C, C_desc, du, row0, n0, end, N, whole, BM, BN)
            own = (rows >= first) & (rows < end)
            if SUMS == 1:  # a reduction over the tile's rows, across the warps
                tl.store(PART + pid_m.to(tl.int64) * N + cols, tl.sum(tl.where(own[:, None], du, 0.0), 0),
                         mask=cols < N)
            elif SUMS == 2:  # on the tensor cores: a matrix of ones (ones in the owned rows' columns) times du
                ones = tl.where(own[None, :], 1.0, 0.0) + tl.zeros((64, BM), dtype=tl.float32)
                sums = tl.dot(ones.to(C.dtype.element_ty), du.to(C.dtype.element_ty))
                first_row = tl.arange(0, 64) == 0
                tl.store(PART + pid_m.to(tl.int64) * N + tl.zeros((64, BN), dtype=tl.int32) + cols[None, :], sums,
                         mask=first_row[:, None] & (cols < N)[None, :])

    @triton.jit
    def _halves(t, BM: tl.constexpr, BN: tl.constexpr):
        """A (BM, BN) tile's left and right halves of columns."""
        return tl.split(tl.permute(tl.reshape(t, (BM, 2, BN // 2)), (0, 2, 1)))

    @triton.jit
    def _rows_tile(A_desc, B_desc, C, C_desc, X, X_desc, BIAS, PART, N, K, E, pid_m, pid_n, idx, starts, ends,
                   tiles, last, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TRANS_B: tl.constexpr,
                   TMA_STORE: tl.constexpr, EPILOGUE: tl.constexpr, SUB: tl.constexpr, SUMS: tl.constexpr):
        # Past the last tile e = E: no row is valid and the loop below does not run.
        e, row0, end = _locate_tile(pid_m, idx, starts, ends, tiles, last, BM)
        first = row0
        k_stop = tl.where(e < E, K, 0)
        eb = tl.minimum(e, E - 1)
        whole = False
        if TMA_STORE:
            # An expert of at least BM rows has its last tile moved back to end at its last row: every tile of it is
            # then whole, and stored through the descriptor. Rows it shares with the tile before are computed by
            # both, with the same operands in the same order, and written twice with the same bits.
            whole = end - tl.sum(tl.where(idx == e, starts, 0), 0) >= BM
            if whole:
                row0 = tl.minimum(row0, end - BM)
        n0 = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, k_stop, BK):
            a = A_desc.load([row0, k])
            if TRANS_B:  # B holds W (E, N, K): the tile of W[e] at (n0, k), used transposed
                acc = tl.dot(a, B_desc.load([eb * N + n0, k]).T, acc)
            else:  # B holds W (E, K, N)
                acc = tl.dot(a, B_desc.load([eb * K + k, n0]), acc)
        if EPILOGUE == 0:
            _store_rows(C, C_desc, acc, row0, n0, end, N, whole, BM, BN)
        elif SUB == 1:
            _epilogue(acc, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0, whole, BM, BN,
                      EPILOGUE, SUMS)
        else:  # in SUB slices of columns: fewer registers live at once
            left, right = _halves(acc, BM, BN)
            if SUB == 2:
                _epilogue(left, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0, whole, BM,
                          BN // 2, EPILOGUE, SUMS)
                _epilogue(right, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0 + BN // 2,
                          whole, BM, BN // 2, EPILOGUE, SUMS)
            else:  # SUB == 4
                q0, q1 = _halves(left, BM, BN // 2)
                q2, q3 = _halves(right, BM, BN // 2)
                _epilogue(q0, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0, whole, BM,
                          BN // 4, EPILOGUE, SUMS)
                _epilogue(q1, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0 + BN // 4,
                          whole, BM, BN // 4, EPILOGUE, SUMS)
                _epilogue(q2, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end, n0 + BN // 2,
                          whole, BM, BN // 4, EPILOGUE, SUMS)
                _epilogue(q3, C, C_desc, X, X_desc, BIAS, PART, N, eb, pid_m, row0, first, end,
                          n0 + 3 * (BN // 4), whole, BM, BN // 4, EPILOGUE, SUMS)

    @triton.jit
    def _rows_kernel(A_desc, B_desc, C, C_desc, X, X_desc, BIAS, PART, ENDS, M, N, K, E,
                     EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     TRANS_B: tl.constexpr, TMA_STORE: tl.constexpr, EPILOGUE: tl.constexpr, SUB: tl.constexpr,
                     SUMS: tl.constexpr):
        """One program per (row tile, column tile), over the static bound of the row tiles."""
        tiles_m = tl.cdiv(M, BM) + E
        pid_m, pid_n = _swizzle(tl.program_id(0), tiles_m, tl.cdiv(N, BN), GROUP_M)
        idx, starts, ends, tiles, last = _expert_tiles(ENDS, E, EP, BM)
        _rows_tile(A_desc, B_desc, C, C_desc, X, X_desc, BIAS, PART, N, K, E, pid_m, pid_n, idx, starts, ends, tiles,
                   last, BM, BN, BK, TRANS_B, TMA_STORE, EPILOGUE, SUB, SUMS)

    @triton.jit
    def _rows_persistent_kernel(A_desc, B_desc, C, C_desc, X, X_desc, BIAS, PART, ENDS, M, N, K, E,
                                EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                GROUP_M: tl.constexpr, TRANS_B: tl.constexpr, TMA_STORE: tl.constexpr,
                                EPILOGUE: tl.constexpr, SUB: tl.constexpr, SUMS: tl.constexpr, PROGRAMS: tl.constexpr,
                                WARP_SPECIALIZE: tl.constexpr):
        """PROGRAMS programs (one per multiprocessor) loop over the row tiles that hold rows (read on the device)."""
        idx, starts, ends, tiles, last = _expert_tiles(ENDS, E, EP, BM)
        tiles_m = tl.sum(tiles, 0)
        tiles_n = tl.cdiv(N, BN)
        for t in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _swizzle(t, tiles_m, tiles_n, GROUP_M)
            _rows_tile(A_desc, B_desc, C, C_desc, X, X_desc, BIAS, PART, N, K, E, pid_m, pid_n, idx, starts, ends,
                       tiles, last, BM, BN, BK, TRANS_B, TMA_STORE, EPILOGUE, SUB, SUMS)

    @triton.jit
    def _weights_tile(A_desc, G_desc, A, G, W, ENDS, KA, N, e, pid,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """Tile ``pid`` of ``dW[e] = A[rows of e]ᵀ · G[rows of e]`` (a reduction over expert e's rows)."""
        pid_m, pid_n = _swizzle(pid, tl.cdiv(KA, BM), tl.cdiv(N, BN), GROUP_M)
        start = tl.load(ENDS + e - 1, mask=e > 0, other=0)
        end = tl.load(ENDS + e)
        ka0, n0 = pid_m * BM, pid_n * BN
        ka = ka0 + tl.arange(0, BM)
        cols = n0 + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        n_full = (end - start) // BK
        for i in range(0, n_full):  # whole chunks of BK rows of this expert, through the descriptors
            r = start + i * BK
            acc = tl.dot(A_desc.load([r, ka0]).T, G_desc.load([r, n0]), acc)
        tail = start + n_full * BK
        if tail < end:  # the last, partial chunk: rows past the expert's end must read as zero
            rr = tail + tl.arange(0, BK)
            inside = rr < end
            a = tl.load(A + rr.to(tl.int64)[None, :] * KA + ka[:, None], mask=inside[None, :] & (ka < KA)[:, None],
                        other=0.0)
            g = tl.load(G + rr.to(tl.int64)[:, None] * N + cols[None, :], mask=inside[:, None] & (cols < N)[None, :],
                        other=0.0)
            acc = tl.dot(a, g, acc)
        mask = (ka < KA)[:, None] & (cols < N)[None, :]
        tl.store(W + e.to(tl.int64) * KA * N + ka[:, None] * N + cols[None, :], acc.to(W.dtype.element_ty), mask=mask)

    @triton.jit
    def _column_sums_tile(G, DB, ENDS, N, e, pid, BR: tl.constexpr, BC: tl.constexpr):
        """Tile ``pid`` of expert e's bias gradient ``Σ_{rows of e} G`` (BC columns), BR rows at a time, summed
        elementwise in registers and across the rows once at the end: a fixed order, no atomics."""
        start = tl.load(ENDS + e - 1, mask=e > 0, other=0)
        end = tl.load(ENDS + e)
        cols = pid * BC + tl.arange(0, BC)
        acc = tl.zeros((BR, BC), dtype=tl.float32)
        for r in tl.range(start, end, BR, num_stages=1):  # no pipeline buffers: the matmul tiles own the smem
            rr = r + tl.arange(0, BR)
            acc += tl.load(G + rr.to(tl.int64)[:, None] * N + cols[None, :],
                           mask=(rr < end)[:, None] & (cols < N)[None, :], other=0.0).to(tl.float32)
        tl.store(DB + e * N + cols, tl.sum(acc, 0), mask=cols < N)

    @triton.jit
    def _weights_kernel(A1_desc, G1_desc, A1, G1, W1, KA1, N1, A2_desc, G2_desc, A2, G2, W2, KA2, N2, DB1, DB2, ENDS,
                        E, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        BIAS: tl.constexpr, SUM1: tl.constexpr, SUM2: tl.constexpr, BR: tl.constexpr,
                        BC: tl.constexpr):
        """Both weight gradients of the experts in one launch, a program per (tile, expert, gradient): the tiles
        of one gradient alone fill the GPU's multiprocessors 4.4 times at the layer's shapes (the last round 36 %
        full), those of both 8.7 times. With BIAS 1 (first) or 2 (last), a slice of the grid more sums G1 (SUM1)
        and G2 (SUM2) over each expert's rows: the biases' gradients, where G1 and G2 are the gradients of the up
        and the down projections' outputs."""
        pid, g = tl.program_id(0), tl.program_id(1)
        if BIAS == 1:
            g -= 1
        is_bias = False
        if BIAS != 0:
            is_bias = (g == -1) | (g == 2 * E)
        if is_bias:
            c1 = tl.cdiv(N1, BC) if SUM1 else 0
            c2 = tl.cdiv(N2, BC) if SUM2 else 0
            if pid < E * c1:
                _column_sums_tile(G1, DB1, ENDS, N1, pid // c1, pid % c1, BR, BC)
            elif pid < E * (c1 + c2):
                pid -= E * c1
                _column_sums_tile(G2, DB2, ENDS, N2, pid // c2, pid % c2, BR, BC)
        else:
            # One tile body for both (two inlined bodies would each take their own shared memory).
            if g < E:
                a_desc, g_desc, a, gr, w, ka, n, e = A1_desc, G1_desc, A1, G1, W1, KA1, N1, g
            else:
                a_desc, g_desc, a, gr, w, ka, n, e = A2_desc, G2_desc, A2, G2, W2, KA2, N2, g - E
            if pid < tl.cdiv(ka, BM) * tl.cdiv(n, BN):
                _weights_tile(a_desc, g_desc, a, gr, w, ENDS, ka, n, e, pid, BM, BN, BK, GROUP_M)

    @triton.jit
    def _cast_kernel(S0, D0, N0, S1, D1, N1, S2, D2, N2, S3, D3, N3, BLOCK: tl.constexpr):
        """Up to four tensors cast in one launch: each program copies BLOCK elements of one of them."""
        pid = tl.program_id(0)
        b0, b1, b2 = tl.cdiv(N0, BLOCK), tl.cdiv(N1, BLOCK), tl.cdiv(N2, BLOCK)
        if pid < b0:
            src, dst, n = S0, D0, N0
        elif pid < b0 + b1:
            src, dst, n, pid = S1, D1, N1, pid - b0
        elif pid < b0 + b1 + b2:
            src, dst, n, pid = S2, D2, N2, pid - b0 - b1
        else:
            src, dst, n, pid = S3, D3, N3, pid - b0 - b1 - b2
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n).to(dst.dtype.element_ty), mask=offs < n)


# ---------------------------------------------------------------------------------------------------------
# Launchers, as custom ops (torch.compile keeps each one opaque call)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch_settings(launch: str, rows: int) -> tuple[int, ...]:
    """The launch settings of matmul ``launch`` over ``rows`` routed rows: ``LAUNCH_SMALL``'s up to
    :data:`SMALL_ROWS` rows where it has the matmul, else ``LAUNCH``'s."""
    if rows <= SMALL_ROWS and launch in LAUNCH_SMALL:
        return LAUNCH_SMALL[launch]
    return LAUNCH[launch]


def _launch_rows(a: Tensor, w: Tensor, ends: Tensor, trans_b: bool, launch: str, c: Tensor, epilogue: int = 0,
                 x: Tensor | None = None, bias: Tensor | None = None, part: Tensor | None = None,
                 sums: int = 0) -> None:
    """``c[rows of e] = a[rows of e] · w[e]`` (or ``· w[e]ᵀ``) on the current stream, with ``launch``'s settings
    (:func:`launch_settings`); with
    ``epilogue`` 1 or 2 the up projection's bias and GELU on the result, with 3 the down projection's bias (see
    :func:`_epilogue`: x is h, or u; bias b_up or b_down; part the per-tile column sums when ``sums`` says how,
    as :data:`BIAS_SUMS`)."""
    M, K = a.shape
    E = w.shape[0]
    N = c.shape[1]
    BM, BN, BK, warps, stages, group_m, grid, tma_store, *sub = launch_settings(launch, M)
    sub = sub[0] if sub and epilogue else 1
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(w.view(-1, w.shape[2]), [BN, BK] if trans_b else [BK, BN])
    c_desc = TensorDescriptor.from_tensor(c, [BM, BN // sub])
    x_desc = c_desc if x is None else TensorDescriptor.from_tensor(x, [BM, BN // sub])
    args = (a_desc, b_desc, c, c_desc, c if x is None else x, x_desc, c if bias is None else bias,
            c if part is None else part, ends, M, N, K, E)
    meta = dict(EP=max(2, triton.next_power_of_2(E)), BM=BM, BN=BN, BK=BK, GROUP_M=group_m, TRANS_B=trans_b,
                TMA_STORE=bool(tma_store), EPILOGUE=epilogue, SUB=sub, SUMS=sums, num_warps=warps, num_stages=stages)
    if grid:
        programs = _multiprocessors(a.device)
        _rows_persistent_kernel[(programs,)](*args, **meta, PROGRAMS=programs, WARP_SPECIALIZE=grid == 2)
    else:  # every expert's last tile may be partial: cdiv(M, BM) + E row tiles at most
        _rows_kernel[((triton.cdiv(M, BM) + E) * triton.cdiv(N, BN),)](*args, **meta)


CAST_BLOCK = 4096  # elements per program of the parameters' cast


@torch.library.custom_op("sadiffuseq::moe_cast_params", mutates_args=())
def cast_params(w_up: Tensor, b_up: Tensor, w_down: Tensor, b_down: Tensor | None,
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The experts' parameters in ``dtype``, one launch for all (``b_down=None``: an empty fourth result). Left to
    ``torch.compile`` the casts were four kernels, the two weights' about 21 µs each at the layer's shapes."""
    srcs = [t.contiguous() for t in (w_up, b_up, w_down)] + [b_down.contiguous() if b_down is not None else
                                                              w_up.new_empty(0)]
    outs = [torch.empty(t.shape, dtype=dtype, device=t.device) for t in srcs]
    args = [a for src, out in zip(srcs, outs) for a in (src, out, src.numel())]
    blocks = sum(triton.cdiv(src.numel(), CAST_BLOCK) for src in srcs)
    _cast_kernel[(blocks,)](*args, BLOCK=CAST_BLOCK, num_warps=8)
    return tuple(outs)


@cast_params.register_fake
def _(w_up, b_up, w_down, b_down, dtype):
    return tuple(torch.empty(t.shape, dtype=dtype, device=t.device)
                 for t in (w_up, b_up, w_down, b_down if b_down is not None else w_up.new_empty(0)))


@torch.library.custom_op("sadiffuseq::moe_gmm", mutates_args=())
def grouped_mm(a: Tensor, w: Tensor, ends: Tensor, trans_b: bool, launch: str, bias: Tensor | None = None) -> Tensor:
    """``a[rows of e] · w[e]`` (w: (E, K, N)), or with ``trans_b`` ``a[rows of e] · w[e]ᵀ`` (w: (E, N, K)), plus
    ``bias[e]`` (E, N) where given, with the launch settings ``LAUNCH[launch]``."""
    a, w = a.contiguous(), w.contiguous()
    c = a.new_empty(a.shape[0], w.shape[1] if trans_b else w.shape[2])
    if bias is None:
        _launch_rows(a, w, ends, trans_b, launch, c)
    else:
        _launch_rows(a, w, ends, trans_b, launch, c, epilogue=3, bias=bias.contiguous())
    return c


@grouped_mm.register_fake
def _(a, w, ends, trans_b, launch, bias=None):
    return a.new_empty(a.shape[0], w.shape[1] if trans_b else w.shape[2])


@torch.library.custom_op("sadiffuseq::moe_gmm_up_gelu", mutates_args=())
def up_gelu(rows: Tensor, w_up: Tensor, b_up: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
    """The up projection with its bias and GELU in the matmul's epilogue: ``u = rows[of e] · W_up[e]`` and
    ``h = GELU(u + b_up[e])``, both (M, H) (launch settings ``LAUNCH["up_gelu"]``)."""
    rows, w_up, b_up = rows.contiguous(), w_up.contiguous(), b_up.contiguous()
    u = rows.new_empty(rows.shape[0], w_up.shape[2])
    h = torch.empty_like(u)
    _launch_rows(rows, w_up, ends, False, "up_gelu", u, epilogue=1, x=h, bias=b_up)
    return u, h


@up_gelu.register_fake
def _(rows, w_up, b_up, ends):
    u = rows.new_empty(rows.shape[0], w_up.shape[2])
    return u, torch.empty_like(u)


@torch.library.custom_op("sadiffuseq::moe_gmm_down_input_grad_gelu", mutates_args=())
def down_input_grad_gelu(grad: Tensor, w_down: Tensor, u: Tensor, b_up: Tensor, ends: Tensor,
                         sums: int) -> tuple[Tensor, Tensor]:
    """The down projection's input gradient through the GELU, in the matmul's epilogue: ``du = (grad[of e] ·
    W_down[e]ᵀ) · GELU'(u + b_up[e])`` (M, H), and with ``sums`` 1 or 2 (as :data:`BIAS_SUMS`) the bias gradient
    ``Σ_{rows of e} du`` (E, H) from per-tile column sums added in a fixed order; with 0 an empty (0, H) (launch
    settings ``LAUNCH["down_input_grad_gelu"]``)."""
    grad, w_down, u, b_up = grad.contiguous(), w_down.contiguous(), u.contiguous(), b_up.contiguous()
    M, H = u.shape
    E = b_up.shape[0]
    BM = LAUNCH["down_input_grad_gelu"][0]
    du = torch.empty_like(u)
    part = torch.empty(triton.cdiv(M, BM) + E if sums else 0, H, dtype=torch.float32, device=u.device)
    _launch_rows(grad, w_down, ends, True, "down_input_grad_gelu", du, epilogue=2, x=u, bias=b_up, part=part,
                 sums=sums)
    if not sums:
        return du, b_up.new_empty(0, H)
    d_b_up = torch.empty_like(b_up)
    _sum_tiles_kernel[(E, triton.cdiv(H, BN_SUM))](part, d_b_up, ends, H, E, EP=max(2, triton.next_power_of_2(E)),
                                                   ROWS=BM, BN=BN_SUM, BT=BT_SUM, num_warps=4)
    return du, d_b_up


@down_input_grad_gelu.register_fake
def _(grad, w_down, u, b_up, ends, sums):
    return torch.empty_like(u), b_up.new_empty(b_up.shape[0] if sums else 0, u.shape[1])


def _launch_weight_grads(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, ends: Tensor, w1: Tensor,
                         w2: Tensor, db1: Tensor | None = None, db2: Tensor | None = None) -> None:
    """``w[e] = a[rows of e]ᵀ · g[rows of e]`` for both pairs, one launch on the current stream; with ``db1`` (and
    ``db2``) also ``db[e] = Σ_{rows of e} g`` (fp32) for g1 (g2)."""
    BM, BN, BK, warps, stages, group_m = LAUNCH["weight_grad"]
    sums = db1 is not None or db2 is not None
    bias, BR, BC = WEIGHT_GRAD_BIAS if sums else (0, 16, 16)
    E = ends.shape[0]
    sum_tiles = E * sum(triton.cdiv(g.shape[1], BC) for g, db in ((g1, db1), (g2, db2)) if db is not None)
    args, tiles = [], [sum_tiles]
    for a, g, w in ((a1, g1, w1), (a2, g2, w2)):
        KA, N = a.shape[1], g.shape[1]
        args += [TensorDescriptor.from_tensor(a, [BK, BM]), TensorDescriptor.from_tensor(g, [BK, BN]), a, g, w, KA, N]
        tiles.append(triton.cdiv(KA, BM) * triton.cdiv(N, BN))
    args += [w1 if db1 is None else db1, w2 if db2 is None else db2, ends, E]
    _weights_kernel[(max(tiles), 2 * E + sums)](*args, BM=BM, BN=BN, BK=BK, GROUP_M=group_m, BIAS=bias,
                                                SUM1=db1 is not None, SUM2=db2 is not None, BR=BR, BC=BC,
                                                num_warps=warps, num_stages=stages)


def _weight_grad_outputs(a1, g1, a2, g2, ends, out_dtype):
    E = ends.shape[0]
    return (torch.empty(E, a1.shape[1], g1.shape[1], dtype=out_dtype, device=a1.device),
            torch.empty(E, a2.shape[1], g2.shape[1], dtype=out_dtype, device=a2.device))


@torch.library.custom_op("sadiffuseq::moe_gmm_weight_grads", mutates_args=())
def grouped_weight_grads(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, ends: Tensor,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``a[rows of e]ᵀ · g[rows of e]`` for every expert e, for two pairs (a1, g1) and (a2, g2) sorted by the same
    experts, in one launch: (E, a1.shape[1], g1.shape[1]) and (E, a2.shape[1], g2.shape[1]) in ``out_dtype``."""
    a1, g1, a2, g2 = (t.contiguous() for t in (a1, g1, a2, g2))
    w1, w2 = _weight_grad_outputs(a1, g1, a2, g2, ends, out_dtype)
    _launch_weight_grads(a1, g1, a2, g2, ends, w1, w2)
    return w1, w2


@grouped_weight_grads.register_fake
def _(a1, g1, a2, g2, ends, out_dtype):
    return _weight_grad_outputs(a1, g1, a2, g2, ends, out_dtype)


# Whether the backward runs the up projection's input gradient and both weight gradients side by side on two CUDA
# streams (:func:`input_and_weight_grads`).
CONCURRENT_BACKWARD = True
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def _bias_grad_output(g: Tensor, ends: Tensor, wanted: bool) -> Tensor:
    return g.new_empty(ends.shape[0] if wanted else 0, g.shape[1], dtype=torch.float32)


@torch.library.custom_op("sadiffuseq::moe_gmm_input_and_weight_grads", mutates_args=())
def input_and_weight_grads(du: Tensor, w_up: Tensor, rows: Tensor, h: Tensor, grad: Tensor, ends: Tensor,
                           out_dtype: torch.dtype, up_bias_grad: bool,
                           down_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rest of the experts' backward once ``du`` is known: the rows' gradient ``du[rows of e] · W_up[e]ᵀ``, both
    weight gradients (``rowsᵀ · du`` and ``hᵀ · grad`` per expert, in ``out_dtype``) and, where asked for, the
    biases' gradients ``Σ_{rows of e} du`` (E, H) and ``Σ_{rows of e} grad`` (E, d) in fp32 from the weight-gradient
    launch (else empty, (0, H) and (0, d)).

    On a GPU (with :data:`CONCURRENT_BACKWARD`) the weight gradients run on a second stream beside the input
    gradient: each kernel alone leaves multiprocessors idle in its last round of tiles (at 8k tokens the input
    gradient's 408 tiles are 3.1 rounds of 132), and side by side the other kernel's tiles fill them. Every output
    is allocated on the current stream before the fork, and the current stream waits for the side stream before it
    returns, so the caching allocator and CUDA-graph capture see one stream's order."""
    du, w_up, rows, h, grad = (t.contiguous() for t in (du, w_up, rows, h, grad))
    d_rows = du.new_empty(du.shape[0], w_up.shape[1])
    w1, w2 = _weight_grad_outputs(rows, du, h, grad, ends, out_dtype)
    db1, db2 = _bias_grad_output(du, ends, up_bias_grad), _bias_grad_output(grad, ends, down_bias_grad)
    sums = (db1 if up_bias_grad else None, db2 if down_bias_grad else None)
    if du.is_cuda and CONCURRENT_BACKWARD:
        current = torch.cuda.current_stream(du.device)
        side = _SIDE_STREAMS.get(current.device_index)
        if side is None:  # one per device, made once
            side = _SIDE_STREAMS[current.device_index] = torch.cuda.Stream(du.device)
        side.wait_stream(current)  # before the launch below: the side stream must not wait for it
        _launch_rows(du, w_up, ends, True, "up_input_grad", d_rows)
        with torch.cuda.stream(side):
            _launch_weight_grads(rows, du, h, grad, ends, w1, w2, *sums)
        current.wait_stream(side)
    else:
        _launch_rows(du, w_up, ends, True, "up_input_grad", d_rows)
        _launch_weight_grads(rows, du, h, grad, ends, w1, w2, *sums)
    return d_rows, w1, w2, db1, db2


@input_and_weight_grads.register_fake
def _(du, w_up, rows, h, grad, ends, out_dtype, up_bias_grad, down_bias_grad):
    return (du.new_empty(du.shape[0], w_up.shape[1]), *_weight_grad_outputs(rows, du, h, grad, ends, out_dtype),
            _bias_grad_output(du, ends, up_bias_grad), _bias_grad_output(grad, ends, down_bias_grad))


# ---------------------------------------------------------------------------------------------------------
# The experts' feed-forward


class TritonExperts(torch.autograd.Function):
    """``GELU(rows[e] · W_up[e] + b_up[e]) · W_down[e] (+ b_down[e])`` for rows sorted by expert (``expert``: each
    row's expert, ``ends = cumsum(counts)``, int32).

    The parameters come in their own dtype (fp32 in mixed precision) and are cast to the rows' dtype here, so that
    the weight gradients leave in the parameters' dtype straight from the kernels. Saved for the backward: the rows,
    the cast weights, the up projection's output and the activation (what a dense FFN keeps too). Both biases'
    gradients are column sums over each expert's rows, taken by programs of the weight-gradient launch (or, with
    the GELU's backward in a kernel of its own, the up bias's there)."""

    @staticmethod
    def forward(ctx, rows: Tensor, w_up: Tensor, b_up: Tensor, w_down: Tensor, expert: Tensor, ends: Tensor,
                b_down: Tensor | None) -> Tensor:
        dtype = rows.dtype
        if any(t is not None and t.dtype != dtype for t in (w_up, b_up, w_down, b_down)):  # one launch for all
            wu, bu, wd, bd = torch.ops.sadiffuseq.moe_cast_params(w_up, b_up, w_down, b_down, dtype)
            bd = bd if b_down is not None else None
        else:
            wu, bu, wd, bd = w_up, b_up, w_down, b_down
        if FUSED_GELU[0]:
            u, h = torch.ops.sadiffuseq.moe_gmm_up_gelu(rows, wu, bu, ends)
        else:
            u = torch.ops.sadiffuseq.moe_gmm(rows, wu, ends, False, "up")
            h = bias_gelu_forward(u, bu, expert, ends)
        ctx.save_for_backward(rows, wu, bu, wd, u, h, expert, ends)
        ctx.dtypes = (w_up.dtype, b_up.dtype, w_down.dtype, None if b_down is None else b_down.dtype)
        return torch.ops.sadiffuseq.moe_gmm(h, wd, ends, False, "down", bd)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, wu, bu, wd, u, h, expert, ends = ctx.saved_tensors
        w_up_dtype, b_up_dtype, w_down_dtype, b_down_dtype = ctx.dtypes
        grad = grad.contiguous()
        # The up projection's bias gradient: from the GELU backward's kernel, from the epilogue that does its work
        # (BIAS_SUMS 1 or 2), or (BIAS_SUMS 0) from programs of the weight-gradient launch.
        in_weights = FUSED_GELU[1] and BIAS_SUMS == 0
        if FUSED_GELU[1]:
            du, d_b_up = torch.ops.sadiffuseq.moe_gmm_down_input_grad_gelu(grad, wd, u, bu, ends, BIAS_SUMS)
        else:
            dh = torch.ops.sadiffuseq.moe_gmm(grad, wd, ends, True, "down_input_grad")
            du, d_b_up = bias_gelu_backward(dh, u, bu, expert, ends)
        # Both weight gradients in one launch (the down projection's held back until du is known): twice the tiles;
        # beside them, on a second stream, the rows' gradient.
        d_rows, d_w_up, d_w_down, db_up, d_b_down = torch.ops.sadiffuseq.moe_gmm_input_and_weight_grads(
            du, wu, rows, h, grad, ends, w_up_dtype, in_weights, b_down_dtype is not None)
        if in_weights:
            d_b_up = db_up
        d_rows = d_rows if ctx.needs_input_grad[0] else None
        d_b_down = None if b_down_dtype is None else d_b_down.to(b_down_dtype)
        return d_rows, d_w_up, d_b_up.to(b_up_dtype), d_w_down.to(w_down_dtype), None, None, d_b_down


def experts_ffn(rows: Tensor, w_up: Tensor, b_up: Tensor, w_down: Tensor, expert: Tensor, ends: Tensor,
                b_down: Tensor | None = None) -> Tensor:
    """:class:`TritonExperts`; without ``b_down`` the down projection's bias is the caller's (added gate-weighted,
    per token)."""
    return TritonExperts.apply(rows, w_up, b_up, w_down, expert, ends, b_down)
