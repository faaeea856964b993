"""The global tokens of the ``flash`` backend as Triton kernels, one pass over the sequence per piece.

The band kernel (FlashAttention-2's or cuDNN's) leaves the global tokens to the code around it: the G global keys
that every query also sees, and the G global rows that see every key (:mod:`sadiffuseq.attention.flash`). Written
as PyTorch, that is a dozen skinny matmuls — (L × hd) by (hd × G), (G × L) by (L × hd), ... — each a full pass over
a sequence-long tensor, plus the elementwise work between them: at 32k tokens about as much GPU time as the band
itself. Here the same algebra runs in three kernels, each reading every sequence-long tensor once:

* :func:`merge_global_keys` (forward): per block of queries, the scores against the G global keys, their
  log-sum-exp merged with the band's (split-K algebra), and the merged output and log-sum-exp written.
* :func:`global_rows` (forward): the G global rows against every key, split over the sequence (running max, sum
  and weighted values per piece, merged by log-sum-exp afterwards); :func:`write_rows` puts them in place.
* :func:`global_backward` (backward): per block of positions, both roles at once — as queries of the global keys
  (dS = P ∘ (dP − rowsum(dO ∘ O)); dq += dS·K_g) and as keys of the global rows (dk += dS_rᵀ·Q_g, dv += P_rᵀ·dO_g) —
  added to the band's gradients and written in the layout of q, k and v; the gradients of the global tokens
  themselves (dK_g, dV_g, dQ_g: reductions over the whole sequence) as one partial sum per program, added up after.

Packed documents are not handled here (the PyTorch path masks the other documents); :func:`supports` says when
these kernels apply. Measured on an H100 at 32k tokens (docs/benchmarks.md), they take the flash backend's forward
+ backward with cuDNN's band from 2.47 to 1.72 ms (CUDA-graph replays; with dO read in its own layout, the
launch settings below tuned, and cuDNN's corner merged by a kernel of its own).

Needs Triton (shipped with PyTorch's CUDA wheels); the tests also run the kernels through Triton's CPU interpreter
where Triton is installed.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch wheels come without Triton
    triton = None

# Launch settings of each kernel: BM / BN positions per block, SPAN blocks per program (the backward and the
# global rows keep running sums over them, so longer spans mean fewer partial sums to add up afterwards), warps,
# software-pipeline stages, and the order of the grid (HEADS_FAST: programs launched together take every head of
# the same rows). All three kernels are bound by memory traffic (every sequence-long tensor read once). Chosen by
# ``scripts/gpu_tune_globals.py`` on an H100 at 32k tokens, hd 64, 16 heads (docs/benchmarks.md): the best
# setting of each kernel in both layouts tried (the benchmark's (B, H, L, hd) inputs and the model's fused
# projection), 4–15% faster than the first hand-picked ones.
MERGE = dict(BM=64, num_warps=4, num_stages=2, HEADS_FAST=True)
ROWS = dict(BN=128, SPAN=16, num_warps=4, num_stages=3, HEADS_FAST=True)
BACKWARD = dict(BM=64, SPAN=8, num_warps=4, num_stages=3, HEADS_FAST=True)
MIN_PROGRAMS = 256  # a span is halved until the grid has this many programs (about two per SM of an H100), or 1


def _span(length: int, block: int, span: int, n_bh: int) -> int:
    """The longest span up to ``span`` that still gives MIN_PROGRAMS programs (short sequences: shorter spans)."""
    while span > 1 and triton.cdiv(length, block * span) * n_bh < MIN_PROGRAMS:
        span //= 2
    return span


def _grid(n_blocks: int, n_bh: int, heads_fast: bool) -> tuple[int, int]:
    return (n_bh, n_blocks) if heads_fast else (n_blocks, n_bh)


def supports(q: torch.Tensor, n_global: int, packed: bool) -> bool:
    """Whether the kernels run these inputs: Triton on a CUDA device, fp16/bf16, head width 16–128 a power of
    two, at most 64 global tokens, no packed documents (or CPU tensors under Triton's interpreter)."""
    hd = q.shape[-1]
    if triton is None or packed or hd not in (16, 32, 64, 128) or not 0 < n_global <= 64:
        return False
    if interpreting():  # Triton's CPU interpreter (tests): CPU tensors, fp32 too
        return not q.is_cuda
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


# Read once: Triton settles interpretation when it is imported, and reading its setting inside a compiled body
# would break the graph there (Dynamo cannot trace Triton's environment lookup).
_INTERPRETING = triton is not None and bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` when it was imported)."""
    return _INTERPRETING


def _padded(n_global: int) -> int:
    return max(16, triton.next_power_of_2(n_global))  # tl.dot wants every dimension >= 16


if triton is not None:

    @triton.jit
    def _program(H, HEADS_FAST: tl.constexpr):
        """(block of positions, batch·head, batch, head) of this program. The grid's first axis is the one whose neighbours run
        together: with HEADS_FAST the programs running at once read every head of a few rows, which in the
        token-major layouts (B, L, H, hd) are contiguous; otherwise each reads a run of rows of one head."""
        if HEADS_FAST:
            pid, bh = tl.program_id(1), tl.program_id(0)
        else:
            pid, bh = tl.program_id(0), tl.program_id(1)
        return pid, bh, bh // H, bh % H

    @triton.jit
    def _in_band(pos, gpos, dil, window):
        """(M, G): the global key at ``gpos`` lies inside the band of the query at ``pos`` (counted there)."""
        off = pos[:, None] - gpos[None, :]
        return (off % dil == 0) & (tl.abs(off) <= window * dil)

    @triton.jit
    def _merge_kernel(Q, K, V, O, LSE, OUT, LSE_OUT, GPOS, DIL,
                      sqb, sql, sqh, skb, skl, skh, svb, svl, svh,
                      L, H, G, window, scale,
                      BM: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, HEADS_FAST: tl.constexpr):
        pid, bh, b, h = _program(H, HEADS_FAST)
        m = pid * BM + tl.arange(0, BM)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        rows, gs = m < L, g < G
        gpos = tl.load(GPOS + g, mask=gs, other=0)
        q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sql + d[None, :], mask=rows[:, None], other=0.0)
        kg = tl.load(K + b * skb + h * skh + gpos[:, None] * skl + d[None, :], mask=gs[:, None], other=0.0)
        vg = tl.load(V + b * svb + h * svh + gpos[:, None] * svl + d[None, :], mask=gs[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kg)) * scale  # (BM, GP) fp32
        keep = gs[None, :] & ~_in_band(m, gpos, tl.load(DIL + h), window)
        s = tl.where(keep, s, float("-inf"))
        # (B, H, L) fp32 log-sum-exp and (B, L, H, D) contiguous outputs
        lse_at = (b * H + h) * L + m
        lse_band = tl.load(LSE + lse_at, mask=rows, other=0.0)
        top = tl.maximum(lse_band, tl.max(s, 1))
        total = tl.exp(lse_band - top) + tl.sum(tl.exp(s - top[:, None]), 1)
        merged = top + tl.log(total)
        o_at = ((b * L + m[:, None]) * H + h) * D + d[None, :]
        o = tl.load(O + o_at, mask=rows[:, None], other=0.0).to(tl.float32)
        p = tl.exp(s - merged[:, None]).to(vg.dtype)
        out = o * tl.exp(lse_band - merged)[:, None] + tl.dot(p, vg)
        tl.store(OUT + o_at, out.to(OUT.dtype.element_ty), mask=rows[:, None])
        tl.store(LSE_OUT + lse_at, merged, mask=rows)

    @triton.jit
    def _backward_kernel(Q, K, V, O, DO, LSE, DQB, DKB, DVB, DQ, DK, DV,
                         QG, DOG, LSEG, DELTAG, GPOS, DIL, PART,
                         sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdob, sdol, sdoh,
                         sdqb, sdql, sdqh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh,
                         L, H, G, window, scale, n_programs,
                         BM: tl.constexpr, SPAN: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         HEADS_FAST: tl.constexpr):
        pid, bh, b, h = _program(H, HEADS_FAST)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        gs = g < G
        gpos = tl.load(GPOS + g, mask=gs, other=0)
        dil = tl.load(DIL + h)
        kg = tl.load(K + b * skb + h * skh + gpos[:, None] * skl + d[None, :], mask=gs[:, None], other=0.0)
        vg = tl.load(V + b * svb + h * svh + gpos[:, None] * svl + d[None, :], mask=gs[:, None], other=0.0)
        gq_at = (bh * GP + g[:, None]) * D + d[None, :]  # (B, H, GP, D) contiguous
        qg = tl.load(QG + gq_at)
        dog = tl.load(DOG + gq_at)
        lseg = tl.load(LSEG + bh * GP + g)  # +inf on the padding: P_r = 0 there
        deltag = tl.load(DELTAG + bh * GP + g)
        dkg = tl.zeros((GP, D), dtype=tl.float32)  # this program's share of dK_g, dV_g, dQ_g
        dvg = tl.zeros((GP, D), dtype=tl.float32)
        dqg = tl.zeros((GP, D), dtype=tl.float32)
        for i in range(SPAN):  # SPAN blocks of BM positions per program: the loads above and the partials amortised
            m = (pid * SPAN + i) * BM + tl.arange(0, BM)
            rows = m < L
            c_at = ((b * L + m[:, None]) * H + h) * D + d[None, :]  # the contiguous (B, L, H, D) tensors
            q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sql + d[None, :], mask=rows[:, None], other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + m[:, None] * sdol + d[None, :], mask=rows[:, None], other=0.0)
            # the positions as queries of the global keys; a global row's lse is +inf, so its P is 0 here
            s = tl.dot(q, tl.trans(kg)) * scale
            keep = gs[None, :] & ~_in_band(m, gpos, dil, window)
            lse = tl.load(LSE + (b * H + h) * L + m, mask=rows, other=float("inf"))
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)  # (BM, GP)
            o = tl.load(O + c_at, mask=rows[:, None], other=0.0).to(tl.float32)
            delta = tl.sum(do.to(tl.float32) * o, 1)
            ds = p * (tl.dot(do, tl.trans(vg)) - delta[:, None])
            ds_lo, p_lo = ds.to(q.dtype), p.to(q.dtype)
            dq = tl.load(DQB + c_at, mask=rows[:, None], other=0.0).to(tl.float32) + tl.dot(ds_lo, kg) * scale
            tl.store(DQ + b * sdqb + h * sdqh + m[:, None] * sdql + d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=rows[:, None])
            dkg += tl.dot(tl.trans(ds_lo), q)
            dvg += tl.dot(tl.trans(p_lo), do)
            # the positions as keys of the global rows
            k = tl.load(K + b * skb + h * skh + m[:, None] * skl + d[None, :], mask=rows[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + m[:, None] * svl + d[None, :], mask=rows[:, None], other=0.0)
            sr = tl.dot(qg, tl.trans(k)) * scale  # (GP, BM)
            pr = tl.where(rows[None, :], tl.exp(sr - lseg[:, None]), 0.0)
            dsr = pr * (tl.dot(dog, tl.trans(v)) - deltag[:, None])
            dsr_lo, pr_lo = dsr.to(q.dtype), pr.to(q.dtype)
            dk = (tl.load(DKB + c_at, mask=rows[:, None], other=0.0).to(tl.float32)
                  + tl.dot(tl.trans(dsr_lo), qg) * scale)
            dv = tl.load(DVB + c_at, mask=rows[:, None], other=0.0).to(tl.float32) + tl.dot(tl.trans(pr_lo), dog)
            tl.store(DK + b * sdkb + h * sdkh + m[:, None] * sdkl + d[None, :], dk.to(DK.dtype.element_ty),
                     mask=rows[:, None])
            tl.store(DV + b * sdvb + h * sdvh + m[:, None] * sdvl + d[None, :], dv.to(DV.dtype.element_ty),
                     mask=rows[:, None])
            dqg += tl.dot(dsr_lo, k)
        part = PART + ((bh * n_programs + pid) * 3 * GP + g[:, None]) * D + d[None, :]
        tl.store(part, dkg * scale)
        tl.store(part + GP * D, dvg)
        tl.store(part + 2 * GP * D, dqg * scale)


if triton is not None:

    @triton.jit
    def _global_rows_kernel(QG, K, V, ACC, STATS, skb, skl, skh, svb, svl, svh, L, H, scale, n_programs,
                            BN: tl.constexpr, SPAN: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                            HEADS_FAST: tl.constexpr):
        """The global rows against SPAN blocks of BN keys: running max, sum and weighted values (split-K)."""
        pid, bh, b, h = _program(H, HEADS_FAST)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        qg = tl.load(QG + (bh * GP + g[:, None]) * D + d[None, :])
        top = tl.full((GP,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((GP,), dtype=tl.float32)
        acc = tl.zeros((GP, D), dtype=tl.float32)
        for i in range(SPAN):
            n = (pid * SPAN + i) * BN + tl.arange(0, BN)
            cols = n < L
            k = tl.load(K + b * skb + h * skh + n[:, None] * skl + d[None, :], mask=cols[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + n[:, None] * svl + d[None, :], mask=cols[:, None], other=0.0)
            s = tl.where(cols[None, :], tl.dot(qg, tl.trans(k)) * scale, float("-inf"))  # (GP, BN)
            new_top = tl.maximum(top, tl.max(s, 1)).to(tl.float32)  # (a float scale may arrive as fp64)
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # a block past the end: nothing to add
            w = tl.exp(s - safe[:, None])
            shrink = tl.exp(top - safe)
            total = (total * shrink + tl.sum(w, 1)).to(tl.float32)
            acc = (acc * shrink[:, None] + tl.dot(w.to(v.dtype), v)).to(tl.float32)
            top = new_top
        at = bh * n_programs + pid
        tl.store(ACC + (at * GP + g[:, None]) * D + d[None, :], acc)
        tl.store(STATS + (at * 2) * GP + g, top)
        tl.store(STATS + (at * 2 + 1) * GP + g, total)

    @triton.jit
    def _rows_kernel(X, VALUES, GPOS, sxb, sxl, sxh, H, G, ADD: tl.constexpr, D: tl.constexpr):
        """x[b, gpos[g], h, :] (+)= rows[b, h, g, :] for one (g, b·h), in place: a handful of rows, where an
        indexed write under ``torch.compile`` would copy the whole of x first."""
        g, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        d = tl.arange(0, D)
        at = X + b * sxb + tl.load(GPOS + g) * sxl + h * sxh + d
        row = tl.load(VALUES + (bh * G + g) * D + d)
        if ADD:
            row += tl.load(at).to(tl.float32)
        tl.store(at, row.to(X.dtype.element_ty))


def _heads_first(x, n_padded: int, dtype):
    """(B, G, H, hd) gathered rows -> (B, H, GP, hd) contiguous in ``dtype``, zero rows as padding."""
    return torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, n_padded - x.shape[1])).to(dtype).contiguous()


def global_rows(q, k, v, global_pos, scale: float):
    """The global rows' attention over every key: (B, H, G, hd) fp32 outputs and (B, H, G) log-sum-exp, one read
    of k and v split over the sequence, the pieces merged by log-sum-exp."""
    B, L, H, D = q.shape
    G, GP = global_pos.shape[0], _padded(global_pos.shape[0])
    settings = {**ROWS, "SPAN": _span(L, ROWS["BN"], ROWS["SPAN"], B * H)}
    n_programs = triton.cdiv(L, settings["BN"] * settings["SPAN"])
    acc = torch.empty((B * H, n_programs, GP, D), dtype=torch.float32, device=q.device)
    stats = torch.empty((B * H, n_programs, 2, GP), dtype=torch.float32, device=q.device)
    q_g = _heads_first(q[:, global_pos.long()], GP, q.dtype)
    _global_rows_kernel[_grid(n_programs, B * H, settings["HEADS_FAST"])](q_g, k, v, acc, stats, *_strides(k, v), L, H,
                                                                          scale, n_programs, GP=GP, D=D, **settings)
    top, total = stats.unbind(2)  # (B·H, n, GP)
    best = top.max(1, keepdim=True).values
    weight = torch.exp(top - best)  # a piece with no keys has top = -inf: weight 0
    total = (total * weight).sum(1)
    rows = (acc * weight[..., None]).sum(1) / total[..., None]
    lse = best.squeeze(1) + total.log()
    return rows[:, :G].view(B, H, G, D), lse[:, :G].view(B, H, G)


def write_rows(x, rows, global_pos, add: bool = False) -> None:
    """In place: x (B, L, H, hd) at the global positions gets (add=False) or adds (add=True) rows (B, H, G, hd)."""
    B, L, H, D = x.shape
    G = global_pos.shape[0]
    _rows_kernel[(G, B * H)](x, rows.float().contiguous(), global_pos, *_strides(x), H, G, ADD=add, D=D,
                             num_warps=1)


def _strides(*xs):
    out = []
    for x in xs:
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
        out += [x.stride(0), x.stride(1), x.stride(2)]
    return out


def merge_global_keys(q, k, v, out, lse, global_pos, dilations, window: int, scale: float):
    """The band's ``out`` (B, L, H, hd) and ``lse`` (B, H, L) fp32 merged with the global keys: new (out, lse).
    ``dilations``: (H,) int32 on the device; ``global_pos``: (G,) int32."""
    B, L, H, D = q.shape
    G, GP = global_pos.shape[0], _padded(global_pos.shape[0])
    out, lse = out.contiguous(), lse.contiguous()
    new_out, new_lse = torch.empty_like(out), torch.empty_like(lse)
    grid = _grid(triton.cdiv(L, MERGE["BM"]), B * H, MERGE["HEADS_FAST"])
    _merge_kernel[grid](q, k, v, out, lse, new_out, new_lse, global_pos, dilations, *_strides(q, k, v),
                        L, H, G, window, scale, GP=GP, D=D, **MERGE)
    return new_out, new_lse


def global_backward(dout, q, k, v, out, lse_rest, row_lse, dq_band, dk_band, dv_band, global_pos, dilations,
                    window: int, scale: float):
    """The band's gradients plus every global-token term, in the layouts of q, k, v.

    ``lse_rest``: the final log-sum-exp (B, H, L) with +inf on the global rows; ``row_lse`` (B, H, G): the global
    rows' own. ``dout`` and ``out``: (B, L, H, hd), ``dout`` with any strides; the band's gradients (B, L, H, hd)
    contiguous."""
    B, L, H, D = q.shape
    G, GP = global_pos.shape[0], _padded(global_pos.shape[0])
    out = out.contiguous()  # dout: any strides (the layout autograd hands over; no copy)
    dq_band, dk_band, dv_band = dq_band.contiguous(), dk_band.contiguous(), dv_band.contiguous()
    gl = global_pos.long()
    q_g, do_g = q[:, gl], dout[:, gl]  # (B, G, H, hd)
    delta_g = (do_g.float() * out[:, gl].float()).sum(-1).transpose(1, 2)  # (B, H, G)
    pad = GP - G
    lse_g = torch.nn.functional.pad(row_lse.float(), (0, pad), value=float("inf")).contiguous()
    delta_g = torch.nn.functional.pad(delta_g, (0, pad)).contiguous()
    # in the layouts of q, k and v where those are dense (as SDPA gives its gradients), else contiguous
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    settings = {**BACKWARD, "SPAN": _span(L, BACKWARD["BM"], BACKWARD["SPAN"], B * H)}
    n_programs = triton.cdiv(L, settings["BM"] * settings["SPAN"])
    part = torch.empty((B * H, n_programs, 3, GP, D), dtype=torch.float32, device=q.device)
    _backward_kernel[_grid(n_programs, B * H, settings["HEADS_FAST"])](
        q, k, v, out, dout, lse_rest.contiguous(), dq_band, dk_band, dv_band, dq, dk, dv,
        _heads_first(q_g, GP, q.dtype), _heads_first(do_g, GP, q.dtype), lse_g, delta_g, global_pos, dilations, part,
        *_strides(q, k, v, dout, dq, dk, dv), L, H, G, window, scale, n_programs, GP=GP, D=D, **settings)
    sums = part.sum(1)[:, :, :G].transpose(0, 1)  # (3, B·H, G, D): dK_g, dV_g, dQ_g
    for grad, rows in zip((dk, dv, dq), sums):
        write_rows(grad, rows, global_pos, add=True)
    return dq, dk, dv
