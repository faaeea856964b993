"""banded_attention against an independent dense reference (mask from patterns.py + SDPA)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sadiffuseq.attention import patterns
from sadiffuseq.attention.banded import banded_attention


def random_docs(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, L) contiguous documents from sorted random split points."""
    rows = []
    for _ in range(batch):
        n_splits = int(torch.randint(0, max(1, length // 20) + 3, (1,), generator=gen))
        cuts = torch.zeros(length, dtype=torch.long)
        if length > 1 and n_splits:
            points = torch.sort(torch.randint(1, length, (n_splits,), generator=gen)).values
            cuts[points] = 1
        rows.append(torch.cumsum(cuts, 0))
    return torch.stack(rows)


def make_case(length, window, dilation, first, every, docs, batch, seed, heads=2, hd=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    is_global = patterns.global_positions(length, first=first, every=every)
    layout = patterns.make_layout(is_global, dilation)
    doc_ids = random_docs(batch, length, gen) if docs else None
    q, k, v = (torch.randn(batch, heads, length, hd, generator=gen).to(dtype) for _ in range(3))
    return layout, is_global, doc_ids, q, k, v


def reference(q, k, v, layout, window, doc_ids):
    """Dense SDPA in float64 with the boolean mask of patterns.layout_mask_mod (permuted space)."""
    length, batch = q.shape[2], q.shape[0]
    mask = patterns.dense_mask(patterns.layout_mask_mod(layout, window, doc_ids), length, batch)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[:, None])


def outputs_and_grads(fn, q, k, v, upstream):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), (q, k, v))
    return out.detach(), grads


# (L, window, dilation, first, every, docs, B, chunk) — diverse combos and edge cases
CASES = [
    (1, 0, 1, 0, 0, False, 1, 128),  # single token, no globals
    (1, 5, 3, 1, 0, True, 2, 128),  # single global token, empty classes
    (7, 0, 1, 0, 0, False, 2, 128),  # window 0, G = 0: only itself
    (7, 1, 2, 1, 0, True, 1, 4),  # chunk that does not divide the segment
    (7, 64, 4, 0, 50, False, 2, 128),  # window far wider than the sequence; every=50 -> only position 0
    (7, 5, 3, 16, 0, False, 1, 128),  # all tokens global
    (130, 1, 1, 16, 0, False, 1, 32),
    (130, 5, 2, 0, 0, True, 2, 32),  # G = 0 with documents
    (130, 64, 3, 1, 50, True, 1, 16),
    (130, 0, 4, 16, 50, True, 2, 8),
    (300, 5, 1, 0, 50, False, 2, 64),
    (300, 1, 3, 16, 0, True, 1, 128),
    (300, 64, 2, 1, 0, False, 1, 32),
    (300, 5, 4, 0, 0, True, 2, 7),  # odd chunk
    (300, 0, 2, 0, 50, True, 1, 128),
    (517, 5, 1, 16, 50, True, 2, 128),
    (517, 64, 4, 0, 0, False, 1, 64),
    (517, 1, 2, 1, 50, False, 2, 128),
    (517, 64, 3, 16, 50, True, 1, 100),
    (517, 5, 3, 0, 0, False, 1, 1),  # chunk of one query
    (517, 0, 1, 1, 0, True, 2, 128),
    (517, 5, 2, 16, 0, True, 2, 1000),  # one chunk covers each segment
]


@pytest.mark.parametrize("length,window,dilation,first,every,docs,batch,chunk", CASES)
def test_matches_dense_reference(length, window, dilation, first, every, docs, batch, chunk):
    seed = hash((length, window, dilation, first, every, docs, batch, chunk)) % 2**31
    layout, _, doc_ids, q, k, v = make_case(length, window, dilation, first, every, docs, batch, seed)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))

    out, grads = outputs_and_grads(
        lambda q, k, v: banded_attention(q, k, v, layout, window, doc_ids, chunk=chunk), q, k, v, upstream
    )
    ref, ref_grads = outputs_and_grads(  # float64 leaves: the reference's gradients are float64 too
        lambda q, k, v: reference(q, k, v, layout, window, doc_ids), q.double(), k.double(), v.double(), upstream
    )

    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, g, rg in zip("qkv", grads, ref_grads):
        scale = max(1.0, rg.abs().max().item())
        torch.testing.assert_close(g.double(), rg, atol=2e-5 * scale, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("length,window,dilation,first,every,docs,batch,chunk", CASES[::4])
def test_float64_is_exact(length, window, dilation, first, every, docs, batch, chunk):
    layout, _, doc_ids, q, k, v = make_case(length, window, dilation, first, every, docs, batch, 7, dtype=torch.float64)
    upstream = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    out, grads = outputs_and_grads(
        lambda q, k, v: banded_attention(q, k, v, layout, window, doc_ids, chunk=chunk), q, k, v, upstream
    )
    ref, ref_grads = outputs_and_grads(lambda q, k, v: reference(q, k, v, layout, window, doc_ids), q, k, v, upstream)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-12, rtol=1e-10)


def test_custom_scale_and_value_dim():
    layout, _, doc_ids, q, k, _ = make_case(130, 5, 2, 1, 50, True, 2, 3)
    v = torch.randn(2, 2, 130, 5)
    out = banded_attention(q, k, v, layout, 5, doc_ids, chunk=16, scale=0.3)
    mask = patterns.dense_mask(patterns.layout_mask_mod(layout, 5, doc_ids), 130, 2)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[:, None], scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_gradcheck_small():
    layout, _, doc_ids, q, k, v = make_case(23, 2, 2, 1, 10, True, 1, 5, heads=1, hd=3, dtype=torch.float64)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: banded_attention(q, k, v, layout, 2, doc_ids, chunk=4), (q, k, v))


@pytest.mark.parametrize(
    "length,window,dilation,first,every,docs",
    [(1, 0, 1, 0, 0, False), (7, 1, 3, 1, 0, True), (130, 5, 2, 16, 50, True), (300, 64, 4, 0, 0, True),
     (517, 1, 1, 1, 50, False), (517, 5, 3, 0, 50, True)],
)
def test_layout_mask_matches_original_order(length, window, dilation, first, every, docs):
    """The permuted-space mask, permuted back, is the head pattern in original order."""
    gen = torch.Generator().manual_seed(length + window)
    is_global = patterns.global_positions(length, first=first, every=every)
    layout = patterns.make_layout(is_global, dilation)
    doc_ids = random_docs(2, length, gen) if docs else None
    permuted = patterns.dense_mask(patterns.layout_mask_mod(layout, window, doc_ids), length, 2)
    back = permuted[:, layout.inv][:, :, layout.inv]
    original = patterns.dense_mask(patterns.head_mask_mod(window, dilation, is_global, doc_ids), length, 2)
    assert torch.equal(back, original)
    assert torch.equal(layout.perm[layout.inv], torch.arange(length))
    assert layout.class_starts[-1] == length and layout.class_starts[0] == layout.n_global


def test_bfloat16_smoke():
    layout, _, doc_ids, q, k, v = make_case(300, 5, 2, 16, 50, True, 2, 11)
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    out = banded_attention(qb, kb, vb, layout, 5, doc_ids, chunk=64)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in (qb, kb, vb))
    ref = reference(qb.detach(), kb.detach(), vb.detach(), layout, 5, doc_ids)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


class MaxNumel(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by any op run under the mode."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.worst = None
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.worst = t.numel(), (str(func), tuple(t.shape))
        return out


def test_memory_is_linear_in_length():
    length, heads, hd, window, dilation = 16384, 2, 16, 64, 2
    is_global = patterns.global_positions(length, first=16, every=0)
    layout = patterns.make_layout(is_global, dilation)
    assert layout.n_global == 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, hd, generator=gen).requires_grad_(True) for _ in range(3))
    mode = MaxNumel()
    start = time.perf_counter()
    with mode:
        out = banded_attention(q, k, v, layout, window)
        out.square().sum().backward()
    elapsed = time.perf_counter() - start
    assert any("softmax_backward" in op for op in mode.ops)  # the backward really ran under the mode
    assert mode.max_numel < length * length // 16, mode.worst
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    print(f"L={length}: fwd+bwd {elapsed:.2f}s under dispatch mode, max numel {mode.max_numel} {mode.worst}")
