"""cuDNN's causal sliding-window kernels, turned into the bidirectional band ±w of every head of a layer.

cuDNN's fused attention takes a diagonal band (``diagonal_band_left_bound`` / ``right_bound``). Its *forward* skips
the tiles outside any band, but on cuDNN 9.19 (the one PyTorch 2.11 ships) its *backward* skips them only for a
causal band with the diagonal aligned at the top left: a two-sided band, or a causal one aligned at the bottom
right, has it visit every tile left of the diagonal (measured on an H100 at 32k tokens, ±256: 27 ms and ~8 ms per
8 heads, where the causal top-left band takes 0.7 ms for 16; docs/benchmarks.md). So the two-sided band is made
causal by shifting the keys:

    keys j ∈ [i − w, i + w]   ⇔   m = j − w ∈ [i − 2w, i],   m indexing the view k[w:]

— the **main** call: all S queries against the S − w keys from position w on (a view, no copy), causal with left
bound 2w + 1, the query/key length mismatch declared through cuDNN's padding mask. What the view leaves out are the
keys j < w of the first 2w queries: the **corner**, a (2w × w) call (left bound w + 1, no right limit) merged into
those rows by log-sum-exp. In the backward the corner's key gradients land on key rows the main call does not
touch (j < w), and its query gradients are added to the first 2w rows. A dilated head is an ordinary window over
each residue class mod d; with one row and d dividing L the classes are a strided view — (L, h, hd) seen as
(d, L/d, h, hd), batch = class — which cuDNN reads and writes in place. A sequence of at most 2w tokens is one
two-sided call (its backward visits every tile, but there are few).

The layer's band is one custom operator each way (``sadiffuseq::cudnn_band_forward`` / ``_backward``), opaque to
``torch.compile``, over groups of heads given as (first head, number of heads, dilation). On a CPU the operators
run every call through a plain-PyTorch implementation of cuDNN's band contract (alignment, bounds, strided outputs),
so the tests check the decomposition without a GPU. cuDNN graphs are built once per layout and cached.

Needs NVIDIA's ``cudnn`` Python frontend (``pip install nvidia-cudnn-frontend``) on a CUDA machine; without it
:func:`available` is False and the ``flash`` backend uses FlashAttention-2's band instead.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sadiffuseq.attention import patterns
from sadiffuseq.attention.globals_triton import interpreting

try:  # NVIDIA's cuDNN frontend: optional, only the CUDA path needs it
    import cudnn as _cudnn
except Exception:  # noqa: BLE001 - any import failure (missing package, missing libcudnn) means "not available"
    _cudnn = None

try:  # the corner's merge as one small kernel (CPU-only PyTorch wheels come without Triton)
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available() -> bool:
    """Whether the cuDNN frontend is importable (the CUDA kernels need it; the CPU reference does not)."""
    return _cudnn is not None


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the cuDNN kernels run these inputs: CUDA with the frontend installed, fp16/bf16, head width a
    multiple of 8 up to 128."""
    return (available() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 128)


# ---------------------------------------------------------------------------------------------------------
# one band call: queries (B, Sq, h, hd) against keys (B, Skv, h, hd), any strides with a unit last one, the
# diagonal aligned at the top left (query n on key n): key m is allowed iff n − left < m ≤ n + right (``right``
# None: no upper limit). Writes ``out`` (a view of q's shape) and ``lse`` (packed (B, h, Sq), fp32). ``padded``:
# declare the lengths through cuDNN's padding mask (needed where Sq > Skv; the same attention).


def _allowed(Sq: int, Skv: int, left: int, right: int | None, device) -> Tensor:
    n = torch.arange(Sq, device=device)[:, None]
    m = torch.arange(Skv, device=device)[None, :]
    allowed = m > n - left
    return allowed if right is None else allowed & (m <= n + right)


def _reference_call(q, k, v, out, lse, left, right, scale) -> None:
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * scale
    s = s.masked_fill(~_allowed(q.shape[1], k.shape[1], left, right, q.device), float("-inf"))
    lse.copy_(s.logsumexp(-1))
    out.copy_(torch.einsum("bhij,bjhd->bihd", torch.exp(s - lse[..., None]), v.float()))


def _reference_call_backward(dout, q, k, v, out, lse, dq, dk, dv, left, right, scale) -> None:
    dout, qf, kf, vf, out = (t.float() for t in (dout, q, k, v, out))
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    p = torch.exp(s - lse[..., None]).masked_fill(~_allowed(q.shape[1], k.shape[1], left, right, q.device), 0.0)
    ds = p * (torch.einsum("bihd,bjhd->bhij", dout, vf) - (dout * out).sum(-1).transpose(1, 2)[..., None])
    dq.copy_(torch.einsum("bhij,bjhd->bihd", ds, kf) * scale)
    dk.copy_(torch.einsum("bhij,bihd->bjhd", ds, qf) * scale)
    dv.copy_(torch.einsum("bhij,bihd->bjhd", p, dout))


def _dims(x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """cuDNN's (B, H, S, D) dimensions and strides of a (B, S, h, hd) tensor."""
    B, S, H, D = x.shape
    s = x.stride()
    return (B, H, S, D), (s[0], s[2], s[1], s[3])


def _packed(x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """cuDNN's (B, H, S, 1) of a packed (B, h, S) log-sum-exp (cuDNN < 9.26 wants it declared packed)."""
    B, H, S = x.shape
    return (B, H, S, 1), (H * S, S, 1, 1)


@functools.cache
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return _cudnn.create_handle()


_handle_streams: dict[int, int] = {}  # device index -> the stream its (shared) handle was last given


def _use_current_stream(handle, device: torch.device) -> None:
    """Point the device's handle at the current stream (it launches on the stream it was last given)."""
    stream = torch.cuda.current_stream(device).cuda_stream
    if _handle_streams.get(device.index) != stream:
        _cudnn.set_stream(handle=handle, stream=stream)
        _handle_streams[device.index] = stream


class _Graph:
    """One built cuDNN graph (band forward or backward) for fixed shapes, strides and bounds."""

    def __init__(self, backward: bool, specs: dict, left: int, right: int | None, padded: bool, scale: float,
                 dtype: torch.dtype, device_index: int):
        c = _cudnn
        io = {torch.bfloat16: c.data_type.BFLOAT16, torch.float16: c.data_type.HALF}[dtype]
        fp32 = c.data_type.FLOAT
        self.handle = _handle(device_index)
        g = c.pygraph(io_data_type=io, intermediate_data_type=fp32, compute_data_type=fp32, handle=self.handle)
        tensors = {n: g.tensor(name=n, dim=list(d), stride=list(s), data_type=fp32 if n == "lse" else io)
                   for n, (d, s) in specs.items() if n in ("q", "k", "v", "out", "dout", "lse") and
                   (backward or n in ("q", "k", "v"))}
        band = dict(attn_scale=scale, diagonal_band_left_bound=left, diagonal_alignment=c.diagonal_alignment.TOP_LEFT)
        if right is not None:
            band["diagonal_band_right_bound"] = right
        if padded:
            B, Sq, Skv = specs["q"][0][0], specs["q"][0][2], specs["k"][0][2]
            for n in ("seq_q", "seq_kv"):
                tensors[n] = g.tensor(name=n, dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=c.data_type.INT32)
            band.update(use_padding_mask=True, seq_len_q=tensors["seq_q"], seq_len_kv=tensors["seq_kv"])
            self.lengths = {"seq_q": (B, Sq), "seq_kv": (B, Skv)}
        else:
            self.lengths = {}
        if not backward:
            out, lse = g.sdpa(name="band", q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=True, **band)
            outputs = {"out": out, "lse": lse}
        else:
            dq, dk, dv = g.sdpa_backward(name="band_backward", q=tensors["q"], k=tensors["k"], v=tensors["v"],
                                         o=tensors["out"], dO=tensors["dout"], stats=tensors["lse"], **band)
            outputs = {"dq": dq, "dk": dk, "dv": dv}
        for name, t in outputs.items():
            d, s = specs[name]
            t.set_output(True).set_dim(list(d)).set_stride(list(s)).set_data_type(fp32 if name == "lse" else io)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([c.heur_mode.A, c.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.slots = {**tensors, **outputs}
        self.workspace_size = g.get_workspace_size()

    def run(self, data: dict) -> None:
        # The workspace and the length tensors are allocated per call, not kept: kept, a first call made while
        # torch.compile's CUDA-graph trees warm up would leave them in the graphs' memory pool, which must hold
        # nothing but the graphs' own tensors.
        device = data["q"].device
        _use_current_stream(self.handle, device)
        pack = {self.slots[n]: t for n, t in data.items()}
        for name, (B, n) in self.lengths.items():
            pack[self.slots[name]] = torch.full((B, 1, 1, 1), n, dtype=torch.int32, device=device)
        workspace = torch.empty(self.workspace_size, dtype=torch.uint8, device=device)
        self.graph.execute(pack, workspace, handle=self.handle)


@functools.lru_cache(maxsize=512)
def _graph(backward, specs, left, right, padded, scale, dtype, device_index) -> _Graph:
    return _Graph(backward, dict(specs), left, right, padded, scale, dtype, device_index)


def _layout(data: dict) -> tuple:
    return tuple((n, _packed(t) if n == "lse" else _dims(t)) for n, t in data.items())


def _call(q, k, v, out, lse, left, right, scale) -> None:
    if not q.is_cuda:
        return _reference_call(q, k, v, out, lse, left, right, scale)
    data = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
    padded = q.shape[1] != k.shape[1]
    _graph(False, _layout(data), left, right, padded, scale, q.dtype, q.device.index).run(data)


def _call_backward(dout, q, k, v, out, lse, dq, dk, dv, left, right, scale) -> None:
    if not q.is_cuda:
        return _reference_call_backward(dout, q, k, v, out, lse, dq, dk, dv, left, right, scale)
    data = {"q": q, "k": k, "v": v, "out": out, "dout": dout, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    padded = q.shape[1] != k.shape[1]
    _graph(True, _layout(data), left, right, padded, scale, q.dtype, q.device.index).run(data)


# ---------------------------------------------------------------------------------------------------------
# the corner merged into the first 2w rows of the main call by log-sum-exp, in place. A handful of rows: written
# as PyTorch it is ten small kernels per group (~60 µs a step at 32k on an H100, each one launch-bound); the same
# algebra in one Triton kernel where Triton runs.


def _merge_corner_torch(o: Tensor, lse: Tensor, corner: Tensor, lse_c: Tensor) -> None:
    """o (B, n, h, hd) and lse (B, h, n): views of the main call's first n rows; corner, lse_c: the corner's."""
    merged = torch.logaddexp(lse, lse_c)
    o.copy_(o * torch.exp(lse - merged).transpose(1, 2)[..., None]
            + corner * torch.exp(lse_c - merged).transpose(1, 2)[..., None])
    lse.copy_(merged)


if triton is not None:

    @triton.jit
    def _corner_kernel(O, LSE, C, LSE_C, sob, son, soh, slb, slh, N, H, hd,
                       BM: tl.constexpr, DP: tl.constexpr):
        pid, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        n = pid * BM + tl.arange(0, BM)
        d = tl.arange(0, DP)
        rows, cols = n < N, d < hd
        both = rows[:, None] & cols[None, :]
        lse_at = LSE + b * slb + h * slh + n
        lse = tl.load(lse_at, mask=rows, other=0.0)
        lse_c = tl.load(LSE_C + (b * H + h) * N + n, mask=rows, other=0.0)
        top = tl.maximum(lse, lse_c)
        merged = top + tl.log(tl.exp(lse - top) + tl.exp(lse_c - top))
        o_at = O + b * sob + n[:, None] * son + h * soh + d[None, :]
        o = tl.load(o_at, mask=both, other=0.0).to(tl.float32)
        c = tl.load(C + ((b * N + n[:, None]) * H + h) * hd + d[None, :], mask=both, other=0.0).to(tl.float32)
        out = o * tl.exp(lse - merged)[:, None] + c * tl.exp(lse_c - merged)[:, None]
        tl.store(o_at, out.to(O.dtype.element_ty), mask=both)
        tl.store(lse_at, merged, mask=rows)


def _merge_corner(o: Tensor, lse: Tensor, corner: Tensor, lse_c: Tensor) -> None:
    """:func:`_merge_corner_torch` as one Triton kernel on a CUDA device (or under Triton's CPU interpreter)."""
    if triton is None or not (o.is_cuda or interpreting()) or o.stride(-1) != 1 or lse.stride(-1) != 1:
        return _merge_corner_torch(o, lse, corner, lse_c)
    B, N, H, hd = o.shape
    corner, lse_c = corner.contiguous(), lse_c.contiguous()
    block = 64
    _corner_kernel[(triton.cdiv(N, block), B * H)](o, lse, corner, lse_c, o.stride(0), o.stride(1), o.stride(2),
                                                    lse.stride(0), lse.stride(1), N, H, hd, BM=block,
                                                    DP=triton.next_power_of_2(hd), num_warps=4)


# ---------------------------------------------------------------------------------------------------------
# the band ±w of a group of heads: main + corner (or one two-sided call for short sequences)


def _group_view(x: Tensor, first: int, count: int, d: int) -> Tensor:
    """(B, L, H, hd) -> this group's (B, L, h, hd), or for d > 1 its residue classes (d, L/d, h, hd): views."""
    x = x.narrow(2, first, count)
    return x if d == 1 else patterns.class_view(x, d)


def _lse_to_group(lse: Tensor, d: int) -> Tensor:
    """(B, h, L) -> the kernel's (B|d, h, S) (a view)."""
    return lse if d == 1 else patterns.class_lse(lse, d)


def _forward(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, groups: list[int]):
    B, L, H, D = q.shape
    w = window
    out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    for first, count, d in zip(groups[0::3], groups[1::3], groups[2::3]):
        qg, kg, vg, og = (_group_view(t, first, count, d) for t in (q, k, v, out))
        Bk, S = qg.shape[:2]
        lse_g = torch.empty((Bk, count, S), dtype=torch.float32, device=q.device)
        if S <= 2 * w:
            _call(qg, kg, vg, og, lse_g, w + 1, w, scale)
        else:
            _call(qg, kg[:, w:], vg[:, w:], og, lse_g, 2 * w + 1, 0, scale)  # main: shifted keys, causal
            corner = torch.empty((Bk, 2 * w, count, D), dtype=q.dtype, device=q.device)
            lse_c = torch.empty((Bk, count, 2 * w), dtype=torch.float32, device=q.device)
            _call(qg[:, :2 * w], kg[:, :w], vg[:, :w], corner, lse_c, w + 1, None, scale)
            _merge_corner(og[:, :2 * w], lse_g[..., :2 * w], corner, lse_c)
        _lse_to_group(lse.narrow(1, first, count), d).copy_(lse_g)
    return out, lse


def _backward(dout, q, k, v, out, lse, window: int, scale: float, groups: list[int]):
    w = window
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    for first, count, d in zip(groups[0::3], groups[1::3], groups[2::3]):
        do_g, qg, kg, vg, og, dqg, dkg, dvg = (_group_view(t, first, count, d)
                                               for t in (dout, q, k, v, out, dq, dk, dv))
        lse_g = _lse_to_group(lse.narrow(1, first, count), d).contiguous()
        S = qg.shape[1]
        if S <= 2 * w:
            _call_backward(do_g, qg, kg, vg, og, lse_g, dqg, dkg, dvg, w + 1, w, scale)
            continue
        _call_backward(do_g, qg, kg[:, w:], vg[:, w:], og, lse_g, dqg, dkg[:, w:], dvg[:, w:], 2 * w + 1, 0, scale)
        dq_corner = torch.empty(qg[:, :2 * w].shape, dtype=q.dtype, device=q.device)
        _call_backward(do_g[:, :2 * w], qg[:, :2 * w], kg[:, :w], vg[:, :w], og[:, :2 * w],
                       lse_g[..., :2 * w].contiguous(), dq_corner, dkg[:, :w], dvg[:, :w], w + 1, None, scale)
        dqg[:, :2 * w] += dq_corner
    return dq, dk, dv


@torch.library.custom_op("sadiffuseq::cudnn_band_forward", mutates_args=())
def band_forward(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                 groups: list[int]) -> tuple[Tensor, Tensor]:
    """The band ±``window`` of every head: q, k, v (B, L, H, hd) -> out (B, L, H, hd), lse (B, H, L) fp32.
    ``groups``: (first head, number of heads, dilation) triples, flattened; every head in exactly one group."""
    return _forward(q, k, v, window, scale, groups)


@band_forward.register_fake
def _(q, k, v, window, scale, groups):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("sadiffuseq::cudnn_band_backward", mutates_args=())
def band_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, window: int,
                  scale: float, groups: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`band_forward` given the *final* ``out`` and ``lse`` of every row (which may include
    terms merged in after the band, e.g. global keys: the exact gradient of each band entry all the same, as in
    ring attention). A row whose ``lse`` is +inf gets and gives no gradient."""
    return _backward(dout, q, k, v, out, lse, window, scale, groups)


@band_backward.register_fake
def _(dout, q, k, v, out, lse, window, scale, groups):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)
