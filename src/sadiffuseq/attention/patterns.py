"""Sparse attention patterns: sliding window, dilated window, global tokens, documents.

A pattern says which key j a query i may attend to. Ours are bidirectional (Longformer, Beltagy et al. 2020):

* **sliding window** of half-width w: |i − j| ≤ w;
* **dilated window** (dilation d): j ≡ i (mod d) and |i − j| ≤ w·d — every d-th token over a d-times wider span;
* **global tokens**: a set of positions that attend to every key and that every query attends to;
* **documents**: when several examples are packed into one row, i and j must belong to the same one; this
  applies to global tokens too.

Each rule is a small ``mask_mod`` factory in FlexAttention's signature ``(b, h, q_idx, kv_idx) -> bool`` and
they compose with :func:`and_masks` / :func:`or_masks` (attention-gym style).

**Dilation by permutation.** A dilated window is scattered in the original order, so a block-sparse kernel
finds every tile partly filled and gains nothing. :class:`Layout` reorders the tokens — global tokens first,
then each residue class mod d contiguous and in order — so the same pattern becomes an ordinary band inside each
class plus one dense row and column block for the global tokens. Masks built by :func:`layout_mask_mod` work
in permuted indices but decide with original positions, so the pattern's meaning does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

MaskMod = "Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]"


# ---------------------------------------------------------------------------------------------------------
# mask_mod factories over original positions


def sliding_window(w: int):
    def mask_mod(b, h, q, k):
        return (q - k).abs() <= w

    return mask_mod


def dilated_window(w: int, d: int):
    def mask_mod(b, h, q, k):
        return ((q - k) % d == 0) & ((q - k).abs() <= w * d)

    return mask_mod


def global_tokens(is_global: torch.Tensor):
    """``is_global``: bool (L,) — those positions attend everywhere and are attended from everywhere."""

    def mask_mod(b, h, q, k):
        return is_global[q] | is_global[k]

    return mask_mod


def same_document(doc_ids: torch.Tensor):
    """``doc_ids``: (B, L) example index of every position of a packed row."""

    def mask_mod(b, h, q, k):
        return doc_ids[b, q] == doc_ids[b, k]

    return mask_mod


def and_masks(*mods):
    def mask_mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out & m(b, h, q, k)
        return out

    return mask_mod


def or_masks(*mods):
    def mask_mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out | m(b, h, q, k)
        return out

    return mask_mod


def head_mask_mod(w: int, d: int, is_global: torch.Tensor, doc_ids: torch.Tensor | None = None):
    """The full pattern of one head in original order: (window or dilated window) ∪ global, ∩ document."""
    local = sliding_window(w) if d == 1 else dilated_window(w, d)
    mod = or_masks(local, global_tokens(is_global))
    return and_masks(mod, same_document(doc_ids)) if doc_ids is not None else mod


# ---------------------------------------------------------------------------------------------------------
# Which positions are global


def global_positions(length: int, first: int = 16, every: int = 0, device=None) -> torch.Tensor:
    """bool (L,): the first ``first`` positions ([BOS] and the start of the source) and every ``every``-th one.

    Fixed positions (rather than, say, wherever [SEP] falls) keep the pattern identical for every row of a batch,
    so one mask per length serves all batches.
    """
    g = torch.zeros(length, dtype=torch.bool, device=device)
    g[: min(first, length)] = True
    if every > 0:
        g[::every] = True
    return g


# ---------------------------------------------------------------------------------------------------------
# Layout: the permutation that makes a dilated pattern block-sparse


@dataclass(frozen=True)
class Layout:
    """Token order for a (length, dilation, global set): globals first, then residue classes mod d in order.

    ``perm[i]`` is the original position of permuted index i; ``inv[p]`` the permuted index of position p;
    ``n_global`` the number of global tokens (permuted indices ``[0, n_global)``); ``class_starts`` the
    permuted index where each residue class begins (d + 1 entries, the last = L).
    """

    perm: torch.Tensor
    inv: torch.Tensor
    n_global: int
    dilation: int
    class_starts: tuple[int, ...]
    identity: bool  # the permutation changes nothing (no dilation, globals already first): skip the gathers


def make_layout(is_global: torch.Tensor, dilation: int) -> Layout:
    length = is_global.numel()
    pos = torch.arange(length, device=is_global.device)
    globals_ = pos[is_global]
    rest = pos[~is_global]
    classes = [rest[rest % dilation == r] for r in range(dilation)]
    perm = torch.cat([globals_, *classes])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(length, device=perm.device)
    starts = [len(globals_)]
    for c in classes:
        starts.append(starts[-1] + len(c))
    identity = bool((perm == pos).all())
    return Layout(perm, inv, len(globals_), dilation, tuple(starts), identity)


def layout_mask_mod(layout: Layout, w: int, doc_ids: torch.Tensor | None = None):
    """One layout's pattern in *permuted* indices, whatever the head: :func:`heads_mask_mod` for a single head.
    ``doc_ids`` (B, L) in original order."""
    heads = stack_layouts([layout], w)
    mod = heads_mask_mod(heads, None if doc_ids is None else permuted_docs(heads, doc_ids))

    def mask_mod(b, h, q, k):
        return mod(b, torch.zeros_like(h), q, k)

    return mask_mod


@dataclass(frozen=True, eq=False)
class HeadLayouts:
    """Every head of a layer on its own token order, stacked so that one kernel call serves all heads.

    Heads of equal dilation share a :class:`Layout`; every layout puts the same global tokens first, so the
    global rows and keys sit at permuted indices ``[0, n_global)`` for every head. ``perm``/``inv`` are (H, L)
    (None when every head's order is the original one); ``pos``/``cls`` are (H, L) int32 tables of each permuted
    index's original position and residue class, ``span`` (H,) int32 the reach w·d of each head's window of
    half-width ``window``. ``block_masks`` caches the kernels' BlockMasks for these heads (built by the backend).
    """

    layouts: tuple[Layout, ...]
    window: int
    perm: torch.Tensor | None
    inv: torch.Tensor | None
    pos: torch.Tensor
    cls: torch.Tensor
    span: torch.Tensor
    n_global: int
    plain: bool  # every head: undilated, identity order -> the band is |q - k| <= w, no table lookups
    block_masks: dict = field(default_factory=dict, compare=False, repr=False)


def stack_layouts(layouts: list[Layout], window: int) -> HeadLayouts:
    """One :class:`Layout` per head (heads of equal dilation may share one) -> :class:`HeadLayouts`."""
    n_global = {lay.n_global for lay in layouts}
    if len(n_global) != 1:
        raise ValueError("every head of a layer must have the same global tokens")
    identity = all(lay.identity for lay in layouts)
    perm = None if identity else torch.stack([lay.perm for lay in layouts])
    inv = None if identity else torch.stack([lay.inv for lay in layouts])
    pos = torch.stack([lay.perm.to(torch.int32) for lay in layouts])
    cls = torch.stack([(lay.perm % lay.dilation).to(torch.int32) for lay in layouts])
    span = torch.tensor([window * lay.dilation for lay in layouts], dtype=torch.int32, device=pos.device)
    plain = identity and all(lay.dilation == 1 for lay in layouts)
    return HeadLayouts(tuple(layouts), window, perm, inv, pos, cls, span, n_global.pop(), plain)


def heads_mask_mod(heads: HeadLayouts, docs: torch.Tensor | None = None, with_globals: bool = True):
    """The pattern of every head in its *permuted* indices (for kernels that run on the permuted sequences).

    ``docs``: (B, H, L) document ids in each head's order (:func:`permuted_docs`), or None. ``with_globals=False``
    leaves out the global rows and columns: the band alone, for kernels that handle the global tokens separately.

    Written for the GPU kernel that evaluates it on every partially filled tile: int32 table lookups and
    comparisons only (64-bit division and modulo are slow on GPUs), and no lookups at all when no head is dilated
    or reordered.
    """
    n_global, pos, cls, span, w = heads.n_global, heads.pos, heads.cls, heads.span, heads.window
    if heads.plain:

        def local(h, q, k):
            return (q - k).abs() <= w

    else:

        def local(h, q, k):
            return (cls[h, q] == cls[h, k]) & ((pos[h, q] - pos[h, k]).abs() <= span[h])

    def mask_mod(b, h, q, k):
        if with_globals:
            out = local(h, q, k) | (q < n_global) | (k < n_global)
        else:
            out = local(h, q, k) & (q >= n_global) & (k >= n_global)
        if docs is not None:
            out = out & (docs[b, h, q] == docs[b, h, k])
        return out

    return mask_mod


def permuted_docs(heads: HeadLayouts, doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document ids in original order -> (B, H, L) int32 in each head's permuted order."""
    return doc_ids[:, heads.pos.long()].to(torch.int32)


def dense_mask(mask_mod, length: int, batch: int = 1, device=None) -> torch.Tensor:
    """Materialise a mask_mod as a bool (B, L, L) tensor — for references and tests only (O(L²))."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    h = torch.zeros((), dtype=torch.long, device=device)
    return torch.stack([mask_mod(torch.tensor(b, device=device), h, q, k) for b in range(batch)])


@lru_cache(maxsize=64)
def _cached_layout(length: int, first: int, every: int, dilation: int, device_str: str) -> Layout:
    return make_layout(global_positions(length, first, every, device=torch.device(device_str)), dilation)


def cached_layout(length: int, first: int, every: int, dilation: int, device: torch.device) -> Layout:
    return _cached_layout(length, first, every, dilation, str(device))


@lru_cache(maxsize=64)
def _cached_head_layouts(length: int, first: int, every: int, dilations: tuple[int, ...], window: int,
                         device_str: str) -> HeadLayouts:
    device = torch.device(device_str)
    return stack_layouts([cached_layout(length, first, every, d, device) for d in dilations], window)


def cached_head_layouts(length: int, first: int, every: int, dilations: tuple[int, ...], window: int,
                        device: torch.device) -> HeadLayouts:
    """:class:`HeadLayouts` for heads with the given dilations (one per head), cached per process."""
    return _cached_head_layouts(length, first, every, tuple(dilations), window, str(device))


# the residue classes mod d of one row as a batch: how the flash backend hands dilated heads to a band kernel


def class_view(x: torch.Tensor, d: int) -> torch.Tensor:
    """One row (1, L, h, hd) -> its residue classes mod d as a batch (d, L/d, h, hd): a strided view."""
    L, h, D = x.shape[1:]
    return x[0].view(L // d, d, h, D).transpose(0, 1)


def class_lse(lse: torch.Tensor, d: int) -> torch.Tensor:
    """One row's log-sum-exp (1, h, L) -> (d, h, L/d), class-major like :func:`class_view`: a view."""
    h, L = lse.shape[1:]
    return lse[0].view(h, L // d, d).permute(2, 0, 1)
