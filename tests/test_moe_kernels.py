"""The MoE layer's fused up-projection bias + GELU (moe_kernels.py) against autograd of the plain expression.

The PyTorch path runs everywhere; the Triton kernels run under Triton's CPU interpreter (started in a process of its
own by the last test: the interpreter has to be chosen before Triton is imported) and, on a CUDA GPU, in bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from sadiffuseq import moe_kernels

from conftest import run_under_interpreter

CUDA = torch.cuda.is_available()


def _problem(counts, width, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    u = (torch.randn(M, width, generator=g) * 2).to(device, dtype)
    bias = torch.randn(E, width, generator=g).to(device, dtype)
    grad = torch.randn(M, width, generator=g).to(device, dtype)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts)).to(device)
    ends = torch.tensor(counts).cumsum(0).to(device, torch.int32)
    return u, bias, grad, expert, ends


def _autograd_reference(u, bias, grad, expert):
    """du, dbias of GELU(u + bias[expert]) by autograd, in fp64."""
    u64, b64 = u.double().requires_grad_(), bias.double().requires_grad_()
    F.gelu(u64 + b64[expert]).backward(grad.double())
    return u64.grad, b64.grad


def test_gelu_grad_is_the_derivative_of_torch_gelu():
    z = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    F.gelu(z).sum().backward()
    torch.testing.assert_close(moe_kernels.gelu_grad(z.detach()), z.grad, rtol=1e-12, atol=1e-12)


def test_bias_gelu_forward_and_torch_backward_match_autograd():
    u, bias, grad, expert, ends = _problem((5, 0, 9, 3), 24)
    u_, b_ = u.clone().requires_grad_(), bias.clone().requires_grad_()
    h = moe_kernels.bias_gelu(u_, b_, expert, ends)
    torch.testing.assert_close(h, F.gelu(u + bias[expert]))
    h.backward(grad)
    want_du, want_db = _autograd_reference(u, bias, grad, expert)
    torch.testing.assert_close(u_.grad.double(), want_du, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_.grad.double(), want_db, rtol=1e-5, atol=1e-5)
    assert torch.all(b_.grad[1] == 0)  # the empty expert


# Expert sizes around the tile height (64 rows): empty experts first, in the middle and last, a single row, one
# full tile, one row more than a tile; widths that are not a multiple of the column block.
TRITON_CASES = [((0, 70, 0, 129, 1, 64, 0), 200), ((64,), 128), ((3, 200, 65, 1), 40)]


@pytest.mark.parametrize("counts, width", TRITON_CASES)
def test_triton_bias_gelu_backward_matches_autograd(counts, width):
    """Under Triton's interpreter (started by the test below), fp32 against autograd."""
    pytest.importorskip("triton")
    if not moe_kernels.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_triton_kernels_under_the_interpreter starts it)")
    u, bias, grad, expert, ends = _problem(counts, width)
    assert moe_kernels.use_triton(u)
    du, db = moe_kernels.bias_gelu_backward(grad, u, bias, expert, ends)
    want_du, want_db = _autograd_reference(u, bias, grad, expert)
    torch.testing.assert_close(du.double(), want_du, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("small_rows", [0, 10_000])
def test_triton_bias_gelu_backward_under_other_launch_settings(monkeypatch, small_rows):
    """Other tile shapes only change how the work is split (interpreter); the settings for many rows (BIAS_GELU)
    and for few (BIAS_GELU_SMALL, up to SMALL_ROWS rows) each set to them in turn, the other left tuned."""
    pytest.importorskip("triton")
    if not moe_kernels.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_triton_kernels_under_the_interpreter starts it)")
    monkeypatch.setattr(moe_kernels, "SMALL_ROWS", small_rows)
    monkeypatch.setattr(moe_kernels, "BIAS_GELU_SMALL" if small_rows else "BIAS_GELU",
                        dict(ROWS=16, BM=4, BN=32, num_warps=2))
    monkeypatch.setattr(moe_kernels, "BN_SUM", 16)
    monkeypatch.setattr(moe_kernels, "BT_SUM", 2)
    u, bias, grad, expert, ends = _problem((0, 70, 0, 129, 1, 16, 0), 50)
    du, db = moe_kernels.bias_gelu_backward(grad, u, bias, expert, ends)
    want_du, want_db = _autograd_reference(u, bias, grad, expert)
    torch.testing.assert_close(du.double(), want_du, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("counts, width", TRITON_CASES)
@pytest.mark.parametrize("launch", [None, dict(ROWS=16, BM=4, BN=32, num_warps=2)])
def test_triton_bias_gelu_forward_matches_the_expression(monkeypatch, counts, width, launch):
    """The forward kernel, fp32 under the interpreter, against GELU(u + b[e]) in float64; the tuned tiles and
    small ones (which only change how the work is split)."""
    pytest.importorskip("triton")
    if not moe_kernels.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_triton_kernels_under_the_interpreter starts it)")
    if launch:
        monkeypatch.setattr(moe_kernels, "BIAS_GELU_FORWARD", launch)
    u, bias, _, expert, ends = _problem(counts, width)
    assert moe_kernels.use_triton(u)
    h = moe_kernels.bias_gelu_forward(u, bias, expert, ends)
    torch.testing.assert_close(h.double(), F.gelu(u.double() + bias.double()[expert]), rtol=1e-5, atol=1e-6)


def _combine_problem(n, width, k, preference, dtype=torch.float32, device="cpu", seed=0):
    """A dropless routing of n tokens, each to k distinct experts (random scores shifted by ``preference``, one
    entry per expert: -inf leaves an expert empty, a low value gives it few rows), sorted: the combine's inputs and
    an output gradient."""
    from sadiffuseq.moe import dispatch

    g = torch.Generator().manual_seed(seed)
    E = len(preference)
    experts = (torch.randn(n, E, generator=g) + torch.tensor(preference)).topk(k, dim=1).indices
    disp = dispatch(experts, E)
    ys = torch.randn(n * k, width, generator=g).to(device, dtype)
    gates = torch.rand(n, k, generator=g).to(device, dtype)
    bias = torch.randn(E, width, generator=g).to(device, dtype)
    grad = torch.randn(n, width, generator=g).to(device, dtype)
    ends = torch.cumsum(disp.counts, 0).to(device, torch.int32)
    return ys, gates, bias, experts.to(device), disp, grad, ends


def _combine_reference(ys, gates, bias, experts, disp, grad):
    """Gradients of y[n] = Σ_j gates[n, j] (ys[slot(n, j)] + bias[experts[n, j]]) by autograd, in float64."""
    ys64, g64, b64 = (t.double().requires_grad_() for t in (ys, gates, bias))
    n, k = gates.shape
    slot = disp.slot.to(ys.device).view(n, k)
    y = sum(g64[:, j, None] * (ys64[slot[:, j]] + b64[experts[:, j]]) for j in range(k))
    y.backward(grad.double())
    return ys64.grad, g64.grad, b64.grad


def _check_combine_backward(n, width, k, preference, dtype=torch.float32, device="cpu", tol=1e-5, with_bias=True):
    """Without the bias (rows that hold it already): the rows' and gates' gradients of a zero bias, and none for
    the bias."""
    ys, gates, bias, experts, disp, grad, ends = _combine_problem(n, width, k, preference, dtype, device)
    pair, token = disp.pair.to(device), disp.token.to(device)
    got = moe_kernels.combine_backward(grad, ys, bias if with_bias else None, gates, pair, token, ends)
    want = _combine_reference(ys, gates, bias if with_bias else torch.zeros_like(bias), experts, disp, grad)
    if not with_bias:
        assert got[2] is None
        got, want = got[:2], want[:2]
    for name, a, b in zip(("rows", "gates", "bias"), got, want):
        assert a.dtype == dtype, name
        assert (a.double() - b).abs().max() <= tol * b.abs().max(), name


INF = float("inf")


@pytest.mark.parametrize("n, width, k, preference", [(150, 200, 2, (-INF, 0, -INF, 0, -3, 0, -INF)),
                                                     (64, 128, 1, (0,)), (90, 40, 3, (0, 0, 0, -2, 0))])
@pytest.mark.parametrize("launch, with_bias", [(None, True), (dict(BM=16, BD=32, num_warps=2), True),
                                               (dict(BM=16, BD=32, num_warps=2), False)])
def test_triton_combine_backward_matches_autograd(monkeypatch, n, width, k, preference, launch, with_bias):
    """The combine's backward kernel, fp32 under the interpreter, against autograd in float64: the rows', the gates'
    and the down bias's gradients (the tuned tiles and small ones), and without the bias."""
    pytest.importorskip("triton")
    if not moe_kernels.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_triton_kernels_under_the_interpreter starts it)")
    if launch:
        monkeypatch.setattr(moe_kernels, "COMBINE_BACKWARD", launch)
        monkeypatch.setattr(moe_kernels, "BN_SUM", 16)
        monkeypatch.setattr(moe_kernels, "BT_SUM", 2)
    _check_combine_backward(n, width, k, preference, with_bias=with_bias)


def test_moe_triton_kernels_under_the_interpreter():
    run_under_interpreter(__file__, "triton_bias_gelu or triton_combine")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("counts, width", TRITON_CASES + [((8261, 8077, 8118, 7950, 8412, 8339, 8131, 8248), 1536)])
def test_gpu_bias_gelu_backward_in_bf16(counts, width):
    u, bias, grad, expert, ends = _problem(counts, width, torch.bfloat16, "cuda")
    du, db = moe_kernels.bias_gelu_backward(grad, u, bias, expert, ends)
    want_du, want_db = _autograd_reference(u, bias, grad, expert)
    torch.testing.assert_close(du.double(), want_du, rtol=2e-2, atol=2e-2)
    # The bias gradient sums up to thousands of rows: compare relative to the size of the sums.
    scale = want_db.abs().max()
    assert (db.double() - want_db).abs().max() <= 1e-2 * scale


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_combine_backward_in_bf16(with_bias):
    _check_combine_backward(8192, 768, 2, (0,) * 8, torch.bfloat16, "cuda", 1e-2, with_bias)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("counts, width", TRITON_CASES + [((8261, 8077, 8118, 7950, 8412, 8339, 8131, 8248), 1536)])
def test_gpu_bias_gelu_forward_in_bf16(counts, width):
    u, bias, _, expert, ends = _problem(counts, width, torch.bfloat16, "cuda")
    h = moe_kernels.bias_gelu_forward(u, bias, expert, ends)
    want = F.gelu(u.float() + bias.float()[expert])  # rounded to bf16 once, as the kernel's result is
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
