"""Kernels that evaluate the sparse pattern. All take (B, H, L, hd) tensors in original token order.

* ``dense`` — one head group: SDPA with the pattern materialised as a boolean L×L mask, in original token order. O(L²): the
  reference every other backend is tested against, never the default.
* ``flex`` — FlexAttention on the permuted sequences (see :class:`~sadiffuseq.attention.patterns.Layout`) with
  a BlockMask that skips empty 128×128 tiles; every head of a layer in one call, whatever its dilation. Compiled
  once per (length, pattern) and BlockMasks cached with the layouts; with packed documents the mask depends on
  the batch and is rebuilt. The fast path on CUDA.
* ``banded`` — one head group: pure PyTorch on the permuted sequence, O(L·w) time and memory, differentiable by autograd: CPU
  training and tests (FlexAttention has no CPU backward, and its eager path materialises L×L scores).
* ``flash`` — every head of a layer: the band through FlashAttention-2's sliding-window kernels, the global tokens
  around them (:mod:`sadiffuseq.attention.flash`). CUDA, fp16/bf16 only; opt-in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sadiffuseq.attention import patterns
from sadiffuseq.attention.patterns import HeadLayouts, Layout

BACKENDS = ("flash", "flex", "banded", "dense")


def resolve_backend(name: str, device: torch.device, head_dim: int = 64) -> str:
    """auto: ``flex`` on CUDA (its fused kernel needs heads of width >= 16; narrower ones use banded), else
    ``banded``. ``flash`` is never picked automatically: measured on an H100 it is slower than ``flex`` at 8k, 32k
    and 128k tokens on the benchmark pattern (docs/benchmarks.md)."""
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


def block_mask_for(heads: HeadLayouts, length: int, docs=None, band_only: bool = False):
    """The BlockMask of every head on its permuted sequence (cached on ``heads`` unless documents make it
    batch-specific). ``docs``: (B, H, L) from :func:`patterns.permuted_docs`, or None. ``band_only``: the
    window/dilated band without the global rows and columns (``split``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if docs is None and band_only in heads.block_masks:
        return heads.block_masks[band_only]
    device = heads.pos.device
    mod = patterns.heads_mask_mod(heads, docs, with_globals=not band_only)
    make = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    # heads that share one pattern share one row of the mask (H=None broadcasts it over the heads)
    n_heads = None if len({id(lay) for lay in heads.layouts}) == 1 else len(heads.layouts)
    if docs is not None:
        return make(mod, docs.shape[0], n_heads, length, length, device=device)
    heads.block_masks[band_only] = make(mod, None, n_heads, length, length, device=device)
    return heads.block_masks[band_only]


GLOBAL_SCHEDULES = ("inline", "split")
# ``auto`` picks split from this length on, inline below. Measured on an H100 (16 heads × 64, window ±256, 8 heads
# dilated ×4, 16 globals, fwd+bwd bf16, all heads in one call): inline is faster at 8,192 tokens (1.40 vs 1.78 ms),
# split at 32,768 (3.11 vs 4.90 ms) and 131,072 (11.5 vs 19.2 ms). 16,384 was not measured.
SPLIT_FROM_LENGTH = 16384


def resolve_schedule(schedule: str, length: int) -> str:
    """``auto`` -> ``split`` for sequences of at least ``SPLIT_FROM_LENGTH`` tokens, else ``inline``."""
    if schedule == "auto":
        return "split" if length >= SPLIT_FROM_LENGTH else "inline"
    if schedule not in GLOBAL_SCHEDULES:
        raise ValueError(f"unknown global-token schedule {schedule!r}; choose from auto, {', '.join(GLOBAL_SCHEDULES)}")
    return schedule


def resolve_compile_mode(mode: str, length: int) -> str:
    """``auto`` -> ``max-autotune-no-cudagraphs`` from ``SPLIT_FROM_LENGTH`` tokens on, ``default`` below.

    Measured on an H100 (bench attention, fwd+bwd bf16, split schedule): autotuning takes 32,768 tokens from 3.11
    to 2.64 ms and 131,072 from 11.50 to 9.56 ms, and a base-size training step at 32k from 95.2 to 87.5 ms; the
    search costs a few minutes once per length (Inductor caches its choices), which long-sequence training
    amortises and short runs need not pay."""
    if mode == "auto":
        return "max-autotune-no-cudagraphs" if length >= SPLIT_FROM_LENGTH else "default"
    return mode


def flex_attention(q, k, v, heads: HeadLayouts, doc_ids=None, schedule: str = "auto",
                   compile_mode: str = "auto") -> torch.Tensor:
    """Every head of a layer, (B, H, L, hd) in original token order in and out: each head's tokens are put in its
    own order (:class:`~sadiffuseq.attention.patterns.HeadLayouts`), one FlexAttention call covers all heads, and
    the output goes back to the original order — on CUDA all of it one compiled region, so the host launches a
    handful of kernels per layer rather than one per operation and head group.

    ``schedule`` changes how the global tokens are scheduled, not what is computed:

    * ``inline``: the global rows and columns are part of the BlockMask. The global query row makes one tile row
      span every key block and the global key column one tile column span every query block, so in forward and
      backward a few thread blocks walk the whole sequence while the rest visit a handful of tiles (measured on an
      H100 at 32k tokens: 2.66 ms fwd+bwd for 8 heads vs 0.95 ms for the window alone).
    * ``split``: the kernel sees the band only (no global rows, no global columns) and returns its log-sum-exp;
      the G global keys are a (L × G) matmul and the two partial softmaxes are merged exactly by their
      log-sum-exps (the same algebra as split-K / flash-decoding); the global rows are a (G × L) matmul.
      No tile walks the sequence.
    * ``auto``: see :func:`resolve_schedule`.

    ``compile_mode``: the ``torch.compile`` mode of the region on CUDA (``model.flex_compile``, see
    :func:`resolve_compile_mode`).
    """
    return run_flex_plan(q, k, v, flex_plan(heads, q.shape[2], doc_ids, schedule, compile_mode))


@dataclass(frozen=True)
class FlexPlan:
    """Everything :func:`flex_attention` decides in Python before its compiled part: the per-head token orders,
    the BlockMask, how the global tokens are scheduled and with which ``torch.compile`` mode the region runs.

    A model makes one plan per attention pattern before its blocks run (``Denoiser.forward``), so a compiled block
    can trace the attention into its own graph (:func:`_all_heads`, when ``in_block_graph``) instead of leaving
    its graph, running Python and entering the attention's region: at 8k tokens the host time of those
    transitions exceeded the GPU time of the whole layer."""

    perm: torch.Tensor | None
    inv: torch.Tensor | None
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    n_global: int  # > 0: the split schedule with that many global tokens; 0: inline (globals in the BlockMask)
    docs: torch.Tensor | None  # (B, H, L) permuted document ids for the split epilogue, or None
    compile_mode: str  # resolved: the mode of the region when it runs as its own compiled region
    in_block_graph: bool  # a compiled block may trace it into its graph (its mode is the blocks' default)

    def args(self) -> tuple:
        return self.perm, self.inv, self.block_mask, self.n_global, self.docs


def flex_plan(heads: HeadLayouts, length: int, doc_ids=None, schedule: str = "auto",
              compile_mode: str = "auto") -> FlexPlan:
    """The :class:`FlexPlan` of a layer with head layouts ``heads`` on ``length`` tokens (``doc_ids``: (B, L) or
    None)."""
    split = resolve_schedule(schedule, length) == "split" and heads.n_global > 0
    docs = None if doc_ids is None else patterns.permuted_docs(heads, doc_ids)
    block_mask = block_mask_for(heads, length, docs, band_only=split)
    mode = resolve_compile_mode(compile_mode, length)
    return FlexPlan(heads.perm, heads.inv, block_mask, heads.n_global if split else 0, docs if split else None,
                    mode, mode == "default")


def run_flex_plan(q, k, v, plan: FlexPlan) -> torch.Tensor:
    """The compiled part of :func:`flex_attention`: traced into the caller's graph when the caller is being
    compiled and the plan allows it, else its own compiled region on CUDA (eager on the CPU)."""
    if torch.compiler.is_compiling() and plan.in_block_graph:
        return _all_heads(q, k, v, *plan.args())
    run = _compiled_all_heads(plan.compile_mode) if q.device.type == "cuda" else _all_heads
    return run(q, k, v, *plan.args())


def _all_heads(q, k, v, perm, inv, block_mask, n_global: int, docs=None):
    """:func:`flex_attention` after its Python-side decisions: the part that is compiled."""
    if perm is not None:
        q, k, v = (_PermuteTokens.apply(t, perm, inv) for t in (q, k, v))
    if n_global:
        out = split_attention(q, k, v, block_mask, n_global, docs)
    else:
        out = _flex(q, k, v, block_mask)
    return out if perm is None else _PermuteTokens.apply(out, inv, perm)


@functools.cache
def _compiled_all_heads(mode: str = "default"):
    _allow_recompiles()
    return torch.compile(_all_heads, dynamic=False, **({} if mode == "default" else {"mode": mode}))


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd), index (H, L): out[b, h, i] = x[b, h, index[h, i]]."""
    B, H, L, D = x.shape
    return x.gather(2, index[None, :, :, None].expand(B, H, L, D))


class _PermuteTokens(torch.autograd.Function):
    """Reorder each head's tokens. The gradient of a permutation is the inverse permutation: a gather, where
    autograd's generic rule for ``gather`` would be a scatter-add (atomics) over the whole sequence."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return _gather_tokens(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_tokens(grad, inverse), None, None


def split_attention(q, k, v, band_mask, n_global: int, docs=None) -> torch.Tensor:
    """The ``split`` schedule on permuted q, k, v: the band kernel (``band_mask`` holds no global row or column)
    returns its output and log-sum-exp, then :func:`split_epilogue` adds the global keys and the global rows.
    ``docs``: (B, H, L) document ids in each head's permuted order, or None."""
    out_b, lse_b = _flex(q, k, v, band_mask, return_lse=True)
    return split_epilogue(q, k, v, out_b, lse_b, n_global, docs)


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
    if docs is not None and docs.dim() == 2:
        docs = docs[:, None]  # the same order for every head
    k_g, v_g = k[:, :, :G], v[:, :, :G]
    # every query against the global keys: (B, H, C, chunk, G)
    s = (_chunked(q, chunk) @ k_g.transpose(-1, -2)[:, :, None]).float() * scale
    if docs is not None:
        q_docs = _chunked(docs[..., None], chunk, value=-1)  # (B, H|1, C, chunk, 1); padded rows: no document
        s = s.masked_fill(q_docs != docs[:, :, None, None, :G], float("-inf"))
    lse_b = _chunked(lse_b.float()[..., None], chunk)[..., 0]  # padded rows: 0, so every row's m is finite
    m = torch.maximum(lse_b, s.amax(-1)).detach()
    w_b = torch.exp(lse_b - m)
    w_g = torch.exp(s - m[..., None])
    num = w_b[..., None] * _chunked(out_b, chunk).float() + (w_g.to(v.dtype) @ v_g[:, :, None]).float()
    merged = (num / (w_b + w_g.sum(-1))[..., None]).to(out_b.dtype).flatten(2, 3)
    # the global query rows against every key: (B, H, C, G, chunk), one softmax over all chunks
    k_c, v_c = _chunked(k, chunk), _chunked(v, chunk)
    r = (q[:, :, None, :G] @ k_c.transpose(-1, -2)).float() * scale
    all_docs = torch.zeros(B, 1, L, dtype=torch.long, device=q.device) if docs is None else docs
    key_docs = _chunked(all_docs, chunk, value=-1)  # (B, H|1, C, chunk); padded keys: no document
    row_docs = all_docs[:, :, :G]
    r = r.masked_fill(key_docs[:, :, :, None, :] != row_docs[:, :, None, :, None], float("-inf"))
    r = torch.exp(r - r.amax(dim=(2, 4), keepdim=True))
    rows = (r.to(v.dtype) @ v_c).float().sum(2) / r.sum(dim=(2, 4))[..., None]
    return torch.cat([rows.to(out_b.dtype), merged[:, :, G:L]], dim=2)


def _flex(q, k, v, block_mask, return_lse: bool = False):
    """FlexAttention: compiled on CUDA, eager (forward only, used to test the mask logic) on the CPU.

    ``return_lse``: also the natural-log log-sum-exp of every query row's scores (differentiable on CUDA)."""
    import warnings

    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    aux = AuxRequest(lse=True) if return_lse else None
    if torch.compiler.is_compiling():  # inside a compiled region (``_all_heads``): traced into it
        result = eager_flex(q, k, v, block_mask=block_mask, return_aux=aux)
    elif q.device.type == "cuda":
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


def run_group(backend: str, q, k, v, layout: Layout, window: int, is_global: torch.Tensor, doc_ids=None):
    """One head group with the ``dense`` or ``banded`` backend, original order in and out; permutes around the
    kernels that need it. (``flex`` runs every head of a layer at once: :func:`flex_attention`.)"""
    if backend == "dense":
        return dense_attention(q, k, v, window, layout.dilation, is_global, doc_ids)
    identity = layout.identity
    if not identity:
        q, k, v = (t.index_select(2, layout.perm) for t in (q, k, v))
    if backend == "banded":
        from sadiffuseq.attention.banded import banded_attention

        out = banded_attention(q, k, v, layout, window, doc_ids)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    return out if identity else out.index_select(2, layout.inv)
