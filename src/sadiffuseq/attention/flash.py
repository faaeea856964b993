"""The ``flash`` backend: the band through FlashAttention-2's sliding window, the global tokens around it.

A window of half-width w is what FlashAttention-2 calls a local window (``window_size = (w, w)``): its kernels
skip the tiles outside the band, in forward and backward, and PyTorch ships them (``aten._flash_attention_forward``
and ``_backward``, the kernels behind ``F.scaled_dot_product_attention``'s flash path). So the sparse pattern is
three pieces:

* **the band** of every head, one kernel call per group of heads of equal dilation. A dilated head is an
  ordinary window over each residue class mod d: with one row, no packed documents and d dividing L, the classes
  are a *strided view* of the tokens — (L, H, hd) seen as (d, L/d, H, hd), batch = class — and the kernel reads
  them in place (no permutation copy); otherwise the tokens are gathered class by class and every (row, class,
  document) run is a sequence of FlashAttention's variable-length mode. Undilated heads with packed documents
  use the variable-length mode over the documents directly.
* **the global keys**: the G global tokens as keys of every query, an (L × G) product merged with the band by
  log-sum-exp (split-K algebra). A global key inside a query's own band is already counted by the band, so the
  product leaves out exactly those pairs.
* **the global rows**: the G global queries attend to every key of their document, a (G × L) softmax that
  replaces those rows.

The backward of the band uses the kernel's own backward with the *merged* output and log-sum-exp — the rule
ring attention uses for its blocks: FlashAttention's backward recomputes P = exp(S − lse) and
dS = P ∘ (dP − rowsum(dO ∘ O)); given the final O and lse those are the final attention probabilities and the
exact gradient of each band entry, so no gradient has to flow through the partial log-sum-exps.

The rows of the global tokens get no gradient through the band or the global keys: the backward hands the kernels
a log-sum-exp of +inf on those rows, so every probability there is exp(s − inf) = 0 (no copy of dO with rows zeroed).

Band kernels (``model.flash_kernel``): ``fa2`` (CUDA, fp16/bf16, head width a multiple of 8 up to 256), ``cudnn``
(cuDNN's causal band made two-sided, :mod:`sadiffuseq.attention.cudnn_band`; needs NVIDIA's cudnn frontend;
one operator for the band of every head) and ``reference``, FlashAttention's contract in plain PyTorch (fp32,
O(L²) per sequence) so that the CPU tests check everything here except the CUDA kernels.

On CUDA the global tokens run as Triton kernels (:mod:`sadiffuseq.attention.globals_triton`: one pass over the
sequence per piece) where they apply (no packed documents); elsewhere as the PyTorch code below.

Where it stands (H100, docs/benchmarks.md): with cuDNN's band and the Triton globals the GPU work of a forward +
backward is 0.61 ms at 8k tokens and 1.72 ms at 32k (FlexAttention's best: 0.87 and 2.8); per call, the bodies
compiled with ``reduce-overhead`` (CUDA-graph replays) take 1.0 and 2.4 ms, with the default mode the cuDNN calls'
host time shows (3.7 and 3.0 ms). In a whole compiled model step ``flex`` is faster and stays the default backend;
``flash`` is opt-in (``model.attention_backend: flash``) and exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sadiffuseq.attention import cudnn_band, patterns

# ---------------------------------------------------------------------------------------------------------
# the band kernels: (q, k, v) in FlashAttention's layout — (B, L, H, hd), or (total, H, hd) with cumulative
# sequence starts ``cu`` (int32, S + 1) — and a window w; out, lse ((B, H, L) or (H, total), fp32) and a state
# the backward gets back.


def _fa2_forward(q, k, v, cu, max_len: int, w: int, scale: float):
    # variable-length mode: the log-sum-exp is (H, total), unpadded (checked on PyTorch 2.11's CUDA kernels)
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, False, False, scale=scale, window_size_left=w, window_size_right=w)
    return out, lse, (rng, unused)


def _fa2_backward(dout, q, k, v, out, lse, cu, max_len: int, w: int, scale: float, state):
    rng, unused = state
    return torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, False, rng, unused, scale=scale,
        window_size_left=w, window_size_right=w)


def _sequences(x, cu):
    """The sequences of a kernel input: (B, L, H, hd) -> its B rows; (total, H, hd) + cu -> the runs."""
    if cu is None:
        return list(x.unbind(0))
    starts = cu.tolist()
    return [x[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _band(n: int, w: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= w


def _reference_forward(q, k, v, cu, max_len: int, w: int, scale: float):
    outs, lses = [], []
    for qs, ks, vs in zip(_sequences(q, cu), _sequences(k, cu), _sequences(v, cu)):
        s = torch.einsum("ihd,jhd->hij", qs.float(), ks.float()) * scale
        s = s.masked_fill(~_band(qs.shape[0], w, q.device), float("-inf"))
        lse = s.logsumexp(-1)
        outs.append(torch.einsum("hij,jhd->ihd", torch.exp(s - lse[..., None]), vs.float()).to(q.dtype))
        lses.append(lse)
    if cu is None:
        return torch.stack(outs), torch.stack(lses), None
    return torch.cat(outs), torch.cat(lses, dim=1), None


def _reference_backward(dout, q, k, v, out, lse, cu, max_len: int, w: int, scale: float, state):
    """FlashAttention's backward in plain PyTorch, with the given (merged) ``out`` and ``lse``."""
    lse_seqs = list(lse.unbind(0)) if cu is None else [lse[:, a:b] for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:])]
    grads = []
    for do, qs, ks, vs, os_, ls in zip(_sequences(dout, cu), _sequences(q, cu), _sequences(k, cu),
                                       _sequences(v, cu), _sequences(out, cu), lse_seqs):
        do, qs, ks, vs, os_ = (t.float() for t in (do, qs, ks, vs, os_))
        s = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        p = torch.exp(s - ls[..., None]).masked_fill(~_band(qs.shape[0], w, q.device), 0.0)
        dp = torch.einsum("ihd,jhd->hij", do, vs)
        ds = p * (dp - (do * os_).sum(-1).t()[..., None])
        grads.append((torch.einsum("hij,jhd->ihd", ds, ks) * scale, torch.einsum("hij,ihd->jhd", ds, qs) * scale,
                      torch.einsum("hij,ihd->jhd", p, do)))
    join = torch.stack if cu is None else torch.cat
    return tuple(join([g[i] for g in grads]).to(q.dtype) for i in range(3))


KERNELS = {"fa2": (_fa2_forward, _fa2_backward), "reference": (_reference_forward, _reference_backward)}
# ``cudnn`` (attention/cudnn_band.py) is one operator for the band of every head of a layer, used where every group
# is a plain row or a strided class view over a contiguous range of heads; other groups (variable-length runs)
# take FlashAttention-2 on CUDA, the reference elsewhere.


def kernel_supports(device: torch.device, dtype: torch.dtype, head_dim: int, kernel: str = "fa2") -> bool:
    """Whether ``kernel`` runs these inputs: ``fa2`` — CUDA, fp16/bf16, head width a multiple of 8 up to 256;
    ``cudnn`` — the same with the cuDNN frontend installed, head width up to 128; ``reference`` — anything."""
    if kernel == "reference":
        return True
    if kernel == "cudnn":
        return cudnn_band.supports(device, dtype, head_dim)
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256)


CUDNN_FROM = 65536  # ``auto`` picks cuDNN's band from this many tokens per row (H100: faster at 128k, slower at 32k)


def resolve_kernel(name: str, device: torch.device, length: int) -> str:
    """``auto`` -> ``cudnn`` on CUDA from :data:`CUDNN_FROM` tokens when the cuDNN frontend is installed, else
    ``fa2``. Below that the cuDNN path's host time (eight frontend calls per layer and step) outweighs its faster
    kernels (docs/benchmarks.md)."""
    if name != "auto":
        return name
    use = torch.device(device).type == "cuda" and cudnn_band.available() and length >= CUDNN_FROM
    return "cudnn" if use else "fa2"


# ---------------------------------------------------------------------------------------------------------
# the plan: what is decided in Python before the kernels run


@dataclass(frozen=True, eq=False)
class BandGroup:
    """The heads of one dilation and how their tokens reach the kernel.

    ``mode``: ``"rows"`` — (B, L, h, hd) as is; ``"classes"`` — the strided view (d, L/d, h, hd) of a single row;
    ``"runs"`` — tokens gathered by ``order`` (L,) (None: original order) and flattened to (B·L, h, hd), every
    run between consecutive ``cu`` entries one sequence of the variable-length kernel."""

    heads: tuple[int, ...]
    dilation: int
    mode: str
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    cu: torch.Tensor | None = None
    max_len: int = 0


@dataclass(frozen=True, eq=False)
class FlashPlan:
    """Everything the ``flash`` backend decides before its kernels run, for one (length, pattern, documents)."""

    groups: tuple[BandGroup, ...]
    window: int
    kernel: str
    global_pos: torch.Tensor | None  # (G,) original positions of the global tokens, or None
    skip: torch.Tensor | None  # (B|1, H, L, G) bool: the global key is in the query's band or another document
    doc_ids: torch.Tensor | None  # (B, L) for the global rows, or None
    device_type: str = "cpu"
    head_dilations: torch.Tensor | None = None  # (H,) int32: each head's dilation (the Triton global kernels)


def _runs(doc_ids: torch.Tensor | None, B: int, L: int, order: torch.Tensor | None, dilation: int) -> tuple:
    """Cumulative starts of the (row, class, document) runs of tokens laid out by ``order`` (host tensors)."""
    pos = torch.arange(L) if order is None else order
    key = pos % dilation
    docs = None if doc_ids is None else doc_ids[:, pos]
    starts = []
    for b in range(B):
        change = torch.ones(L, dtype=torch.bool)
        change[1:] = key[1:] != key[:-1]
        if docs is not None:
            change[1:] |= docs[b, 1:] != docs[b, :-1]
        starts.extend((b * L + change.nonzero().squeeze(1)).tolist())
    starts.append(B * L)
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    return starts, max(lengths)


def make_plan(dilations: tuple[int, ...], window: int, length: int, batch: int, device: torch.device,
              global_first: int = 16, global_every: int = 0, doc_ids: torch.Tensor | None = None,
              kernel: str = "fa2") -> FlashPlan:
    """The plan for heads of the given dilations (one per head) on ``batch`` rows of ``length`` tokens.

    With packed documents (``doc_ids`` (B, L)) the runs are found on the host: one device-to-host copy per plan,
    and a model makes one plan per forward for all its layers."""
    L, B = length, batch
    docs_host = None if doc_ids is None else doc_ids.cpu()
    groups = []
    for d in sorted(set(dilations)):
        heads = tuple(h for h, dh in enumerate(dilations) if dh == d)
        if doc_ids is None and (d == 1 or (B == 1 and L % d == 0)):
            groups.append(BandGroup(heads, d, "rows" if d == 1 else "classes"))
            continue
        order = None
        if d > 1:  # residue classes in turn, each in its original order
            pos = torch.arange(L)
            order = torch.cat([pos[r::d] for r in range(d)])
        starts, max_len = _runs(docs_host, B, L, order, d)
        cu = torch.tensor(starts, dtype=torch.int32).to(device)
        order = None if order is None else order.to(device)
        inverse = None if order is None else order.argsort()
        groups.append(BandGroup(heads, d, "runs", order, inverse, cu, max_len))
    is_global = patterns.global_positions(L, global_first, global_every, device=device)
    global_pos = skip = None
    if bool(is_global.any()):
        global_pos = is_global.nonzero().squeeze(1)
        i = torch.arange(L, device=device)[:, None]
        offset = i - global_pos[None, :]  # (L, G)
        dil = torch.tensor(dilations, device=device)[:, None, None]
        in_band = (offset % dil == 0) & (offset.abs() <= window * dil)  # (H, L, G)
        skip = in_band[None]
        if doc_ids is not None:
            skip = skip | (doc_ids[:, None, :, None] != doc_ids[:, None, global_pos][:, :, None, :])
    return FlashPlan(tuple(groups), window, kernel, global_pos, skip, doc_ids, torch.device(device).type,
                     torch.tensor(dilations, dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=64)
def _cached_plan(dilations, window, length, batch, device_str, global_first, global_every, kernel) -> FlashPlan:
    return make_plan(dilations, window, length, batch, torch.device(device_str), global_first, global_every, None,
                     kernel)


def plan_for(dilations: tuple[int, ...], window: int, length: int, batch: int, device: torch.device,
             global_first: int = 16, global_every: int = 0, doc_ids: torch.Tensor | None = None,
             kernel: str = "fa2") -> FlashPlan:
    """:func:`make_plan`, cached per (pattern, length, batch) when no documents are packed."""
    if doc_ids is not None:
        return make_plan(tuple(dilations), window, length, batch, device, global_first, global_every, doc_ids,
                         kernel)
    return _cached_plan(tuple(dilations), window, length, batch, str(device), global_first, global_every, kernel)


# ---------------------------------------------------------------------------------------------------------
# token layouts of one group: (B, L, h, hd) <-> the kernel's layout. ``mode``, ``d``: the group's; ``order`` and
# ``inverse``: its gather (runs mode) or None.


def _to_kernel(x: torch.Tensor, mode: str, d: int, order) -> torch.Tensor:
    B, L, h, D = x.shape
    if mode == "rows":
        return x
    if mode == "classes":
        return patterns.class_view(x, d)
    if order is not None:
        x = x.index_select(1, order)
    return x.reshape(B * L, h, D)


def _from_kernel(y: torch.Tensor, mode: str, inverse, B: int, L: int) -> torch.Tensor:
    if mode == "rows":
        return y
    if mode == "classes":
        return y.transpose(0, 1).reshape(1, L, *y.shape[2:])
    y = y.view(B, L, *y.shape[1:])
    return y if inverse is None else y.index_select(1, inverse)


def _lse_from_kernel(lse: torch.Tensor, mode: str, inverse, B: int, L: int) -> torch.Tensor:
    """The kernel's log-sum-exp -> (B, h, L) in original order."""
    if mode == "rows":
        return lse
    if mode == "classes":  # (d, h, L/d) -> (1, h, L)
        return lse.permute(1, 2, 0).reshape(1, lse.shape[1], L)
    lse = lse.view(lse.shape[0], B, L).transpose(0, 1)  # (h, B·L) -> (B, h, L)
    return lse if inverse is None else lse.index_select(2, inverse)


def _lse_to_kernel(lse: torch.Tensor, mode: str, d: int, order) -> torch.Tensor:
    B, h, L = lse.shape
    if mode == "rows":
        return lse.contiguous()
    if mode == "classes":
        return patterns.class_lse(lse, d).contiguous()
    if order is not None:
        lse = lse.index_select(2, order)
    return lse.transpose(0, 1).reshape(h, B * L).contiguous()


def _heads(x: torch.Tensor, heads: tuple[int, ...], dim: int = 2) -> torch.Tensor:
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return x.narrow(dim, heads[0], len(heads))
    return x.index_select(dim, torch.tensor(heads, device=x.device))


def _split_plan(plan: FlashPlan) -> tuple[tuple, tuple]:
    """The plan as (static, tensors): the Python constants a compiled body specialises on, and the tensors it
    takes as inputs (so a new batch of packed documents is new inputs, not a recompilation)."""
    static = tuple((g.heads, g.dilation, g.mode, g.max_len) for g in plan.groups)
    tensors = tuple((g.order, g.inverse, g.cu) for g in plan.groups)
    kernel = plan.kernel
    if kernel == "cudnn":
        spec = _cudnn_spec(plan.groups)
        kernel = ("cudnn", spec) if spec is not None else ("fa2" if plan.device_type == "cuda" else "reference")
    return ((plan.window, kernel, static, plan.global_pos is not None, plan.doc_ids is not None),
            (tensors, plan.global_pos, plan.skip, plan.doc_ids, plan.head_dilations))


def _cudnn_spec(groups: tuple[BandGroup, ...]) -> tuple[int, ...] | None:
    """(first head, count, dilation) triples for the cuDNN operator, or None where a group is not a plain row or a
    class view over a contiguous range of heads."""
    spec = []
    for g in groups:
        if g.mode == "runs" or g.heads != tuple(range(g.heads[0], g.heads[0] + len(g.heads))):
            return None
        spec += [g.heads[0], len(g.heads), g.dilation]
    return tuple(spec)


def _assemble(parts, groups, dim: int):
    """The groups' parts -> all heads in their original order along ``dim``."""
    joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    order = [h for heads, *_ in groups for h in heads]
    if order == sorted(order):
        return joined
    return joined.index_select(dim, torch.tensor(order, device=joined.device).argsort())


# ---------------------------------------------------------------------------------------------------------
# the whole pattern as one autograd node. The bodies are plain functions of tensors and constants, compiled on
# CUDA — one graph each way, in which the layout copies, the log-sum-exp merge and the global products fuse
# around the FlashAttention calls, and the gradients of the three pieces are summed without extra passes — and
# eager elsewhere.

CHUNK = 256  # positions per chunk of the products that reduce over the whole sequence (split-K)


def _chunks(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, hd) -> (B, H, n, CHUNK, hd), L padded with zeros to a multiple of CHUNK."""
    B, L, H, D = x.shape
    x = x.transpose(1, 2)
    pad = -L % CHUNK
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, H, -1, CHUNK, D)


def _global_key_scores(q, k_g, skip, scale):
    """(B, L, H, hd) queries against (B, G, H, hd) global keys -> (B, H, L, G) fp32 scores, skipped pairs -inf."""
    s = torch.einsum("blhd,bghd->bhlg", q, k_g).float() * scale
    return s.masked_fill(skip, float("-inf"))


def _global_row_scores(q_g, k, global_pos, doc_ids, scale):
    """(B, G, H, hd) global queries against every key -> (B, H, G, L) fp32 scores, other documents -inf."""
    s = torch.einsum("bghd,blhd->bhgl", q_g, k).float() * scale
    if doc_ids is not None:
        s = s.masked_fill(doc_ids[:, None, None, :] != doc_ids[:, global_pos][:, None, :, None], float("-inf"))
    return s


def _over_globals(weights, x):
    """Σ_g weights[b, h, l, g] · x[b, g, h, :] -> (B, L, H, hd) fp32: an (L × G) by (G × hd) matmul per head.
    (Written as a broadcast product summed over G instead, the compiler made it a reduction kernel ~20× slower
    on an H100 at 32k tokens.)"""
    return torch.einsum("bhlg,bghd->blhd", weights.to(x.dtype), x).float()


def _over_sequence(weights, x):
    """Σ_l weights[b, h, g, l] · x[b, l, h, :] -> (B, H, G, hd) fp32, as matmuls over chunks of CHUNK positions
    summed afterwards (split-K: the output is a few tiles, the inner dimension the whole sequence)."""
    return (_chunks(weights.transpose(-1, -2).transpose(1, 2)).transpose(-1, -2) @ _chunks(x)).float().sum(2)


def _global_slots(global_pos, L: int) -> torch.Tensor:
    """(L,) each position's index among the G global tokens, G where it is not one."""
    G = global_pos.shape[0]
    return torch.full((L,), G, dtype=torch.long, device=global_pos.device).index_copy(
        0, global_pos, torch.arange(G, device=global_pos.device))


def _scatter_rows(rows, slot):
    """(B, H, G, hd) values of the global rows -> (B, L, H, hd), zero elsewhere, as a gather through ``slot``
    (L,) (the row's index among the globals, G elsewhere) that the compiler fuses into its consumer."""
    padded = F.pad(rows, (0, 0, 0, 1))  # slot G reads zeros
    return padded[:, :, slot].transpose(1, 2)


def _band_forward(static, q, k, v, group_tensors):
    """The band of every head -> out (B, L, H, hd), lse (B, H, L) fp32, the kernels' states."""
    window, kernel, groups = static[:3]
    B, L, H, D = q.shape
    scale = D ** -0.5
    if isinstance(kernel, tuple):  # ("cudnn", spec): one operator for every head
        out, lse = torch.ops.sadiffuseq.cudnn_band_forward(q, k, v, window, scale, list(kernel[1]))
        return out, lse, []
    forward_kernel = KERNELS[kernel][0]
    outs, lses, states = [], [], []
    for (heads, d, mode, max_len), (order, inverse, cu) in zip(groups, group_tensors):
        qg, kg, vg = (_to_kernel(_heads(t, heads), mode, d, order) for t in (q, k, v))
        o, s, state = forward_kernel(qg, kg, vg, cu, max_len or qg.shape[1], window, scale)
        outs.append(_from_kernel(o, mode, inverse, B, L))
        lses.append(_lse_from_kernel(s, mode, inverse, B, L))
        states.append(state)
    return _assemble(outs, groups, dim=2), _assemble(lses, groups, dim=1), states


def _band_backward(static, dout, q, k, v, out, lse, states, group_tensors):
    window, kernel, groups = static[:3]
    B, L, H, D = q.shape
    scale = D ** -0.5
    if isinstance(kernel, tuple):
        return torch.ops.sadiffuseq.cudnn_band_backward(dout, q, k, v, out, lse, window, scale, list(kernel[1]))
    backward_kernel = KERNELS[kernel][1]
    grads = [], [], []
    for (heads, d, mode, max_len), (order, inverse, cu), state in zip(groups, group_tensors, states):
        args = [_to_kernel(_heads(t, heads), mode, d, order) for t in (dout, q, k, v, out)]
        parts = backward_kernel(*args, _lse_to_kernel(_heads(lse, heads, dim=1), mode, d, order), cu,
                                max_len or args[1].shape[1], window, scale, state)
        for full, part in zip(grads, parts):
            full.append(_from_kernel(part, mode, inverse, B, L))
    return tuple(_assemble(g, groups, dim=2) for g in grads)


def _triton_globals(q, global_pos, doc_ids) -> bool:
    """Whether the global tokens go through the Triton kernels (:mod:`sadiffuseq.attention.globals_triton`)."""
    from sadiffuseq.attention import globals_triton

    return TRITON_GLOBALS and globals_triton.supports(q, global_pos.shape[0], doc_ids is not None)


TRITON_GLOBALS = True  # the global tokens through Triton where it runs them (tests switch it to compare)


def _forward_body(static, q, k, v, tensors):
    has_globals = static[3]
    group_tensors, global_pos, skip, doc_ids, dilations = tensors
    B, L, H, D = q.shape
    scale = D ** -0.5
    out, lse, states = _band_forward(static, q, k, v, group_tensors)
    if not has_globals:
        return out, lse, states
    if _triton_globals(q, global_pos, doc_ids):
        from sadiffuseq.attention import globals_triton

        gpos = global_pos.int()
        out, lse = globals_triton.merge_global_keys(q, k, v, out, lse, gpos, dilations, static[0], scale)
        rows, row_lse = globals_triton.global_rows(q, k, v, gpos, scale)  # (B, H, G, hd), (B, H, G)
        globals_triton.write_rows(out, rows, gpos)
        lse = lse.index_copy(2, global_pos, row_lse)
        return out, lse, states
    slot = _global_slots(global_pos, L)
    is_global = slot < global_pos.shape[0]
    # the global keys, merged with the band by log-sum-exp
    k_g, v_g = k[:, global_pos], v[:, global_pos]
    s = _global_key_scores(q, k_g, skip, scale)  # (B, H, L, G)
    merged = torch.logaddexp(lse, s.logsumexp(-1))
    band_weight = torch.exp(lse - merged).transpose(1, 2)[..., None]  # (B, L, H, 1)
    out = out * band_weight + _over_globals(torch.exp(s - merged[..., None]), v_g)
    # the global rows: every key of their document, one softmax over the whole sequence
    r = _global_row_scores(q[:, global_pos], k, global_pos, doc_ids, scale)  # (B, H, G, L)
    row_lse = r.logsumexp(-1)  # (B, H, G)
    rows = _over_sequence(torch.exp(r - row_lse[..., None]).to(v.dtype), v)  # (B, H, G, hd)
    out = torch.where(is_global[:, None, None], _scatter_rows(rows, slot), out).to(q.dtype)
    lse = torch.where(is_global, F.pad(row_lse, (0, 1))[..., slot], merged)
    return out, lse, states


def _backward_body(static, dout, q, k, v, out, lse, states, tensors):
    has_globals = static[3]
    group_tensors, global_pos, skip, doc_ids, dilations = tensors
    B, L, H, D = q.shape
    scale = D ** -0.5
    if not isinstance(static[1], tuple):  # FlashAttention-2 wants a contiguous dO; cuDNN's graphs take its strides
        dout = dout.contiguous()
    if not has_globals:
        dq, dk, dv = _band_backward(static, dout, q, k, v, out, lse, states, group_tensors)
        return _like(q, dq), _like(k, dk), _like(v, dv)
    # The global rows' outputs came from their own softmax: with their log-sum-exp set to +inf, the band and the
    # global keys see probabilities exp(s − inf) = 0 there, so those rows send and receive no gradient through
    # them (no copy of dout with those rows zeroed).
    lse_rest = lse.index_fill(2, global_pos, float("inf"))
    dq, dk, dv = _band_backward(static, dout, q, k, v, out, lse_rest, states, group_tensors)
    if _triton_globals(q, global_pos, doc_ids):
        from sadiffuseq.attention import globals_triton

        return globals_triton.global_backward(dout, q, k, v, out, lse_rest, lse[:, :, global_pos], dq, dk, dv,
                                              global_pos.int(), dilations, static[0], scale)
    slot = _global_slots(global_pos, L)
    # the global keys: dS = P ∘ (dP − rowsum(dO ∘ O)) with the merged probabilities
    k_g, v_g = k[:, global_pos], v[:, global_pos]
    p = torch.exp(_global_key_scores(q, k_g, skip, scale) - lse_rest[..., None])  # (B, H, L, G)
    row_dot = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (B, H, L)
    ds = p * (torch.einsum("blhd,bghd->bhlg", dout, v_g).float() - row_dot[..., None])
    dk_g = _over_sequence(ds.transpose(-1, -2).to(q.dtype), q) * scale  # (B, H, G, hd)
    dv_g = _over_sequence(p.transpose(-1, -2).to(q.dtype), dout)
    # the global rows against every key
    q_g, do_g, o_g = q[:, global_pos], dout[:, global_pos], out[:, global_pos]  # (B, G, H, hd)
    pr = torch.exp(_global_row_scores(q_g, k, global_pos, doc_ids, scale)
                   - lse[:, :, global_pos][..., None])  # (B, H, G, L)
    dpr = torch.einsum("bghd,blhd->bhgl", do_g, v).float()
    dsr = pr * (dpr - (do_g.float() * o_g.float()).sum(-1).transpose(1, 2)[..., None])  # (B, H, G, L)
    dq_g = _over_sequence(dsr.to(q.dtype), k) * scale  # (B, H, G, hd)
    # every gradient in one pass per tensor: band + global-key terms + global-row terms
    dq = dq + _over_globals(ds, k_g) * scale + _scatter_rows(dq_g, slot)
    dk = (dk + _over_globals(dsr.transpose(-1, -2), q_g) * scale
          + _scatter_rows(dk_g, slot))
    dv = dv + _over_globals(pr.transpose(-1, -2), do_g) + _scatter_rows(dv_g, slot)
    return _like(q, dq), _like(k, dk), _like(v, dv)


def _like(x, grad):
    """``grad`` in ``x``'s dtype and memory layout (SDPA's gradients have the layout of its inputs): written so by
    the compiled body's last kernel, where a gradient of another layout would cost autograd a copy of its own."""
    if grad.dtype == x.dtype and grad.stride() == x.stride():
        return grad
    return torch.empty_like(x).copy_(grad)


@functools.cache
def _compiled(body, mode: str):
    from sadiffuseq.attention.backends import _allow_recompiles

    _allow_recompiles()
    return torch.compile(body, dynamic=False, mode=None if mode == "default" else mode)


def _run(body, static, device: torch.device, mode: str, *args):
    """The body compiled on CUDA (``mode``: a ``torch.compile`` mode; ``reduce-overhead`` replays it as a CUDA
    graph), eager elsewhere — and eager with variable-length runs (packed documents, several rows of dilated heads
    on FlashAttention-2): compiled, the variable-length backward's dq came out wrong on PyTorch 2.11 (the same
    kernel called eagerly matches the reference, `tests/test_flash_attention.py`)."""
    varlen = any(mode_ == "runs" for _, _, mode_, _ in static[2]) and not isinstance(static[1], tuple)
    compiled = device.type == "cuda" and static[1] != "reference" and not varlen
    return (_compiled(body, mode) if compiled else body)(static, *args)


class _SparseFlash(torch.autograd.Function):
    """The whole pattern of every head; (B, L, H, hd) in and out."""

    @staticmethod
    def forward(ctx, q, k, v, static, tensors, mode):
        out, lse, states = _run(_forward_body, static, q.device, mode, q, k, v, tensors)
        ctx.static, ctx.tensors, ctx.states, ctx.mode = static, tensors, states, mode
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _run(_backward_body, ctx.static, q.device, ctx.mode, dout, q, k, v, out, lse, ctx.states,
                          ctx.tensors)
        return dq, dk, dv, None, None, None


COMPILE_MODES = ("default", "reduce-overhead")


def flash_attention(q, k, v, plan: FlashPlan, compile_mode: str = "default") -> torch.Tensor:
    """Every head of a layer through the plan: (B, H, L, hd) in original token order in and out.
    ``compile_mode``: ``default``, or ``reduce-overhead`` to replay the compiled bodies as CUDA graphs (for short
    sequences, where launching the kernels takes longer than running them)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"flash attention compile mode {compile_mode!r}: choose from {', '.join(COMPILE_MODES)}")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # FlashAttention's (B, L, H, hd): views
    static, tensors = _split_plan(plan)
    return _SparseFlash.apply(qt, kt, vt, static, tensors, compile_mode).transpose(1, 2)
