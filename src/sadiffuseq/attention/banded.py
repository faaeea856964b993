"""Pure-PyTorch O(L·w) sparse attention over a :class:`~sadiffuseq.attention.patterns.Layout`.

The sequence arrives already permuted by the layout: the ``G`` global tokens first, then every residue class mod
``d`` as one contiguous segment sorted by original position. In that order the head pattern of
:func:`~sadiffuseq.attention.patterns.layout_mask_mod` is

* a dense block of ``G`` query rows (global queries see every key), and
* for every other query: the ``G`` global keys plus a band of its own class segment — keys whose rank in the
  segment is within ``window`` of the query's rank (same-class positions differ by multiples of ``d``, so
  ``|Δpos| ≤ window·d`` implies ``|Δrank| ≤ window``; the exact ``|Δpos|`` test is still applied as a mask).

The non-global rows of a segment are cut into chunks of ``chunk`` queries; chunk ``c`` scores the keys of ranks
``[c·chunk − window, (c+1)·chunk + window)`` (read through an overlapping ``unfold`` view of the zero-padded
segment, so all chunks are handled by one batched matmul) next to the global keys, masks, takes one softmax over
both and sums the matching values. Only ordinary differentiable torch ops are used, so autograd provides the
backward. Peak memory is O(L·(chunk + 2·window + G)) per head; nothing of size L×L is ever built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patterns import Layout

__all__ = ["banded_attention"]


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _global_rows(q_g, k, v, doc):
    """Global queries (B, H, G, hd) over all L keys, ∩ document."""
    s = torch.matmul(q_g, k.transpose(-1, -2))  # (B, H, G, L)
    if doc is not None:
        g = q_g.shape[2]
        allowed = doc[:, :g, None] == doc[:, None, :]  # (B, G, L)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=_softmax_dtype(q_g.dtype)).to(v.dtype)
    return torch.matmul(p, v)


def _segment_rows(q_s, k_s, v_s, k_g, v_g, pos, doc_s, doc_g, window: int, span: int, chunk: int):
    """Non-global queries of one residue-class segment: band of their segment + all global keys.

    q_s/k_s/v_s: (B, H, n, hd) the segment; k_g/v_g: (B, H, G, hd) the global keys (G may be 0);
    pos: (n,) original positions of the segment; doc_s: (B, n) / doc_g: (B, G) document ids or None;
    span = window · dilation, the largest allowed |Δpos|.
    """
    bsz, heads, n, hd = q_s.shape
    n_glob = k_g.shape[2]
    dev = q_s.device
    c = min(chunk, n)  # chunk length
    nc = -(-n // c)  # number of chunks
    npad = nc * c - n
    we = min(window, n - 1)  # a band wider than the segment only adds padding
    wb = c + 2 * we  # keys per chunk in the band

    # Queries: (B, H, nc, c, hd); band keys (B, H, nc, hd, wb) and values (B, H, nc, wb, hd) as overlapping views.
    qc = F.pad(q_s, (0, 0, 0, npad)).reshape(bsz, heads, nc, c, hd)
    kb = F.pad(k_s, (0, 0, we, we + npad)).unfold(2, wb, c)
    vb = F.pad(v_s, (0, 0, we, we + npad)).unfold(2, wb, c).transpose(-1, -2)

    # Masks, from ranks inside the segment (small: (nc, c, wb) and (B, nc, c, G + wb)).
    qrank = torch.arange(nc * c, device=dev).reshape(nc, c)
    krank = torch.arange(nc, device=dev)[:, None] * c - we + torch.arange(wb, device=dev)[None, :]
    q_pad = qrank >= n
    k_ok = (krank >= 0) & (krank < n)
    qr, kr = qrank.clamp(max=n - 1), krank.clamp(0, n - 1)
    qpos, kpos = pos[qr], pos[kr]
    band_ok = k_ok[:, None, :] & ((qpos[:, :, None] - kpos[:, None, :]).abs() <= span)  # (nc, c, wb)
    if doc_s is not None:
        dq = doc_s[:, qr]  # (B, nc, c)
        band_ok = band_ok[None] & (dq[..., None] == doc_s[:, kr][:, :, None, :])  # (B, nc, c, wb)
        glob_ok = dq[..., None] == doc_g[:, None, None, :]  # (B, nc, c, G)
    else:
        band_ok = band_ok[None]
        glob_ok = torch.ones(1, nc, c, n_glob, dtype=torch.bool, device=dev)
    allowed = torch.cat([glob_ok.expand(band_ok.shape[0], -1, -1, -1), band_ok], dim=-1)
    # Padding query rows may see everything (finite keys): their softmax stays well defined, so no NaN leaks
    # into the backward; their outputs are dropped and their gradients are zero.
    allowed = (allowed | q_pad[:, :, None])[:, None]  # (B|1, 1, nc, c, G + wb)

    s = torch.matmul(qc, kb)  # (B, H, nc, c, wb)
    if n_glob > 0:
        s_g = torch.matmul(qc, k_g.transpose(-1, -2)[:, :, None])  # (B, H, nc, c, G)
        s = torch.cat([s_g, s], dim=-1)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=_softmax_dtype(q_s.dtype)).to(v_s.dtype)

    out = torch.matmul(p[..., n_glob:], vb)  # (B, H, nc, c, hd)
    if n_glob > 0:
        out = out + torch.matmul(p[..., :n_glob], v_g[:, :, None])
    return out.reshape(bsz, heads, nc * c, out.shape[-1])[:, :, :n]


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    window: int,
    doc_ids: torch.Tensor | None = None,
    chunk: int = 128,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact sparse attention for the layout's pattern in O(L·(chunk + 2·window + G)) memory per head.

    ``q, k, v``: (B, H, L, hd) in the *permuted* order of ``layout`` (index i holds position ``layout.perm[i]``).
    ``doc_ids``: None or (B, L) document ids in *original* position order. Query i attends key j iff
    ``doc_ok(i, j) and (i < G or j < G or (perm[i] ≡ perm[j] mod d and |perm[i] − perm[j]| ≤ window·d))``.
    Returns (B, H, L, hd) in the same permuted order. Differentiable through autograd.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, L, hd) alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, heads, length, hd = q.shape
    if layout.perm.numel() != length:
        raise ValueError(f"layout is for length {layout.perm.numel()}, inputs have {length}")
    if window < 0 or chunk < 1:
        raise ValueError(f"need window >= 0 and chunk >= 1 (got {window}, {chunk})")
    if length == 0:
        return q.new_empty(bsz, heads, 0, v.shape[-1])

    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    q = q * scale
    n_glob, d = layout.n_global, layout.dilation
    perm = layout.perm.to(q.device)
    doc = None
    if doc_ids is not None:
        if doc_ids.shape[-1] != length:
            raise ValueError(f"doc_ids must be (B, {length}); got {tuple(doc_ids.shape)}")
        doc = doc_ids.to(q.device)[:, perm]  # permuted order

    k_g, v_g = k[:, :, :n_glob], v[:, :, :n_glob]
    doc_g = doc[:, :n_glob] if doc is not None else None
    outs = []
    if n_glob > 0:
        outs.append(_global_rows(q[:, :, :n_glob], k, v, doc))
    for r in range(d):
        a, b = layout.class_starts[r], layout.class_starts[r + 1]
        if b <= a:
            continue
        outs.append(
            _segment_rows(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], k_g, v_g, perm[a:b],
                doc[:, a:b] if doc is not None else None, doc_g, window, window * d, chunk,
            )
        )
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
