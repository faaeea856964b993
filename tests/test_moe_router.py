"""The MoE router's fp32 matmuls and the token rows' gradient (moe_router.py) against float64 references.

The Triton kernels run under Triton's CPU interpreter (a process of its own, started by
``test_moe_router_under_the_interpreter``) and on CUDA GPUs; the PyTorch path runs everywhere.
"""

import pytest
import torch

from sadiffuseq import moe_router
from sadiffuseq.config import ModelConfig
from sadiffuseq.moe import MoEFFN, _RouteDispatch, dispatch, route, select_experts
from sadiffuseq.moe_kernels import interpreting
from sadiffuseq.moe_router import router_logits_value, router_weight_grad_of, token_grad

from conftest import run_under_interpreter

# (tokens, width, experts, k): rows not a multiple of the row blocks, widths not a multiple of the column blocks,
# E from 3 to above the 16-wide padded block.
CASES = [(100, 48, 3, 2), (37, 40, 8, 1), (70, 24, 20, 3)]


@pytest.fixture(autouse=True)
def _no_small_launches(monkeypatch):
    """The tests' problems are below SMALL_TOKENS: under the interpreter, ROUTER_SMALL would replace the small
    blocks the tests set in ROUTER (on the GPU the tests run the settings as they are)."""
    if interpreting():
        monkeypatch.setattr(moe_router, "ROUTER_SMALL", {})


def test_few_tokens_take_the_small_weight_grad_settings(monkeypatch):
    monkeypatch.setattr(moe_router, "ROUTER_SMALL", {"ROWS": 64})
    assert moe_router.weight_grad_settings(moe_router.SMALL_TOKENS)["ROWS"] == 64
    assert moe_router.weight_grad_settings(moe_router.SMALL_TOKENS)["BD"] == moe_router.ROUTER["BD"]
    assert moe_router.weight_grad_settings(moe_router.SMALL_TOKENS + 1)["ROWS"] == moe_router.ROUTER["ROWS"]


def _problem(N, D, E, k, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(E, D, generator=g) * D**-0.5
    grad_logits = torch.randn(N, E, generator=g)
    grad_rows = torch.randn(N * k, D, generator=g).to(torch.bfloat16)
    slot = torch.randperm(N * k, generator=g)  # a token's k pairs sit anywhere among the sorted rows
    kept = torch.rand(N * k, generator=g) < 0.7
    return [t.to(device) for t in (x, w, grad_logits, grad_rows, slot, kept)]


def _relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check_all(N, D, E, k, device="cpu"):
    x, w, grad_logits, grad_rows, slot, kept = _problem(N, D, E, k, device=device)
    xd, wd, gd = x.double(), w.double(), grad_logits.double()
    assert _relative_error(router_logits_value(x, w), xd @ wd.t()) < 1e-5
    assert _relative_error(router_weight_grad_of(grad_logits, x), gd.t() @ xd) < 1e-5
    pairs = grad_rows.double()[slot].view(N, k, D)
    for mask in (None, kept):
        want = (pairs if mask is None else pairs * mask.view(N, k, 1)).sum(1) + gd @ wd
        got = token_grad(grad_rows, slot, mask, grad_logits, w, k, torch.float32)
        assert got.dtype == torch.float32
        assert _relative_error(got, want) < 1e-5, "kept" if mask is not None else "dropless"
    assert token_grad(grad_rows, slot, None, grad_logits, w, k, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("N, D, E, k", CASES)
def test_router_matmuls_and_token_grad_match_float64(N, D, E, k):
    """The path of this machine (PyTorch on the CPU)."""
    _check_all(N, D, E, k)


@pytest.mark.parametrize("N, D, E, k", CASES)
def test_triton_router_kernels_match_float64(monkeypatch, N, D, E, k):
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_router_under_the_interpreter starts it)")
    # Small blocks, so that every loop runs more than once and every mask matters.
    for key, value in dict(BM=32, BK=16, ROWS=32, BR=16, BD=16, token_BM=16, token_BD=16).items():
        monkeypatch.setitem(moe_router.ROUTER, key, value)
    assert moe_router.use_triton(torch.zeros(1))
    _check_all(N, D, E, k)


def _check_fused_routing(N, D, E, k, with_bias, device="cpu"):
    """The fused routing of a dropless layer (moe._RouteDispatch) against the PyTorch routing: the same experts,
    sorted order and rows; gates, mean probabilities, z-loss and entropy, and x's and the router's gradients from
    all four differentiable outputs, against float64."""
    x, w, *_ = _problem(N, D, E, k, device=device)
    g = torch.Generator().manual_seed(1)
    bias = (torch.randn(E, generator=g) * 0.05).to(device) if with_bias else None
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    rows, gates, pmean, stats, experts, slot, pair, token, expert, counts, ends = _RouteDispatch.apply(
        xr, wr, bias, k, torch.float32)

    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    logits = xd @ wd.t()
    assert torch.equal(experts, select_experts(logits.float().detach(), k, bias))
    want = dispatch(experts, E)
    for name in ("pair", "token", "expert", "slot", "counts"):
        assert torch.equal(locals()[name], getattr(want, name)), name
    assert torch.equal(ends, torch.cumsum(want.counts, 0).int())
    assert torch.equal(rows, x[want.token])
    r = route(logits, experts)
    lse = torch.logsumexp(logits, -1)
    want_stats = [lse.pow(2).mean(), (lse - (r.probs * logits).sum(-1)).mean()]
    for got, ref in [(gates, r.gates), (pmean, r.probs.mean(0))] + list(zip(stats, want_stats)):
        assert _relative_error(got, ref.detach()) < 1e-5

    up = [torch.randn(t.shape, generator=g).to(device) for t in (rows, gates, pmean)] + [torch.tensor(0.7)]
    loss = (rows * up[0]).sum() + (gates * up[1]).sum() + (pmean * up[2]).sum() + up[3].to(device) * stats[0]
    loss.backward()
    ref = ((xd[want.token] * up[0].double()).sum() + (r.gates * up[1].double()).sum()
           + (r.probs.mean(0) * up[2].double()).sum() + 0.7 * want_stats[0])
    ref.backward()
    assert _relative_error(xr.grad, xd.grad) < 1e-5
    assert _relative_error(wr.grad, wd.grad) < 1e-5


@pytest.mark.parametrize("N, D, E, k", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_fused_routing_matches_the_pytorch_routing(monkeypatch, N, D, E, k, with_bias):
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_router_under_the_interpreter starts it)")
    # Blocks of 16 tokens, the scan 2 blocks at a time, 16 columns per dispatch program: every loop runs often.
    for key, value in dict(BM=16, BK=16, BD=16, CH=2, grad_BM=16, grad_BD=16).items():
        monkeypatch.setitem(moe_router.ROUTE, key, value)
    _check_fused_routing(N, D, E, k, with_bias)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.6])
def test_triton_router_in_the_layer_gives_the_pytorch_gradients(monkeypatch, capacity_factor):
    """The whole layer with the router's kernels against the same layer on the PyTorch path (which test_moe checks
    against a per-token reference): output, x's gradient, every parameter's gradient, with and without drops."""
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_router_under_the_interpreter starts it)")
    cfg = ModelConfig(d_model=24, n_heads=1, ffn="moe", moe_experts=4, moe_top_k=2, dropout=0.0, moe_impl="loop",
                      moe_capacity_factor=capacity_factor)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(moe_router, "use_triton", lambda t, on=kernels: on)
        torch.manual_seed(0)
        layer = MoEFFN(cfg).train()
        x = torch.randn(2, 25, 24, requires_grad=True)
        y = layer(x)
        (y.pow(2).sum() + layer.last_aux["balance"] + layer.last_aux["z"]).backward()
        results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_router_under_the_interpreter():
    run_under_interpreter(__file__, "triton_ and not gpu")


def _router_gradients_in_the_layer(device, compile_options):
    """x's and the router's gradients from the z-loss alone (which depends on the logits only, not on the routing),
    through the layer in a bf16 autocast region, against float64."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=1, ffn="moe", moe_experts=8, moe_top_k=2, dropout=0.0)
    layer = MoEFFN(cfg).to(device).train()
    fn = layer.compile_routed(**compile_options) if compile_options is not None else layer
    x = torch.randn(1, 300, 64, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        fn(x)
    layer.last_aux["z"].backward()
    xd, wd = x.detach().double().requires_grad_(), layer.router.weight.detach().double().requires_grad_()
    torch.logsumexp(xd @ wd.t(), -1).pow(2).mean().backward()
    assert _relative_error(x.grad, xd.grad) < 1e-5
    assert _relative_error(layer.router.weight.grad, wd.grad) < 1e-5


@pytest.mark.parametrize("compile_options", [None, {"backend": "aot_eager"}])
def test_router_gradients_stay_fp32_under_autocast(compile_options):
    """Eager and traced by torch.compile: bf16 anywhere in the router would give relative errors near 1e-3."""
    _router_gradients_in_the_layer("cpu", compile_options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N, D, E, k", CASES + [(32768, 768, 8, 2)])
def test_gpu_router_kernels_match_float64(N, D, E, k):
    _check_all(N, D, E, k, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N, D, E, k", CASES + [(32768, 768, 8, 2)])
def test_gpu_fused_routing_matches_the_pytorch_routing(N, D, E, k):
    _check_fused_routing(N, D, E, k, with_bias=True, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_options", [None, {}])
def test_gpu_router_gradients_stay_fp32_under_autocast(compile_options):
    """Eager and compiled by inductor (the graph in which the router's backward once ran in bf16)."""
    _router_gradients_in_the_layer("cuda", compile_options)


def test_dot_precision_is_plain_fp32_on_gpus_without_tf32(monkeypatch):
    """tf32x3 needs TF32 tensor cores (Ampere on); older GPUs get the plain fp32 product instead of a failed build."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert moe_router._precision(cuda) == "ieee"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert moe_router._precision(cuda) == moe_router.ROUTER["precision"] == "tf32x3"
    assert moe_router._precision(torch.device("cpu")) == "tf32x3"  # the interpreter ignores it
