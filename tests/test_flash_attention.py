"""The ``flash`` backend (attention/flash.py) against the dense reference.

On the CPU the backend runs with its ``reference`` kernel — FlashAttention's forward and backward contract in plain
PyTorch — so everything but the CUDA kernel is checked in fp32 with tight tolerances: the head groups, the strided
residue-class views and the gathered variable-length runs, the merge with the global keys, the global rows and the
backward that feeds the merged output and log-sum-exp to the band kernel. On a CUDA GPU the same comparisons run
with FlashAttention-2's kernels in bf16.
"""

import os
import subprocess
import sys

import pytest
import torch

from sadiffuseq.attention import cudnn_band, flash
from sadiffuseq.attention.layer import SparseSelfAttention
from sadiffuseq.config import ModelConfig

CUDA = torch.cuda.is_available()

CASES = [
    # (batch, L, heads, window, dilations, global_first, global_every, packed documents)
    (1, 256, 4, 8, [1, 1, 4, 4], 16, 0, False),  # one row, L divisible by 4: dilated heads as strided classes
    (1, 300, 4, 5, [4, 1, 2, 1], 3, 50, False),  # mixed non-contiguous dilations; 300 % 4 == 0, 300 % 2 == 0
    (1, 301, 2, 7, [1, 3], 2, 0, False),  # L not divisible by the dilation: gathered runs
    (2, 257, 2, 0, [1, 3], 1, 0, True),  # window 0, packed documents
    (2, 517, 4, 16, [2, 2, 2, 2], 0, 0, True),  # no global tokens at all
    (2, 1000, 2, 64, [1, 4], 16, 100, False),  # two rows: dilated heads as runs
]


def _layer(case, backend, hd=8, kernel="reference"):
    B, L, heads, window, dilations, first, every, packed = case
    cfg = ModelConfig(d_model=hd * heads, n_heads=heads, window=window, dilations=dilations, global_first=first,
                      global_every=every, attention="sparse", attention_backend=backend, dropout=0.0)
    layer = SparseSelfAttention(cfg)
    layer.flash_kernel = kernel
    return layer


def _docs(case, device):
    B, L, *_, packed = case
    if not packed:
        return None
    g = torch.Generator().manual_seed(L)
    cuts = torch.randint(1, L, (B, 3), generator=g).sort(dim=1).values
    return (torch.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1).to(device)


def _out_and_grads(case, backend, device="cpu", dtype=torch.float32, hd=8, kernel="reference"):
    B, L, heads = case[:3]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, heads, L, hd, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    layer = _layer(case, backend, hd, kernel).to(device)
    if backend == "flash" and kernel == "cudnn" and device == "cpu":  # the layer refuses cuDNN on a CPU; the plan
        plan = flash.make_plan(layer.dilations, layer.window, L, B, torch.device(device), layer.global_first,
                               layer.global_every, _docs(case, device), kernel="cudnn")
        out = flash.flash_attention(q, k, v, plan)  # runs the operators' plain-PyTorch implementation
    else:
        out = layer.attend(q, k, v, _docs(case, device))
    weights = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
    (out.float() * weights).sum().backward()
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("case", CASES)
def test_flash_backend_matches_dense_outputs_and_gradients(case):
    for name, ref, got in zip("out dq dk dv".split(), _out_and_grads(case, "dense"), _out_and_grads(case, "flash")):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_flash_backend_with_the_cudnn_decomposition_matches_dense(case):
    """The ``cudnn`` kernel on the CPU: the shifted-key causal call plus the corner (each call through the
    operator's plain-PyTorch implementation), merged by log-sum-exp; variable-length runs fall back to the
    reference kernel."""
    ref = _out_and_grads(case, "dense")
    got = _out_and_grads(case, "flash", kernel="cudnn")
    for name, a, b in zip("out dq dk dv".split(), ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("B,S,w,dilations", [(2, 33, 16, [1, 1, 1]), (2, 100, 7, [1, 1, 1]), (1, 64, 1, [1, 2, 2]),
                                               (2, 50, 0, [1, 1, 1]), (1, 300, 40, [4, 1, 1]), (1, 96, 10, [3, 3, 1]),
                                               (1, 120, 30, [1, 4, 4])])
def test_cudnn_band_decomposition_equals_the_two_sided_band(B, S, w, dilations):
    """The cuDNN operators (main call on the shifted keys + corner, or one two-sided call for short sequences;
    dilated heads as strided class views), each call through the plain-PyTorch implementation of cuDNN's band
    contract, against autograd through the dense masked softmax: |i − j| ≤ w·d and d | i − j."""
    g = torch.Generator().manual_seed(S + w)
    H = len(dilations)
    q, k, v = (torch.randn(B, S, H, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    scale = 8 ** -0.5
    offset = torch.arange(S)[:, None] - torch.arange(S)[None, :]
    d = torch.tensor(dilations)[:, None, None]
    allowed = (offset % d == 0) & (offset.abs() <= w * d)  # (H, S, S)
    s = (torch.einsum("bihd,bjhd->bhij", q, k) * scale).masked_fill(~allowed, float("-inf"))
    ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    groups = []
    for h, dh in enumerate(dilations):  # maximal runs of equal dilation
        if groups and groups[-1] == dh and groups[-3] + groups[-2] == h:
            groups[-2] += 1
        else:
            groups += [h, 1, dh]
    args = (q.detach(), k.detach(), v.detach())
    out, lse = cudnn_band.band_forward(*args, w, scale, groups)
    tol = dict(atol=1e-5, rtol=1e-5)  # the operators compute in fp32, the reference in fp64
    torch.testing.assert_close(out, ref.detach(), **tol)
    torch.testing.assert_close(lse, s.logsumexp(-1).detach().float(), **tol)
    grads = cudnn_band.band_backward(dout, *args, out, lse, w, scale, groups)
    for name, a, b in zip(("dq", "dk", "dv"), ref_grads, grads):
        torch.testing.assert_close(b, a, msg=name, **tol)


def test_plan_uses_views_where_it_can_and_runs_elsewhere():
    one_row = flash.make_plan((1, 1, 4, 4), 8, 256, 1, torch.device("cpu"), 16, 0, kernel="reference")
    assert [(g.mode, g.dilation, g.heads) for g in one_row.groups] == [("rows", 1, (0, 1)), ("classes", 4, (2, 3))]
    two_rows = flash.make_plan((1, 4), 8, 256, 2, torch.device("cpu"), 16, 0, kernel="reference")
    runs = two_rows.groups[1]
    assert runs.mode == "runs" and runs.max_len == 64  # 2 rows × 4 classes of 64 tokens
    assert runs.cu.tolist() == list(range(0, 513, 64))
    docs = torch.tensor([[0] * 10 + [1] * 20])
    packed = flash.make_plan((1,), 8, 30, 1, torch.device("cpu"), 0, 0, docs, kernel="reference")
    assert packed.groups[0].mode == "runs" and packed.groups[0].cu.tolist() == [0, 10, 30]
    assert packed.global_pos is None


def test_global_keys_inside_the_band_are_counted_once():
    """Position 0 is global; queries within the band of head h reach it through the band, the rest through the
    global-key product: the plan's ``skip`` marks exactly the band pairs (for a dilated head: same class, within
    ±w·d)."""
    plan = flash.make_plan((1, 4), 3, 40, 1, torch.device("cpu"), 1, 0, kernel="reference")
    skip = plan.skip[0, :, :, 0]  # (H, L)
    assert skip[0].nonzero().squeeze(1).tolist() == [0, 1, 2, 3]
    assert skip[1].nonzero().squeeze(1).tolist() == [0, 4, 8, 12]


def test_flash_backend_refuses_inputs_its_kernels_cannot_run():
    case = CASES[0]
    layer = _layer(case, "flash", kernel="fa2")
    q = torch.randn(1, 4, 256, 8)
    with pytest.raises(ValueError, match="needs a CUDA GPU, fp16/bf16"):
        layer.attend(q, q, q)


@pytest.mark.skipif(not CUDA, reason="FlashAttention-2 and cuDNN kernels need a CUDA GPU")
@pytest.mark.parametrize("kernel", ["fa2", "cudnn"])
@pytest.mark.parametrize("case", CASES + [(1, 4500, 4, 256, [1, 1, 4, 4], 16, 0, True),
                                          (1, 4096, 4, 256, [1, 1, 4, 4], 16, 0, False)])
@pytest.mark.parametrize("triton_globals", [True, False])
def test_flash_kernels_match_dense_on_gpu(case, kernel, triton_globals, monkeypatch):
    """bf16 band kernels against the fp32 dense reference on the same (bf16-representable) inputs, the global
    tokens through the Triton kernels (where they apply) and through the PyTorch code."""
    if kernel == "cudnn" and not cudnn_band.available():
        pytest.skip("the cuDNN frontend (nvidia-cudnn-frontend) is not installed")
    monkeypatch.setattr(flash, "TRITON_GLOBALS", triton_globals)
    ref = _out_and_grads(case, "dense", "cuda", torch.float32, hd=64)
    got = _out_and_grads(case, "flash", "cuda", torch.bfloat16, hd=64, kernel=kernel)
    for name, a, b in zip("out dq dk dv".split(), ref, got):
        err = ((a - b).norm() / a.norm()).item()
        assert err < 1e-2, (name, err)


def test_auto_band_kernel_is_cudnn_only_for_long_rows_with_the_frontend(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(cudnn_band, "available", lambda: True)
    assert flash.resolve_kernel("auto", cuda, flash.CUDNN_FROM) == "cudnn"
    assert flash.resolve_kernel("auto", cuda, flash.CUDNN_FROM - 1) == "fa2"
    assert flash.resolve_kernel("auto", torch.device("cpu"), 10 ** 6) == "fa2"
    assert flash.resolve_kernel("fa2", cuda, 10 ** 6) == "fa2"
    monkeypatch.setattr(cudnn_band, "available", lambda: False)
    assert flash.resolve_kernel("auto", cuda, 10 ** 6) == "fa2"


def test_config_rejects_an_unknown_band_kernel():
    from sadiffuseq.errors import UserError

    with pytest.raises(UserError, match="flash_kernel"):
        ModelConfig(flash_kernel="fa3").validate()


@pytest.mark.parametrize("first", [16, 0])  # with global tokens (the merged backward) and the band alone
def test_flash_gradients_come_back_in_the_layout_of_the_inputs(first):
    """As SDPA's do: (B, H, L, hd) inputs get (B, H, L, hd)-contiguous gradients, not the kernels' (B, L, H, hd)
    layout, which autograd would copy into the inputs' layout (a full transposing pass per tensor)."""
    case = (1, 256, 4, 8, [1, 1, 4, 4], first, 0, False)
    q, k, v = (torch.randn(1, 4, 256, 8).requires_grad_() for _ in range(3))
    arrived = []
    for t in (q, k, v):
        t.register_hook(lambda g: arrived.append(g.is_contiguous()))
    _layer(case, "flash").attend(q, k, v).sum().backward()
    assert arrived == [True, True, True]


@pytest.mark.parametrize("case", [c for c in CASES if c[5] + c[6] > 0 and not c[7]]
                         + [(1, 200, 2, 4, [1, 2], 40, 0, False)])  # 40 globals: padded to 64 in the kernels
@pytest.mark.parametrize("kernel", ["reference", "cudnn"])
def test_triton_global_kernels_match_dense(case, kernel, monkeypatch):
    """The global tokens through the Triton kernels (forward merge, one-pass backward), run by Triton's
    interpreter on the CPU in fp32, against the dense reference. (Started in a process of its own by the test
    below: the interpreter has to be chosen before Triton is imported.)"""
    pytest.importorskip("triton")
    from sadiffuseq.attention import globals_triton

    if not globals_triton.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_triton_global_kernels_under_the_interpreter starts it)")
    calls = []
    for name in ("merge_global_keys", "global_backward"):
        real = getattr(globals_triton, name)
        monkeypatch.setattr(globals_triton, name,
                            lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    ref = _out_and_grads(case, "dense", hd=16)
    got = _out_and_grads(case, "flash", hd=16, kernel=kernel)
    assert calls == ["merge_global_keys", "global_backward"]  # the kernels ran, not the PyTorch path
    for name, a, b in zip("out dq dk dv".split(), ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)


def test_triton_global_kernels_take_views_of_a_fused_projection():
    """q, k, v as the model makes them — strided views of one (B, L, 3, H, hd) projection, not dense — so the
    gradients are written in a layout of their own (under Triton's interpreter; started by the test below)."""
    pytest.importorskip("triton")
    from sadiffuseq.attention import globals_triton

    if not globals_triton.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_triton_global_kernels_under_the_interpreter starts it)")
    case = (1, 300, 4, 5, [4, 1, 2, 1], 3, 50, False)
    results = []
    for backend in ("dense", "flash"):
        qkv = torch.randn(1, 300, 3, 4, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = _layer(case, backend, hd=16).attend(q, k, v)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), qkv.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


def test_triton_global_kernels_give_the_same_numbers_under_every_launch_setting(monkeypatch):
    """The launch settings (block sizes, spans, grid order, stages) only change how the work is split: other
    settings than the tuned ones — positions on the grid's fast axis, smaller blocks, spans of one — give the same
    outputs and gradients (under Triton's interpreter; started by the test below)."""
    pytest.importorskip("triton")
    from sadiffuseq.attention import globals_triton

    if not globals_triton.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_triton_global_kernels_under_the_interpreter starts it)")
    case = (1, 600, 2, 8, [1, 4], 16, 0, False)
    tuned = _out_and_grads(case, "flash", hd=16)
    monkeypatch.setattr(globals_triton, "MERGE", dict(BM=32, num_warps=2, num_stages=1, HEADS_FAST=False))
    monkeypatch.setattr(globals_triton, "ROWS", dict(BN=32, SPAN=1, num_warps=2, num_stages=1, HEADS_FAST=False))
    monkeypatch.setattr(globals_triton, "BACKWARD", dict(BM=32, SPAN=1, num_warps=2, num_stages=1, HEADS_FAST=False))
    other = _out_and_grads(case, "flash", hd=16)
    for name, a, b in zip("out dq dk dv".split(), tuned, other):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dilation,hd", [(1, 16), (4, 24)])
def test_triton_corner_merge_matches_pytorch(dilation, hd):
    """The cuDNN band's corner merged into the main call's first rows by one Triton kernel, in place on strided
    views (a dilated group's residue classes; a head width that is not a power of two), against the same algebra
    in PyTorch (under Triton's interpreter; started by the test below)."""
    pytest.importorskip("triton")
    from sadiffuseq.attention import globals_triton

    if not globals_triton.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_triton_global_kernels_under_the_interpreter starts it)")
    g = torch.Generator().manual_seed(hd)
    L, H, n = 96, 3, 10
    out = torch.randn(1, L, 5, hd, generator=g)[:, :, 1:4]  # heads 1-3 of five: a group's view
    classes = out if dilation == 1 else flash.patterns.class_view(out, dilation)  # (d, L/d, h, hd)
    Bk, S = classes.shape[:2]
    lse = torch.randn(Bk, H, S, generator=g)
    corner, lse_c = torch.randn(Bk, n, H, hd, generator=g), torch.randn(Bk, H, n, generator=g)
    before = classes.clone()
    want_o, want_lse = classes.clone(), lse.clone()
    cudnn_band._merge_corner_torch(want_o[:, :n], want_lse[..., :n], corner, lse_c)
    cudnn_band._merge_corner(classes[:, :n], lse[..., :n], corner, lse_c)
    torch.testing.assert_close(classes, want_o)
    torch.testing.assert_close(lse, want_lse)
    assert (want_o[:, :n] - before[:, :n]).abs().max() > 0.1  # the merge changes those rows: the test can fail
    torch.testing.assert_close(classes[:, n:], before[:, n:])  # and only those


def test_triton_global_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    from sadiffuseq.attention import globals_triton

    if globals_triton.interpreting():
        pytest.skip("already under the interpreter")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "test_triton_global_kernels_match_dense or fused_projection or corner_merge or launch_setting"], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True)
    assert run.returncode == 0 and "skipped" not in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
