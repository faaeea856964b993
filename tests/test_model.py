import pytest
import torch

from sadiffuseq.config import ModelConfig
from sadiffuseq.model import AttentionContext, DenseSelfAttention, Denoiser, apply_rotary, rotary_tables


def test_rotary_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = rotary_tables(40000, 16, 10000.0, torch.device("cpu"))

    def score(i, j):
        return (apply_rotary(q, cos[i : i + 1], sin[i : i + 1]) * apply_rotary(k, cos[j : j + 1], sin[j : j + 1])).sum()

    assert torch.allclose(score(3, 10), score(103, 110), atol=1e-4)
    assert torch.allclose(score(3, 10), score(33003, 33010), atol=1e-3)  # far beyond any training length
    assert not torch.allclose(score(3, 10), score(3, 11), atol=1e-3)
    assert torch.allclose(score(0, 0), (q * k).sum(), atol=1e-6)  # position 0 is the identity rotation


def test_packed_rows_attend_only_within_their_document():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, dropout=0.0)
    attn = DenseSelfAttention(cfg).eval()
    x = torch.randn(1, 10, 32)
    cos, sin = rotary_tables(10, 8, 10000.0, torch.device("cpu"))
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    packed = attn(x, AttentionContext(cos, sin, doc))
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        # Each document alone, at its own positions (rotary is relative, so the offset does not matter).
        alone = attn(x[:, lo:hi], AttentionContext(cos[: hi - lo], sin[: hi - lo]))
        assert torch.allclose(packed[:, lo:hi], alone, atol=1e-5)


def test_denoiser_shapes_and_tied_head():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_emb=8, dropout=0.0)
    model = Denoiser(cfg, vocab_size=50)
    x = torch.randn(3, 17, 8)
    out = model(x, torch.tensor([0, 5, 1999]))
    assert out.shape == (3, 17, 8)
    logits = model.get_logits(out)
    assert torch.allclose(logits, out @ model.embed.weight.t())
    cfg.grad_checkpoint = True
    model.train()
    model(x, torch.tensor([1, 2, 3])).sum().backward()  # checkpointed blocks still give gradients
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_compiled_blocks_match_eager_model_and_keep_parameter_names():
    """Regional compilation (train.compile) changes speed, not numbers or checkpoint keys: sparse attention and
    MoE (a compiled graph of its own, called from the block's), against the same model run eagerly."""
    import copy

    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, d_emb=8, attention="sparse", window=4, dilations=[1, 2],
                      ffn="moe", moe_experts=4, moe_top_k=2, moe_layers=[1], dropout=0.0)
    torch.manual_seed(0)
    eager = Denoiser(cfg, 50)
    # aot_eager: dynamo's capture and graph breaks and AOTAutograd's backward, without Inductor's slow C++ codegen
    compiled = copy.deepcopy(eager).compile_blocks(backend="aot_eager")
    x, t = torch.randn(2, 37, 8), torch.tensor([3, 900])
    y_eager, y_compiled = eager(x, t), compiled(x, t)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for (name, p), (name_c, p_c) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert name == name_c
        torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    moe = compiled.blocks[1].ffn
    assert moe._compiled is not None and moe.last_aux and eager.blocks[1].ffn._compiled is None


def _flex_model(schedule: str, **kw) -> Denoiser:
    base = dict(d_model=64, n_heads=4, n_layers=2, d_emb=8, attention="sparse", attention_backend="flex", window=8,
                dilations=[1, 2, 1, 2], global_first=2, flex_globals=schedule, dropout=0.0)
    cfg = ModelConfig(**{**base, **kw})
    torch.manual_seed(0)
    return Denoiser(cfg, 50)


@pytest.mark.parametrize("schedule", ["inline", "split"])
def test_compiled_blocks_trace_the_flex_attention_into_one_graph(schedule):
    """With the attention planned before the blocks (AttentionContext.plans), a compiled block traces the whole
    sparse attention into its graph — no graph break, same numbers (packed documents included). FlexAttention has
    no CPU backward, so forward only here; tests/test_sparse_attention.py covers gradients on a GPU."""
    import copy

    eager = _flex_model(schedule)
    compiled = copy.deepcopy(eager).compile_blocks(backend="aot_eager")
    x, t = torch.randn(2, 300, 8), torch.tensor([3, 900])
    docs = torch.tensor([[0] * 150 + [1] * 150, [0] * 300])
    with torch.no_grad():
        for doc_ids in (None, docs):
            torch.testing.assert_close(compiled(x, t, doc_ids), eager(x, t, doc_ids), rtol=1e-5, atol=1e-5)
        args = {}
        hook = eager.blocks[0].register_forward_pre_hook(lambda module, a: args.setdefault("block", a))
        eager(x, t, docs)
        hook.remove()
        explained = torch._dynamo.explain(eager.blocks[0])(*args["block"])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_layers_of_one_pattern_share_a_plan():
    model = _flex_model("auto", n_layers=3, layer_windows=[8, 16, 8])
    plans = model._plans(300, torch.device("cpu"), None, 1)
    assert len(plans) == 2  # windows 8 and 16
    first, third = (model.blocks[i].attn.plan_key for i in (0, 2))
    assert first == third and plans[first].in_block_graph and plans[first].n_global == 0  # inline below 16k
    dense = Denoiser(ModelConfig(d_model=32, n_heads=2, n_layers=1, d_emb=8), 50)
    assert dense._plans(300, torch.device("cpu"), None, 1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs a CUDA GPU")
@pytest.mark.parametrize("schedule", ["inline", "split"])
def test_compiled_model_with_attention_in_the_block_graphs_matches_eager_on_gpu(schedule):
    """Forward and backward of compiled blocks that trace the flex attention, against the eager model; a new packed
    batch (a new BlockMask, an input of the graph) must not recompile."""
    import copy

    import torch._dynamo

    eager = _flex_model(schedule).cuda()
    compiled = copy.deepcopy(eager).compile_blocks()
    x, t = torch.randn(2, 1000, 8, device="cuda"), torch.tensor([3, 900], device="cuda")
    docs = torch.tensor([[0] * 400 + [1] * 600, [0] * 1000], device="cuda")
    for model in (eager, compiled):
        model(x, t, docs).square().sum().backward()
    for (name, p), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, t, torch.tensor([[0] * 700 + [1] * 300, [0] * 1000], device="cuda")).square().sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_sparse_moe_model_matches_eager_in_bf16_on_gpu():
    """The model as training runs it on a GPU — bf16 autocast, flex attention and dropless MoE both traced into
    the compiled blocks — against the eager model; a second step must not recompile."""
    import copy

    import torch._dynamo

    eager = _flex_model("auto", ffn="moe", moe_experts=4, moe_top_k=2, moe_layers=[1]).cuda()
    compiled = copy.deepcopy(eager).compile_blocks()
    x, t = torch.randn(2, 1000, 8, device="cuda"), torch.tensor([3, 900], device="cuda")

    def step(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x, t)
            loss = y.float().square().mean() + model.aux_losses()["moe_aux"][0]
        loss.backward()
        return y.detach().float()

    torch.testing.assert_close(step(compiled), step(eager), rtol=2e-2, atol=2e-2)
    for (name, p), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=5e-2, atol=5e-3, msg=name)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_flash_model_matches_eager_in_bf16_on_gpu():
    """The flash backend (FlashAttention-2 band, run between the compiled parts of each block) in bf16: compiled
    against eager, with packed documents, and both against the flex backend."""
    import copy

    eager = _flex_model("auto", attention_backend="flash").cuda()
    compiled = copy.deepcopy(eager).compile_blocks()
    flex = copy.deepcopy(eager)
    for block in flex.blocks:
        block.attn.backend = "flex"
    x, t = torch.randn(2, 1000, 8, device="cuda"), torch.tensor([3, 900], device="cuda")
    docs = torch.tensor([[0] * 400 + [1] * 600, [0] * 1000], device="cuda")

    def step(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x, t, docs)
        y.float().square().mean().backward()
        return y.detach().float()

    reference = step(flex)
    torch.testing.assert_close(step(eager), reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(step(compiled), reference, rtol=2e-2, atol=2e-2)
    for (name, p), p_c, p_f in zip(eager.named_parameters(), compiled.parameters(), flex.parameters()):
        torch.testing.assert_close(p.grad, p_f.grad, rtol=5e-2, atol=5e-3, msg=name)
        torch.testing.assert_close(p_c.grad, p_f.grad, rtol=5e-2, atol=5e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs a CUDA GPU")
def test_compiled_model_with_attention_in_the_block_graphs_takes_new_lengths_on_gpu():
    """Bucketed batches change the length from step to step: the compiled blocks (which then compile with dynamic
    shapes) must keep matching the eager model, attention traced in."""
    import copy

    eager = _flex_model("auto").cuda()
    compiled = copy.deepcopy(eager).compile_blocks()
    for length in (1000, 1200, 1304):
        x, t = torch.randn(2, length, 8, device="cuda"), torch.tensor([3, 900], device="cuda")
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            model(x, t).square().sum().backward()
        for (name, p), p_c in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-3, atol=1e-4, msg=f"{length}: {name}")
