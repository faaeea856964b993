"""The MoE layer's Triton grouped matmuls (moe_gemm.py) against per-row references in float64.

The kernels run under Triton's CPU interpreter in fp32 (started in a process of its own by
``test_moe_gemm_under_the_interpreter``: the interpreter has to be chosen before Triton is imported) and, on a
CUDA GPU of compute capability 9.0 or newer, in bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from sadiffuseq import moe_gemm
from sadiffuseq.moe_kernels import interpreting

from conftest import run_under_interpreter

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)

# Expert sizes around the small test tiles (16 rows): empty experts first, in the middle and last, a single row,
# one full tile, one row more than a tile; widths that are not multiples of the column or inner blocks.
CASES = [((0, 37, 0, 17, 1, 16, 0), 24, 40), ((16,), 32, 16), ((3, 50, 33, 1), 8, 56)]
SMALL = (16, 16, 16, 2, 2, 2)
LAUNCH_SMALL = dict(moe_gemm.LAUNCH_SMALL)


@pytest.fixture(autouse=True)
def _no_small_launches(monkeypatch):
    """Every test's problems are below SMALL_ROWS: without this, LAUNCH_SMALL would replace the settings the tests
    set in LAUNCH (the GPU test of the layer's settings puts it back)."""
    monkeypatch.setattr(moe_gemm, "LAUNCH_SMALL", {})


def _launch(rows, weights=SMALL[:6]):
    """Launch settings with every row-grouped matmul on ``rows``."""
    return {op: weights if op == "weight_grad" else rows for op in moe_gemm.LAUNCH}


def _problem(counts, d, H, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    t = dict(rows=rnd(M, d), w_up=rnd(E, d, H, scale=d**-0.5), b_up=rnd(E, H), w_down=rnd(E, H, d, scale=H**-0.5),
             b_down=rnd(E, d), grad=rnd(M, d))
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts)).to(device)
    ends = torch.tensor(counts).cumsum(0).to(device, torch.int32)
    return t, expert, ends


def _params(down_bias):
    return ("w_up", "b_up", "w_down") + (("b_down",) if down_bias else ())


def _reference(t, counts, down_bias=False):
    """Output and gradients of the experts' FFN by autograd in float64, one matmul per expert."""
    p = {name: v.detach().double().requires_grad_(name != "grad") for name, v in t.items()}
    rows = p["rows"].split(list(counts))
    y = torch.cat([F.gelu(rows[e] @ p["w_up"][e] + p["b_up"][e]) @ p["w_down"][e]
                   + (p["b_down"][e] if down_bias else 0) for e in range(len(counts))])
    y.backward(p["grad"])
    return y.detach(), {name: p[name].grad for name in ("rows",) + _params(down_bias)}


def _run_triton(t, ends, param_dtype, expert, down_bias=False):
    """experts_ffn with the parameters in their own dtype (as an fp32 model in mixed precision has them); the down
    projection's bias in the experts (``down_bias``) or left to the caller."""
    leaves = {"rows": t["rows"].clone().requires_grad_()}
    leaves.update({name: t[name].to(param_dtype).clone().requires_grad_() for name in _params(down_bias)})
    y = moe_gemm.experts_ffn(leaves["rows"], leaves["w_up"], leaves["b_up"], leaves["w_down"], expert, ends,
                             leaves.get("b_down"))
    y.backward(t["grad"])
    return y, leaves


def _check_against_reference(counts, d, H):
    """With the down projection's bias in the experts (its gradient from the weight-gradient launch)."""
    t, expert, ends = _problem(counts, d, H)
    y, leaves = _run_triton(t, ends, torch.float32, expert, down_bias=True)
    want_y, want = _reference(t, counts, down_bias=True)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(leaves[name].grad.double(), g, rtol=1e-5, atol=1e-4, msg=name)


def _under_interpreter():
    pytest.importorskip("triton")
    if not interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (test_moe_gemm_under_the_interpreter starts it)")


@pytest.mark.parametrize("counts, d, H", CASES)
def test_triton_experts_match_the_per_row_reference(monkeypatch, counts, d, H):
    """Output and all four gradients, the down projection's bias left to the caller; fp32 leaves."""
    _under_interpreter()
    monkeypatch.setattr(moe_gemm, "LAUNCH", _launch(SMALL + (0, 0)))
    t, expert, ends = _problem(counts, d, H)
    assert moe_gemm.supported(torch.device("cpu"), torch.float32, d, H)
    y, leaves = _run_triton(t, ends, torch.float32, expert)
    want_y, want = _reference(t, counts)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for name, g in want.items():
        assert leaves[name].grad.dtype == torch.float32
        torch.testing.assert_close(leaves[name].grad.double(), g, rtol=1e-5, atol=1e-4, msg=name)
    assert all(leaves["w_up"].grad[e].abs().sum() == 0 for e, c in enumerate(counts) if c == 0)  # empty experts


def test_triton_experts_under_other_tiles(monkeypatch):
    """Other tile shapes, one per kernel, only change how the work is split (the row tiles taller than some experts,
    an inner block wider than d, stores through the descriptor)."""
    _under_interpreter()
    monkeypatch.setattr(moe_gemm, "LAUNCH", {"up": (32, 16, 16, 2, 2, 2, 0, 1), "down": (16, 32, 32, 2, 2, 2, 0, 0),
                                             "down_input_grad": (32, 32, 16, 2, 2, 1, 0, 1),
                                             "up_input_grad": (16, 16, 32, 2, 2, 4, 0, 0),
                                             "weight_grad": (32, 16, 32, 2, 2, 1),
                                             "up_gelu": (32, 16, 16, 2, 2, 2, 0, 1, 2),
                                             "down_input_grad_gelu": (32, 32, 16, 2, 2, 1, 0, 1, 4)})
    _check_against_reference((0, 37, 0, 17, 1, 16, 0), 24, 40)


@pytest.mark.parametrize("grid, tma_store", [(1, 0), (2, 0), (0, 1), (1, 1), (2, 1)])
def test_triton_experts_on_persistent_programs(monkeypatch, grid, tma_store):
    """Persistent programs (4 on the CPU) looping over the row tiles that hold rows, with and without warp
    specialisation (which the interpreter ignores: the same loop); results stored through the descriptor, every
    expert of a tile or more its last tile moved back to end at its last row (experts of 37 and 17 rows: the moved
    tile overlaps the one before; 16 rows: one whole tile; 1 row: the masked store)."""
    _under_interpreter()
    monkeypatch.setattr(moe_gemm, "LAUNCH", _launch(SMALL + (grid, tma_store)))
    _check_against_reference((0, 37, 0, 17, 1, 16, 0), 24, 40)


@pytest.mark.parametrize("fused, sums", [((False, False), 1), ((True, True), 0), ((True, True), 1), ((True, True), 2)])
@pytest.mark.parametrize("grid, tma_store, sub", [(0, 0, 1), (1, 1, 2), (2, 1, 4), (0, 1, 1)])
def test_triton_experts_with_the_gelu_in_the_epilogues(monkeypatch, fused, sums, grid, tma_store, sub):
    """The up projection's bias and GELU in the matmuls' epilogues (FUSED_GELU) or in kernels of their own, the
    epilogue on the whole tile or on 2 or 4 slices of its columns. The up bias's gradient from the epilogue's
    per-tile column sums (BIAS_SUMS 1 a reduction, 2 a product with ones), where a tile moved back to end at its
    expert's last row shares rows with the tile before (experts of 37 and 17 rows, tiles of 16) and must not count
    them twice; or (BIAS_SUMS 0) from programs of the weight-gradient launch, placed first or last in its grid, 8 rows
    and 16 columns at a time (several of each per expert)."""
    _under_interpreter()
    rows = (16, 32, 16, 2, 2, 2, grid, tma_store)
    monkeypatch.setattr(moe_gemm, "LAUNCH", dict(_launch(rows), up_gelu=rows + (sub,),
                                                 down_input_grad_gelu=rows + (sub,)))
    monkeypatch.setattr(moe_gemm, "FUSED_GELU", fused)
    monkeypatch.setattr(moe_gemm, "BIAS_SUMS", sums)
    monkeypatch.setattr(moe_gemm, "WEIGHT_GRAD_BIAS", (1 + grid % 2, 8, 16))
    _check_against_reference((0, 37, 0, 17, 1, 16, 0), 24, 40)


@pytest.mark.parametrize("with_down_bias", [True, False])
def test_triton_cast_params_gives_torchs_casts(monkeypatch, with_down_bias):
    """The experts' parameters cast in one launch (programs of 64 elements here, so that each tensor spans several
    and ends inside one): the same bits as ``Tensor.to``, shapes kept; no down bias, an empty fourth result."""
    _under_interpreter()
    monkeypatch.setattr(moe_gemm, "CAST_BLOCK", 64)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(*shape, generator=g) * 100 for shape in ((3, 8, 30), (3, 30), (3, 30, 8), (3, 8))]
    if not with_down_bias:
        params[3] = None
    got = torch.ops.sadiffuseq.moe_cast_params(*params, torch.float16)
    for out, want in zip(got, params):
        if want is None:
            assert out.numel() == 0
        else:
            assert out.dtype == torch.float16 and torch.equal(out, want.to(torch.float16))


def test_moe_gemm_under_the_interpreter():
    run_under_interpreter(__file__, "triton_ and not gpu")


def test_supported_says_no_without_a_hopper_gpu_or_with_unaligned_rows():
    assert not moe_gemm.supported(torch.device("cpu"), torch.bfloat16, 768, 1536)  # never bf16 on the CPU
    if not interpreting():
        assert not moe_gemm.supported(torch.device("cpu"), torch.float32, 768, 1536)
    if HOPPER:
        assert moe_gemm.supported(torch.device("cuda"), torch.bfloat16, 768, 1536)
        assert not moe_gemm.supported(torch.device("cuda"), torch.bfloat16, 768, 1537)  # 3074-byte rows


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("counts, d, H", [((0, 370, 0, 129, 1, 128, 0), 64, 200),
                                          ((2067, 1985, 2044, 2085, 1948, 2088, 2010, 2157), 768, 1536)])
@pytest.mark.parametrize("fused", [None, (False, False), (True, True)])
@pytest.mark.parametrize("small", [True, False])
def test_gpu_triton_experts_in_bf16(monkeypatch, counts, d, H, fused, small):
    """The launch settings of the layer (LAUNCH, and LAUNCH_SMALL's where set), bf16 rows and fp32 parameters,
    against float64; the GELU in the matmuls' epilogues as set (FUSED_GELU), in neither and in both."""
    if small:
        monkeypatch.setattr(moe_gemm, "LAUNCH_SMALL", LAUNCH_SMALL)
    if fused is not None:
        monkeypatch.setattr(moe_gemm, "FUSED_GELU", fused)
    t, expert, ends = _problem(counts, d, H, torch.bfloat16, "cuda")
    y, leaves = _run_triton(t, ends, torch.float32, expert, down_bias=True)
    want_y, want = _reference(t, counts, down_bias=True)
    assert y.dtype == torch.bfloat16
    # Relative to the size of each result (the weight and bias gradients sum over up to 2,000 rows).
    assert (y.double() - want_y).abs().max() <= 2e-2 * want_y.abs().max()
    for name, g in want.items():  # the down bias's too
        assert leaves[name].grad.dtype == (torch.bfloat16 if name == "rows" else torch.float32)
        assert (leaves[name].grad.double() - g).abs().max() <= 2e-2 * g.abs().max(), name


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("trans_b", [False, True])
def test_gpu_stores_through_the_descriptor_give_the_masked_stores_bits(monkeypatch, trans_b):
    """With TMA stores, rows that two tiles of one expert share are written by both: the same bits either way, so
    the result equals the masked stores' exactly (experts below, at and above a tile of 128 rows)."""
    counts, d, H = (0, 370, 0, 129, 1, 128, 127, 2048), 256, 512
    t, expert, ends = _problem(counts, d, H, torch.bfloat16, "cuda")
    w = t["w_down"] if trans_b else t["w_up"]  # (E, H, d) used transposed: d → H; (E, d, H): d → H
    outs = []
    for tma_store in (0, 1):
        for grid in (0, 1, 2):
            monkeypatch.setitem(moe_gemm.LAUNCH, "up", (128, 256, 64, 8, 3, 8, grid, tma_store))
            outs.append(torch.ops.sadiffuseq.moe_gmm(t["rows"], w, ends, trans_b, "up"))
    want = torch.cat([r.float() @ (w[e].float().t() if trans_b else w[e].float())
                      for e, r in enumerate(t["rows"].split(list(counts)))])
    assert (outs[0].float() - want).abs().max() <= 1e-2 * want.abs().max()
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0 or newer")
def test_gpu_backward_on_two_streams_gives_the_same_bits_and_captures(monkeypatch):
    """The rows' and the weights' gradients side by side on two streams: the same bits as one after the other, also
    when the backward is captured in a CUDA graph and replayed."""
    counts = (2067, 1985, 2044, 2085, 1948, 2088, 2010, 2157)
    t, expert, ends = _problem(counts, 768, 1536, torch.bfloat16, "cuda")
    results = []
    for concurrent in (False, True):
        monkeypatch.setattr(moe_gemm, "CONCURRENT_BACKWARD", concurrent)
        y, leaves = _run_triton(t, ends, torch.float32, expert)
        results.append([y] + [leaves[name].grad for name in ("rows", "w_up", "b_up", "w_down")])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    leaves = {"rows": t["rows"].clone().requires_grad_()}
    leaves.update({name: t[name].float().clone().requires_grad_() for name in ("w_up", "b_up", "w_down")})

    def step():
        for v in leaves.values():
            v.grad = None
        moe_gemm.experts_ffn(leaves["rows"], leaves["w_up"], leaves["b_up"], leaves["w_down"], expert,
                             ends).backward(t["grad"])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    for name, want in zip(("rows", "w_up", "b_up", "w_down"), results[1][1:]):
        assert torch.equal(leaves[name].grad, want), name


def test_probe_rejects_kernels_that_fail_or_disagree(monkeypatch):
    """works() compares the Triton path with a per-expert loop: a path that raises or gives other numbers is
    rejected (the probe's own logic; the loop side is plain PyTorch, so this runs anywhere)."""
    def wrong(x, w_up, b_up, w_down, expert, ends):
        return torch.zeros(x.shape[0], w_down.shape[2], dtype=x.dtype).requires_grad_()

    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    for fake in (wrong, broken):
        monkeypatch.setattr(moe_gemm, "experts_ffn", fake)
        assert not moe_gemm._probe(torch.device("cpu"), torch.float32)

    def exact(x, w_up, b_up, w_down, expert, ends):  # the same expression, row by row
        z = torch.einsum("md,mdh->mh", x, w_up[expert]) + b_up[expert]
        return torch.einsum("mh,mhd->md", F.gelu(z), w_down[expert])

    monkeypatch.setattr(moe_gemm, "experts_ffn", exact)
    assert moe_gemm._probe(torch.device("cpu"), torch.float32)


def test_layer_falls_back_when_the_kernels_do_not_work(monkeypatch):
    """auto takes the next implementation; an explicit moe_impl=triton says what failed."""
    from sadiffuseq.config import ModelConfig
    from sadiffuseq.errors import UserError
    from sadiffuseq.moe import MoEFFN

    monkeypatch.setattr(moe_gemm, "supported", lambda *args: True)
    monkeypatch.setattr(moe_gemm, "works", lambda *args: False)
    cfg = dict(d_model=16, n_heads=1, ffn="moe", moe_experts=4, moe_top_k=2)
    assert MoEFFN(ModelConfig(**cfg, moe_impl="auto")).resolve_impl(torch.device("cpu"), torch.float32) != "triton"
    with pytest.raises(UserError, match="failed to build or to match"):
        MoEFFN(ModelConfig(**cfg, moe_impl="triton")).resolve_impl(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(moe_gemm, "works", lambda *args: True)
    assert MoEFFN(ModelConfig(**cfg, moe_impl="triton")).resolve_impl(torch.device("cpu"), torch.float32) == "triton"


def test_small_problems_take_the_small_launch_settings(monkeypatch):
    """LAUNCH_SMALL replaces LAUNCH for its matmuls up to SMALL_ROWS routed rows, and only there."""
    monkeypatch.setattr(moe_gemm, "LAUNCH_SMALL", {"down": (64, 64, 32, 4, 2, 4, 0, 0)})
    cut = moe_gemm.SMALL_ROWS
    assert moe_gemm.launch_settings("down", cut) == (64, 64, 32, 4, 2, 4, 0, 0)
    assert moe_gemm.launch_settings("down", cut + 1) == moe_gemm.LAUNCH["down"]
    assert moe_gemm.launch_settings("up", 1) == moe_gemm.LAUNCH["up"]
