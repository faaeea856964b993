"""Kernels that evaluate one head group's sparse pattern. All take (B, H, L, hd) tensors.

* ``dense`` — SDPA with the pattern materialised as a boolean L×L mask, in original token order. O(L²): the
  reference every other backend is tested against, never the default.
* ``flex`` — FlexAttention on the permuted sequence (see :class:`~sadiffuseq.attention.patterns.Layout`) with
  a BlockMask that skips empty 128×128 tiles. ``flex_attention`` is compiled once per process and BlockMasks
  are cached per (length, window, layout); with packed documents the mask depends on the batch and is rebuilt.
  The fast path on CUDA.
* ``banded`` — pure PyTorch on the permuted sequence, O(L·w) time and memory, differentiable by autograd: CPU
  training and tests (FlexAttention has no CPU backward, and its eager path materialises L×L scores).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sadiffuseq.attention import patterns
from sadiffuseq.attention.patterns import Layout

BACKENDS = ("flex", "banded", "dense")


def resolve_backend(name: str, device: torch.device, head_dim: int = 64) -> str:
    """auto: flex on CUDA (its fused kernel needs heads of width >= 16; narrower ones use banded), else banded."""
    if name == "auto":
        return "flex" if device.type == "cuda" and head_dim >= 16 else "banded"
    return name


# ---------------------------------------------------------------------------------------------------------
# dense reference (original order)


def dense_attention(q, k, v, window: int, dilation: int, is_global: torch.Tensor, doc_ids=None) -> torch.Tensor:
    L = q.shape[2]
    mod = patterns.head_mask_mod(window, dilation, is_global, doc_ids)
    mask = patterns.dense_mask(mod, L, doc_ids.shape[0] if doc_ids is not None else 1, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


# ---------------------------------------------------------------------------------------------------------
# FlexAttention (permuted order)


def _allow_recompiles() -> None:
    """Each (length, layout) is its own compiled kernel; dynamo's default of 8 variants per function would
    silently fall back to the unfused path (which materialises L×L scores) after a few lengths."""
    import torch._dynamo

    for name, value in (("cache_size_limit", 512), ("recompile_limit", 512), ("accumulated_cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    _allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    _allow_recompiles()
    return torch.compile(create_block_mask, dynamic=False)


_BLOCK_MASKS: dict[tuple, object] = {}


def block_mask_for(layout: Layout, window: int, length: int, doc_ids=None, band_only: bool = False):
    """The BlockMask of a head group on the permuted sequence (cached unless documents make it batch-specific).

    ``band_only``: the window/dilated band without the global rows and columns (the ``split`` schedule)."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = layout.perm.device
    mod = patterns.layout_mask_mod(layout, window, doc_ids, with_globals=not band_only)
    make = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    if doc_ids is not None:
        return make(mod, doc_ids.shape[0], None, length, length, device=device)
    key = (length, window, layout.dilation, layout.n_global, tuple(layout.class_starts), band_only, str(device))
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = make(mod, None, None, length, length, device=device)
    return _BLOCK_MASKS[key]


GLOBAL_SCHEDULES = ("inline", "copies", "split")
# ``auto`` picks split from this length on, inline below. Measured on an H100 (16 heads × 64, window ±256, 16
# globals, fwd+bwd bf16): inline is faster at 8,192 tokens (2.8 vs 4.6 ms: the split schedule is bound by host
# launch work there), split at 32,768 (5.7 vs 7.5 ms) and 131,072 (15.7 vs 28.6 ms). 16,384 was not measured.
SPLIT_FROM_LENGTH = 16384


def resolve_schedule(schedule: str, length: int) -> str:
    """``auto`` -> ``split`` for sequences of at least ``SPLIT_FROM_LENGTH`` tokens, else ``inline``."""
    if schedule == "auto":
        return "split" if length >= SPLIT_FROM_LENGTH else "inline"
    if schedule not in GLOBAL_SCHEDULES:
        raise ValueError(f"unknown global-token schedule {schedule!r}; choose from auto, {', '.join(GLOBAL_SCHEDULES)}")
    return schedule


def flex_attention(q, k, v, layout: Layout, window: int, doc_ids=None, schedule: str = "auto") -> torch.Tensor:
    """On permuted q, k, v; returns the permuted output.

    ``schedule`` changes how the global tokens are scheduled, not what is computed:

    * ``inline``: the global rows and columns are part of the BlockMask. The global query row makes one tile row
      span every key block and the global key column one tile column span every query block, so in forward and
      backward a few thread blocks walk the whole sequence while the rest visit a handful of tiles (measured on an
      H100 at 32k tokens: 2.66 ms fwd+bwd for 8 heads vs 0.95 ms for the window alone).
    * ``copies``: the G global query rows are one (G × L) matmul and every query block reads a private copy of the
      G global keys (their gradients are summed back by autograd): a balanced grid for L/128·G extra keys.
    * ``split``: the kernel sees the band only (no global rows, no global columns) and returns its log-sum-exp;
      the G global keys are a (L × G) matmul and the two partial softmaxes are merged exactly by their
      log-sum-exps (the same algebra as split-K / flash-decoding); the global rows are a (G × L) matmul.
      No tile walks the sequence and no key is duplicated.
    * ``auto``: see :func:`resolve_schedule`.
    """
    schedule = resolve_schedule(schedule, q.shape[2])
    if layout.n_global == 0 or schedule == "inline":
        return _flex(q, k, v, block_mask_for(layout, window, q.shape[2], doc_ids))
    if schedule == "split":
        band_mask = block_mask_for(layout, window, q.shape[2], doc_ids, band_only=True)
        docs = None if doc_ids is None else doc_ids[:, layout.perm]
        split = _compiled_split_attention() if q.device.type == "cuda" else split_attention
        return split(q, k, v, band_mask, layout.n_global, docs)
    G, L = layout.n_global, q.shape[2]
    block_mask, extended = _copies_block_mask(layout, window, doc_ids)
    n_copies = (extended - L) // G
    k_ext = torch.cat([k, k[:, :, :G].repeat(1, 1, n_copies, 1)], dim=2)
    v_ext = torch.cat([v, v[:, :, :G].repeat(1, 1, n_copies, 1)], dim=2)
    rest = _flex(q, k_ext, v_ext, block_mask)[:, :, G:]
    return torch.cat([_global_rows(q, k, v, layout, doc_ids), rest], dim=2)


def _global_rows(q, k, v, layout: Layout, doc_ids=None) -> torch.Tensor:
    """The G global query rows (permuted indices [0, G)) attend to every key of their document: one matmul."""
    G = layout.n_global
    scores = (q[:, :, :G] @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if doc_ids is not None:
        docs = doc_ids[:, layout.perm]
        scores = scores.masked_fill((docs[:, :G, None] != docs[:, None, :])[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def split_attention(q, k, v, band_mask, n_global: int, docs=None, kernel=None) -> torch.Tensor:
    """The ``split`` schedule on permuted q, k, v: the band kernel (``band_mask`` holds no global row or column)
    returns its output and log-sum-exp, then :func:`split_epilogue` adds the global keys and the global rows.
    ``docs``: (B, L) document ids in permuted order, or None."""
    out_b, lse_b = (kernel or _flex)(q, k, v, band_mask, return_lse=True)
    return split_epilogue(q, k, v, out_b, lse_b, n_global, docs)


def _flex_with_lse(q, k, v, block_mask, return_lse=True):
    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.flex_attention import flex_attention as raw_flex

    out, aux = raw_flex(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _split_attention_cuda(q, k, v, band_mask, n_global: int, docs=None) -> torch.Tensor:
    return split_attention(q, k, v, band_mask, n_global, docs, kernel=_flex_with_lse)


@functools.cache
def _compiled_split_attention():
    """Kernel and epilogue as one compiled region: one autograd node per head group, so that at 8k tokens the
    host's launch work does not outlast the GPU's (measured: separately compiled, 2.0 ms of host time for 0.4 ms
    of GPU time per group). The slices, pads, casts and exponentials of the epilogue fuse around its GEMMs."""
    _allow_recompiles()
    return torch.compile(_split_attention_cuda, dynamic=False)


def _chunked(x: torch.Tensor, chunk: int, value: float = 0.0) -> torch.Tensor:
    """(B, H, L, ...) -> (B, H, C, chunk, ...), padding L to a multiple of ``chunk`` with ``value``."""
    pad = -x.shape[2] % chunk
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad), value=value)
    return x.view(*x.shape[:2], -1, chunk, *x.shape[3:])


def split_epilogue(q, k, v, out_b, lse_b, n_global: int, docs=None, chunk: int = 256) -> torch.Tensor:
    """Merge the band output with the G global keys by log-sum-exp; compute the G global rows over all keys.

    For a query i with band output ``out_b`` (log-sum-exp ``lse_b``) and global keys j < G of its document:

        out_i = (e^{lse_b - m} · out_b + Σ_j e^{s_ij - m} v_j) / (e^{lse_b - m} + Σ_j e^{s_ij - m})

    with any m (the row maximum, detached: it cancels) — the algebra of split-K / flash-decoding. Every
    non-global query is in its own band, so lse_b is finite and a row whose global keys all lie in other
    documents gives them weight 0, not NaN. The global rows (permuted indices < G) attend to every key of their
    document and replace those rows.

    Why chunks: the products that reduce over the sequence — the global keys' and values' gradients (G × L by
    L × hd) and the global rows' softmax times values — are skinny matrices with a long inner dimension, which
    one GEMM tile walks end to end. Cut into chunks of ``chunk`` positions they become a batch of short GEMMs
    summed afterwards (split-K), which fills the GPU.
    """
    B, H, L, D = q.shape
    G, scale = n_global, D ** -0.5
    k_g, v_g = k[:, :, :G], v[:, :, :G]
    # every query against the global keys: (B, H, C, chunk, G)
    s = (_chunked(q, chunk) @ k_g.transpose(-1, -2)[:, :, None]).float() * scale
    if docs is not None:
        q_docs = _chunked(docs[:, None, :, None], chunk, value=-1)  # (B, 1, C, chunk, 1); padded rows: no document
        s = s.masked_fill(q_docs != docs[:, None, None, None, :G], float("-inf"))
    lse_b = _chunked(lse_b.float()[..., None], chunk)[..., 0]  # padded rows: 0, so every row's m is finite
    m = torch.maximum(lse_b, s.amax(-1)).detach()
    w_b = torch.exp(lse_b - m)
    w_g = torch.exp(s - m[..., None])
    num = w_b[..., None] * _chunked(out_b, chunk).float() + (w_g.to(v.dtype) @ v_g[:, :, None]).float()
    merged = (num / (w_b + w_g.sum(-1))[..., None]).to(out_b.dtype).flatten(2, 3)
    # the global query rows against every key: (B, H, C, G, chunk), one softmax over all chunks
    k_c, v_c = _chunked(k, chunk), _chunked(v, chunk)
    r = (q[:, :, None, :G] @ k_c.transpose(-1, -2)).float() * scale
    no_docs = torch.zeros(B, L, dtype=torch.long, device=q.device)
    key_docs = _chunked((no_docs if docs is None else docs)[:, None], chunk, value=-1)  # padded keys: no document
    row_docs = (no_docs if docs is None else docs)[:, :G]
    r = r.masked_fill(key_docs[:, :, :, None, :] != row_docs[:, None, None, :, None], float("-inf"))
    r = torch.exp(r - r.amax(dim=(2, 4), keepdim=True))
    rows = (r.to(v.dtype) @ v_c).float().sum(2) / r.sum(dim=(2, 4))[..., None]
    return torch.cat([rows.to(out_b.dtype), merged[:, :, G:L]], dim=2)


def _copies_block_mask(layout: Layout, window: int, doc_ids=None):
    from torch.nn.attention.flex_attention import create_block_mask

    device = layout.perm.device
    mod, extended = patterns.copies_mask_mod(layout, window, doc_ids=doc_ids)
    L = len(layout.perm)
    make = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    if doc_ids is not None:
        return make(mod, doc_ids.shape[0], None, L, extended, device=device), extended
    key = ("copies", L, window, layout.dilation, layout.n_global, tuple(layout.class_starts), str(device))
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = make(mod, None, None, L, extended, device=device)
    return _BLOCK_MASKS[key], extended


def _flex(q, k, v, block_mask, return_lse: bool = False):
    """FlexAttention: compiled on CUDA, eager (forward only, used to test the mask logic) on the CPU.

    ``return_lse``: also the natural-log log-sum-exp of every query row's scores (differentiable on CUDA)."""
    import warnings

    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    aux = AuxRequest(lse=True) if return_lse else None
    if q.device.type == "cuda":
        result = _compiled_flex()(q, k, v, block_mask=block_mask, return_aux=aux)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            result = eager_flex(q, k, v, block_mask=block_mask, return_aux=aux)
    return (result[0], result[1].lse) if return_lse else result


def block_density(block_mask) -> float:
    """Fraction of (query block, key block) tiles the kernel visits (partial and full tiles)."""
    counts = block_mask.kv_num_blocks.sum()
    if getattr(block_mask, "full_kv_num_blocks", None) is not None:
        counts = counts + block_mask.full_kv_num_blocks.sum()
    return float(counts) / block_mask.kv_indices.numel()


def run_group(backend: str, q, k, v, layout: Layout, window: int, is_global: torch.Tensor, doc_ids=None,
              global_schedule: str = "auto"):
    """One head group, original order in and out; permutes around the kernels that need it."""
    if backend == "dense":
        return dense_attention(q, k, v, window, layout.dilation, is_global, doc_ids)
    identity = layout.identity
    if not identity:
        q, k, v = (t.index_select(2, layout.perm) for t in (q, k, v))
    if backend == "flex":
        out = flex_attention(q, k, v, layout, window, doc_ids, global_schedule)
    elif backend == "banded":
        from sadiffuseq.attention.banded import banded_attention

        out = banded_attention(q, k, v, layout, window, doc_ids)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    return out if identity else out.index_select(2, layout.inv)
