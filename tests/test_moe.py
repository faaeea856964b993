"""Mixture-of-Experts feed-forward: dispatch, grouped vs loop matmuls, per-token reference, capacity, balancing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sadiffuseq.config import ModelConfig, load_config
from sadiffuseq.errors import UserError
from sadiffuseq.model import DenseFFN, Denoiser
from sadiffuseq.moe import (
    MoEFFN,
    capacity_of,
    dispatch,
    experts_forward,
    grouped_mm_supported,
    loop_matmul,
    top_k_indices,
)

from conftest import tiny_overrides

CPU = torch.device("cpu")
GROUPED_OK = grouped_mm_supported(CPU, torch.float32)
needs_grouped = pytest.mark.skipif(
    not GROUPED_OK,
    reason=f"torch._grouped_mm unavailable or unsupported for fp32 on CPU in torch {torch.__version__}",
)
IMPLS = ["loop", pytest.param("grouped", marks=needs_grouped)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread (and the suite shares two cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def moe_cfg(**kw) -> ModelConfig:
    base = dict(d_model=16, n_layers=2, n_heads=2, d_emb=8, dropout=0.0, ffn="moe", moe_experts=4, moe_top_k=2)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def reference_moe(moe: MoEFFN, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Token by token: softmax over the router logits, the top-k experts, their gate-weighted FFN outputs. With a
    capacity, each expert serves the first ``capacity`` tokens (in token order) that chose it."""
    outs, served = [], [0] * moe.n_experts
    for xn in x:
        p = torch.softmax(moe.router.weight @ xn, -1)
        top = torch.topk(p, moe.top_k).indices
        g = p[top] / p[top].sum() if moe.top_k > 1 else p[top]
        y = torch.zeros_like(xn)
        for gate, e in zip(g, top.tolist()):
            served[e] += 1
            if capacity is not None and served[e] > capacity:
                continue
            y = y + gate * (F.gelu(xn @ moe.w_up[e] + moe.b_up[e]) @ moe.w_down[e] + moe.b_down[e])
        if moe.shared is not None:
            y = y + moe.shared(xn)
        outs.append(y)
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------------------------
# Dispatch and expert matmuls


def test_dispatch_sorts_pairs_by_expert_in_token_order():
    experts = torch.tensor([[2, 0], [0, 1], [2, 3], [0, 2]])  # (N=4, k=2)
    d = dispatch(experts, 5)
    assert d.expert.tolist() == [0, 0, 0, 1, 2, 2, 2, 3]
    assert d.token.tolist() == [0, 1, 3, 1, 0, 2, 3, 2]  # stable: token order inside each expert
    assert torch.equal(experts.reshape(-1)[d.pair], d.expert)
    assert d.routed.tolist() == [3, 1, 3, 1, 0] and torch.equal(d.counts, d.routed) and int(d.dropped) == 0
    capped = dispatch(experts, 5, capacity=2)  # experts 0 and 2 lose their last pair (tokens 3 and 3)
    assert capped.token.tolist() == [0, 1, 1, 0, 2, 2] and capped.counts.tolist() == [2, 1, 2, 1, 0]
    assert int(capped.dropped) == 2
    # slot inverts pair: every kept pair finds its own sorted row; dropped pairs are marked
    assert torch.equal(d.pair[d.slot], torch.arange(8)) and d.kept is None
    assert capped.kept.tolist() == [True, True, True, True, True, True, False, False]
    assert torch.equal(capped.pair[capped.slot[capped.kept]], torch.arange(8)[capped.kept])
    assert capacity_of(0.0, 10, 2, 4) is None and capacity_of(1.0, 10, 2, 4) == 5 and capacity_of(1.25, 10, 2, 4) == 7


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k_indices_are_torch_topk_indices(k):
    scores = torch.randn(50, 8, generator=torch.Generator().manual_seed(k))
    assert torch.equal(top_k_indices(scores, k), scores.topk(k, dim=-1).indices)
    assert top_k_indices(torch.tensor([[0.1, 0.7, 0.2]]), 2).tolist() == [[1, 2]]


def _sorted_problem(seed=0, counts=(5, 0, 9, 3), d=16, h=32):
    g = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    params = [
        torch.randn(M, d, generator=g),
        torch.randn(E, d, h, generator=g) / d**0.5,
        torch.randn(E, h, generator=g),
        torch.randn(E, h, d, generator=g) / h**0.5,
        torch.randn(E, d, generator=g),
    ]
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    return [p.requires_grad_() for p in params], expert, torch.tensor(counts)


def test_loop_matmul_matches_explicit_slices():
    (x, w_up, b_up, w_down, b_down), expert, counts = _sorted_problem()
    y = experts_forward(x, expert, counts, w_up, b_up, w_down, b_down, "loop")
    rows = [F.gelu(x[i] @ w_up[e] + b_up[e]) @ w_down[e] + b_down[e] for i, e in enumerate(expert.tolist())]
    assert torch.allclose(y, torch.stack(rows), atol=1e-5)
    assert loop_matmul(x[:0], w_up, [0, 0, 0, 0]).shape == (0, 32)


@needs_grouped
def test_grouped_and_loop_dispatch_give_the_same_outputs_and_gradients():
    outs = {}
    for impl in ("grouped", "loop"):
        params, expert, counts = _sorted_problem(seed=1)
        y = experts_forward(params[0], expert, counts, *params[1:], impl)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[impl] = [y.detach()] + [p.grad for p in params]
    for a, b in zip(outs["grouped"], outs["loop"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.all(outs["grouped"][2][1] == 0)  # the empty expert gets a zero gradient in both paths


def test_forcing_grouped_where_unsupported_is_a_clear_error():
    cfg = ModelConfig(d_model=18, n_heads=2, ffn="moe", moe_experts=2, moe_top_k=1, moe_impl="grouped")
    moe = MoEFFN(cfg)  # fp32 rows of 18 (and 72) floats are not multiples of 16 bytes
    with pytest.raises(UserError, match="model.moe_impl=grouped"):
        moe(torch.randn(4, 18))
    cfg.moe_impl = "auto"
    assert MoEFFN(cfg)(torch.randn(4, 18)).shape == (4, 18)  # auto falls back to the loop


# ---------------------------------------------------------------------------------------------------------
# The module against independent references


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k, shared", [(2, False), (1, False), (3, True)])
def test_moe_equals_the_per_token_reference_and_drops_nothing(impl, top_k, shared):
    torch.manual_seed(0)
    moe = MoEFFN(moe_cfg(moe_top_k=top_k, moe_shared_expert=shared, moe_impl=impl))
    x = torch.randn(2, 13, 16)
    y = moe(x)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(-1, 16), reference_moe(moe, x.reshape(-1, 16)), atol=1e-5)
    stats = moe.last_stats
    assert int(stats["dropped"]) == 0 and (y.abs().sum(-1) > 0).all()
    assert math.isclose(float(stats["load"].sum()), 1.0, rel_tol=1e-6)
    assert 0 < float(stats["entropy"]) <= math.log(4) + 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("capacity_factor", [0.0, 0.6])
def test_moe_gradients_equal_the_per_token_reference(impl, capacity_factor):
    torch.manual_seed(1)
    moe = MoEFFN(moe_cfg(moe_impl=impl, moe_capacity_factor=capacity_factor))
    x = torch.randn(30, 16, requires_grad=True)
    weights = torch.randn(30, 16)
    grads = []
    for forward in (moe, lambda t: reference_moe(moe, t, capacity_of(capacity_factor, 30, 2, 4))):
        (forward(x) * weights).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
        x.grad = None
        moe.zero_grad()
    assert (int(moe.last_stats["dropped"]) > 0) == (capacity_factor > 0)
    for (name, _), a, b in zip([("x", None), *moe.named_parameters()], *grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


@needs_grouped
def test_grouped_and_loop_modules_agree_with_gradients():
    results = []
    for impl in ("grouped", "loop"):
        torch.manual_seed(3)
        moe = MoEFFN(moe_cfg(moe_impl=impl, moe_shared_expert=True, moe_ffn_mult=2.0))
        x = torch.randn(40, 16, requires_grad=True)
        y = moe(x)
        (y.pow(2).sum() + moe.last_aux["balance"] + moe.last_aux["z"]).backward()
        results.append([y.detach(), x.grad] + [p.grad for p in moe.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_gradients_reach_the_router_and_every_used_expert():
    torch.manual_seed(0)
    moe = MoEFFN(moe_cfg())
    x = torch.randn(64, 16)
    moe(x).pow(2).mean().backward()  # the task loss alone (no auxiliary loss) must train the router
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    used = moe.last_stats["load"] > 0
    assert (moe.w_up.grad.flatten(1).abs().sum(1)[used] > 0).all()


def test_capacity_drops_the_hand_computed_pairs():
    # Router = identity on the first 4 input dimensions; token n is 10·onehot(a) + 5·onehot(b) → experts (a, b).
    cfg = moe_cfg(d_model=8, moe_capacity_factor=1.0)
    moe = MoEFFN(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8))
    choices = [(0, 1), (0, 1), (0, 1), (0, 2), (2, 3), (2, 3)]
    x = torch.stack([10 * F.one_hot(torch.tensor(a), 8) + 5 * F.one_hot(torch.tensor(b), 8) for a, b in choices]).float()
    # capacity = ceil(1.0 · 6 tokens · 2 / 4) = 3; expert 0 is asked 4 times: token 3's pair is the 4th → dropped.
    y = moe(x)
    assert int(moe.last_stats["dropped"]) == 1
    assert moe.last_stats["load"].tolist() == pytest.approx([4 / 12, 3 / 12, 3 / 12, 2 / 12])  # routed, pre-drop
    ref = reference_moe(moe, x)
    assert torch.allclose(y[[0, 1, 2, 4, 5]], ref[[0, 1, 2, 4, 5]], atol=1e-5)
    p = torch.softmax(moe.router.weight @ x[3], -1)
    gate2 = p[2] / (p[0] + p[2])  # gates are not renormalised after the drop
    ffn2 = F.gelu(x[3] @ moe.w_up[2] + moe.b_up[2]) @ moe.w_down[2] + moe.b_down[2]
    assert torch.allclose(y[3], gate2 * ffn2, atol=1e-5)

    # top-1: six tokens want expert 0, capacity ceil(0.5 · 8 · 1 / 4) = 1 → 5 of them dropped (zero output).
    moe1 = MoEFFN(moe_cfg(d_model=8, moe_top_k=1, moe_capacity_factor=0.5))
    with torch.no_grad():
        moe1.router.weight.copy_(torch.eye(4, 8))
    x1 = 10 * F.one_hot(torch.tensor([0, 0, 0, 0, 0, 0, 1, 2]), 8).float()
    y1 = moe1(x1)
    assert int(moe1.last_stats["dropped"]) == 5
    assert (y1[1:6] == 0).all() and (y1[[0, 6, 7]].abs().sum(-1) > 0).all()


def test_one_expert_top_one_is_the_dense_ffn():
    torch.manual_seed(0)
    cfg = moe_cfg(moe_experts=1, moe_top_k=1)
    dense, moe = DenseFFN(cfg), MoEFFN(cfg)
    assert moe.hidden == dense.up.out_features
    with torch.no_grad():
        moe.w_up[0].copy_(dense.up.weight.t())
        moe.b_up[0].copy_(dense.up.bias)
        moe.w_down[0].copy_(dense.down.weight.t())
        moe.b_down[0].copy_(dense.down.bias)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y_moe = moe(x)
    (gm,) = torch.autograd.grad(y_moe.sum(), x)
    y_dense = dense(x)
    (gd,) = torch.autograd.grad(y_dense.sum(), x)
    assert torch.allclose(y_moe, y_dense, atol=1e-6) and torch.allclose(gm, gd, atol=1e-6)


def test_bf16_autocast_runs_in_bf16_and_stays_close():
    torch.manual_seed(0)
    moe = MoEFFN(moe_cfg(d_model=32))
    x = torch.randn(50, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16 and moe.last_stats["load"].dtype == torch.float32  # router stays fp32
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------------
# Balancing


def _toy_balance(aux_weight: float, bias_update: float = 0.0, steps: int = 200) -> torch.Tensor:
    """Regress a random tanh teacher with one MoE layer (E=8, top-2) whose router starts collapsed: input
    feature 0 is a constant 1 and the router's weight on it favours experts 0 and 1 by +3 logits. Returns the
    mean load over the last 50 steps."""
    torch.manual_seed(0)
    d = 16
    moe = MoEFFN(moe_cfg(moe_experts=8, moe_top_k=2, moe_bias_update=bias_update, moe_impl="loop"))
    with torch.no_grad():
        moe.router.weight[:2, 0] += 3.0
    teacher = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, d))
    opt = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=3e-3)
    loads = []
    for _ in range(steps):
        x = torch.randn(256, d)
        x[:, 0] = 1.0
        with torch.no_grad():
            target = teacher(x)
        moe.apply_bias_update()  # what Denoiser.forward does at the start of each training forward
        loss = (moe(x) - target).pow(2).mean() + aux_weight * moe.last_aux["balance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        loads.append(moe.last_stats["load"])
    return torch.stack(loads[-50:]).mean(0)


def _cv(load: torch.Tensor) -> float:
    return float(load.std() / load.mean())


def test_balance_loss_and_bias_balancing_undo_a_collapsed_router():
    plain = _toy_balance(0.0)
    balanced = _toy_balance(0.01)  # the default moe_aux_weight
    bias = _toy_balance(0.0, bias_update=0.01)
    print(f"CV of expert load: no balancing {_cv(plain):.3f}, balance loss {_cv(balanced):.3f}, bias {_cv(bias):.3f}")
    # Without balancing the two favoured experts keep every token: 6 of 8 experts stay dead (CV = sqrt(3)·... ≈ 1.85).
    assert (plain < 0.01).sum() >= 6 and _cv(plain) > 1.5
    # Measured (seed 0, torch 2.13 CPU): CV 1.85 → 0.65 with the balance loss, → 0.03 with bias balancing.
    assert _cv(balanced) < 0.5 * _cv(plain) and balanced.min() > 0.03
    assert _cv(bias) < 0.15


# ---------------------------------------------------------------------------------------------------------
# Inside the denoiser and the training loop


def test_moe_layers_choose_the_blocks_and_aux_losses_sum_over_them():
    torch.manual_seed(0)
    model = Denoiser(moe_cfg(n_layers=3, moe_layers=[0, 2]), vocab_size=40)
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["MoEFFN", "DenseFFN", "MoEFFN"] and [m.layer for m in model.moe_modules()] == [0, 2]
    assert Denoiser(moe_cfg(ffn="dense"), 40).aux_losses() is None
    model(torch.randn(2, 9, 8), torch.tensor([3, 50]))
    aux = model.aux_losses()
    assert set(aux) == {"moe_aux", "moe_z"} and aux["moe_aux"][1] == 0.01 and aux["moe_z"][1] == 0.001
    expected = model.blocks[0].ffn.last_aux["balance"] + model.blocks[2].ffn.last_aux["balance"]
    assert torch.allclose(aux["moe_aux"][0], expected)
    assert set(model.moe_stats()) == {0, 2}


def test_checkpointed_blocks_route_like_plain_ones_with_bias_balancing():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Denoiser(moe_cfg(grad_checkpoint=ckpt, moe_bias_update=0.05), vocab_size=40).train()
        x, t = torch.randn(2, 9, 8), torch.tensor([3, 50])
        for _ in range(3):  # the 2nd and 3rd forwards apply the bias update of the previous one
            model.zero_grad()
            model(x, t).pow(2).sum().backward()
        grads.append([model.blocks[0].ffn.route_bias.clone()] + [p.grad for p in model.parameters() if p.requires_grad])
    assert grads[0][0].abs().sum() > 0
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.ffn=mo", "model.ffn='mo' is not one of: dense, moe"),
        ("--model.moe_top_k=9", "model.moe_top_k=9 exceeds model.moe_experts=8"),
        ("--model.moe_experts=0", "model.moe_experts=0 must be positive"),
        ("--model.moe_layers=[0,12]", r"model.moe_layers=\[0, 12\] must list distinct layer indices in \[0, 11\]"),
        ("--model.moe_layers=[1,1]", "must list distinct layer indices"),
        ("--model.moe_layers=3", "model.moe_layers=3 has the wrong type"),
        ("--model.moe_capacity_factor=-1", "model.moe_capacity_factor=-1.0 must not be negative"),
        ("--model.moe_bias_update=-0.1", "model.moe_bias_update=-0.1 must not be negative"),
        ("--model.moe_impl=fast", "model.moe_impl='fast' is not one of: auto, triton, grouped, loop"),
    ],
)
def test_bad_moe_settings_name_the_key(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(None, [override])


def test_tiny_moe_training_logs_expert_load_and_reloads(tmp_path):
    from sadiffuseq.checkpoint import load_model
    from sadiffuseq.train import train

    extra = {"model.ffn": "moe", "model.moe_experts": 4, "model.moe_bias_update": 0.001, "model.moe_layers": "[1]"}
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    run = train(cfg, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6
    for r in steps:
        assert "moe_load_l0" not in r and len(r["moe_load_l1"]) == 4
        assert sum(r["moe_load_l1"]) == pytest.approx(1.0, abs=1e-4)
        assert 0 < r["moe_entropy_l1"] <= math.log(4) + 1e-6 and r["moe_dropped_l1"] == 0
        assert r["moe_aux"] >= 1.0 - 1e-4 and r["moe_z"] > 0  # Switch loss: 1.0 at perfect balance, one layer
    assert (run / "expert_load.png").stat().st_size > 1000
    model, _, _ = load_model(run, weights="ema")  # the balancing bias travels with the EMA weights
    assert model.blocks[1].ffn.route_bias.abs().sum() > 0
    out = model(torch.randn(2, 10, cfg.model.d_emb), torch.tensor([1, 50]))
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not grouped_mm_supported(CPU, torch.bfloat16), reason="no bf16 torch._grouped_mm on this CPU torch")
def test_dropless_layer_compiles_to_one_graph_without_host_syncs():
    """Dropless dispatch has static shapes and no data-dependent sizes (no bincount, no boolean indexing), so
    ``torch.compile`` captures the whole layer, forward and backward, as one graph: no graph breaks, and no
    device-to-host sync that would stall the GPU behind the CPU in the middle of the layer."""
    torch._dynamo.reset()
    moe = MoEFFN(moe_cfg(d_model=64, moe_experts=8)).train()
    x = torch.randn(1, 96, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.resolve_impl(CPU, torch.bfloat16, traced=True) == "grouped"
        explained = torch._dynamo.explain(moe.routed_forward)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.skipif(not grouped_mm_supported(CPU, torch.bfloat16), reason="no bf16 torch._grouped_mm on this CPU torch")
def test_compiled_blocks_trace_the_dropless_layer_into_their_graphs():
    """A compiled block traces a dropless MoE layer on the grouped matmuls into its own graph (one graph, no
    break) and gives the eager model's outputs, gradients and auxiliary losses."""
    import copy

    cfg = moe_cfg(d_model=64, n_heads=4, moe_experts=8, moe_layers=[1])
    torch.manual_seed(0)
    eager = Denoiser(cfg, 50)
    compiled = copy.deepcopy(eager).compile_blocks(backend="aot_eager")
    x, t = torch.randn(2, 40, cfg.d_emb), torch.tensor([3, 900])
    results = []
    for model in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, t)
            aux = model.aux_losses()
        (y.float().square().sum() + aux["moe_aux"][0]).backward()
        results.append([y.detach().float(), aux["moe_aux"][0].detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    args = {}
    hook = eager.blocks[1].register_forward_pre_hook(lambda module, a: args.setdefault("block", a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager(x, t)
        hook.remove()
        explained = torch._dynamo.explain(eager.blocks[1])(*args["block"])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_gpu_compiled_layer_matches_eager(capacity_factor):
    """On the GPU in bf16: the layer compiled by inductor (grouped matmuls, fused bias + GELU backward kernel, the
    gather written as a scatter) gives the eager layer's output and every gradient, the input's included."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MoEFFN(moe_cfg(d_model=256, moe_experts=8, moe_capacity_factor=capacity_factor)).cuda().train()
    compiled = copy.deepcopy(eager).compile_routed()
    x0 = torch.randn(1, 1000, 256, device="cuda")
    weights = torch.randn(1, 1000, 256, device="cuda")
    results = []
    for layer in (eager, compiled):
        x = x0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * weights).sum().backward()
        results.append([y.detach().float(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*results):
        scale = a.abs().max()
        assert (b - a).abs().max() <= 2e-2 * scale + 1e-3
    assert results[0][1].abs().max() > 0  # the input gradient exists (the test can fail)
