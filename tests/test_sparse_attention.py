"""SparseSelfAttention: every backend against the dense reference; the model uses it through config alone.

On a machine with a CUDA GPU the same checks run for FlexAttention forward *and* backward (fp32); on the CPU
FlexAttention runs forward only (eager), which still checks the permuted BlockMask logic.
"""

import pytest
import torch

from sadiffuseq.attention import patterns
from sadiffuseq.attention.layer import SparseSelfAttention
from sadiffuseq.config import ModelConfig, load_config
from sadiffuseq.model import AttentionContext, Denoiser, rotary_tables

CUDA = torch.cuda.is_available()

CASES = [
    # (L, heads, window, dilations, global_first, global_every, packed documents)
    (130, 4, 8, [1, 1, 4, 4], 16, 0, False),
    (300, 4, 5, [4, 1, 2, 1], 3, 50, False),  # mixed, non-contiguous per-head dilations
    (257, 2, 0, [1, 3], 1, 0, True),
    (517, 4, 16, [2, 2, 2, 2], 0, 0, True),  # no global tokens at all
    (1000, 2, 64, [1, 4], 16, 100, False),
]


def _layer(L, heads, window, dilations, first, every, backend, global_proj=False, hd=8):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=hd * heads, n_heads=heads, window=window, dilations=dilations, global_first=first,
                      global_every=every, attention="sparse", attention_backend=backend, dropout=0.0,
                      global_proj=global_proj)
    return SparseSelfAttention(cfg)


def _docs(L, B, packed, device):
    if not packed:
        return None
    g = torch.Generator().manual_seed(L)
    cuts = torch.randint(1, L, (B, 3), generator=g).sort(dim=1).values
    return (torch.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1).to(device)


def _qkv(L, heads, device, dtype=torch.float32, hd=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, heads, L, hd, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3)]


def _out_and_grads(case, backend, device="cpu", hd=8, schedule="inline"):
    """Output and q/k/v gradients of one backend on the case's fixed inputs (a fixed linear loss)."""
    L, heads, window, dilations, first, every, packed = case
    layer = _layer(L, heads, window, dilations, first, every, backend, hd=hd).to(device)
    layer.global_schedule = schedule
    q, k, v = _qkv(L, heads, device, hd=hd)
    out = layer.attend(q, k, v, _docs(L, 2, packed, device))
    (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", CASES)
def test_permuted_mask_equals_the_pattern_in_original_order(case):
    L, heads, window, dilations, first, every, packed = case
    is_global = patterns.global_positions(L, first, every)
    docs = _docs(L, 2, packed, "cpu")
    for d in set(dilations):
        layout = patterns.make_layout(is_global, d)
        permuted = patterns.dense_mask(patterns.layout_mask_mod(layout, window, docs), L, 2)
        original = patterns.dense_mask(patterns.head_mask_mod(window, d, is_global, docs), L, 2)
        inv = layout.inv
        assert torch.equal(permuted[:, inv][:, :, inv], original)
        # and the original-order mask is what the pattern says, checked literally for a few pairs
        i, j = torch.randint(0, L, (2, 200))
        for a, b in zip(i.tolist(), j.tolist()):
            local = (a - b) % d == 0 and abs(a - b) <= window * d
            same = docs is None or bool(docs[0, a] == docs[0, b])
            assert bool(original[0, a, b]) == ((local or bool(is_global[a]) or bool(is_global[b])) and same)


@pytest.mark.parametrize("case", CASES)
def test_banded_matches_dense_outputs_and_gradients(case):
    for a, b in zip(_out_and_grads(case, "dense"), _out_and_grads(case, "banded")):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["inline", "split"])
@pytest.mark.parametrize("case", CASES[:3])
def test_flex_forward_on_cpu_matches_dense(case, schedule):
    L, heads, window, dilations, first, every, packed = case
    docs = _docs(L, 2, packed, "cpu")
    with torch.no_grad():
        q, k, v = (t.detach() for t in _qkv(L, heads, "cpu"))
        ref = _layer(L, heads, window, dilations, first, every, "dense").attend(q, k, v, docs)
        layer = _layer(L, heads, window, dilations, first, every, "flex")
        layer.global_schedule = schedule
        out = layer.attend(q, k, v, docs)
    assert torch.allclose(out, ref, atol=2e-5)


@pytest.mark.skipif(not CUDA, reason="FlexAttention backward needs a CUDA GPU")
@pytest.mark.parametrize("schedule", ["inline", "split"])
@pytest.mark.parametrize("case", CASES + [(4500, 4, 256, [1, 1, 4, 4], 16, 0, True)])
def test_flex_matches_dense_on_gpu(case, schedule):
    # the fused FlexAttention kernel needs heads of width >= 16
    ref = _out_and_grads(case, "dense", "cuda", hd=16)
    for a, b in zip(ref, _out_and_grads(case, "flex", "cuda", hd=16, schedule=schedule)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (a - b).abs().max()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("schedule", ["inline", "split"])
def test_flex_gpu_does_not_recompile_for_new_documents(schedule):
    """Packed rows rebuild the BlockMask every step; the compiled region must take it as an input, not recompile."""
    import torch._dynamo

    L, heads = 1000, 4
    layer = _layer(L, heads, 64, [1, 4, 1, 4], 16, 0, "flex", hd=16).cuda()
    layer.global_schedule = schedule
    q, k, v = _qkv(L, heads, "cuda", hd=16)
    layer.attend(q, k, v, _docs(L, 2, True, "cuda")).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        layer.attend(q, k, v, _docs(L + 1, 2, True, "cuda")[:, :L]).sum().backward()


def test_separate_global_projections_replace_the_global_rows():
    L, heads = 64, 2
    layer = _layer(L, heads, 4, [1, 2], 3, 0, "banded", global_proj=True)
    x = torch.randn(1, L, 16)
    cos, sin = rotary_tables(L, 8, 10000.0, torch.device("cpu"))
    ctx = AttentionContext(cos, sin)
    y = layer(x, ctx)
    # Reference for the 3 global rows: full attention with the global projections, then the output projection.
    from sadiffuseq.model import apply_rotary

    qg, kg, vg = layer.global_qkv(x).view(1, L, 3, heads, 8).permute(2, 0, 3, 1, 4)
    qg, kg = apply_rotary(qg, cos, sin), apply_rotary(kg, cos, sin)
    att = torch.softmax(qg[:, :, :3] @ kg.transpose(-1, -2) / 8**0.5, dim=-1) @ vg
    ref = layer.out(att.transpose(1, 2).reshape(1, 3, 16))
    assert torch.allclose(y[:, :3], ref, atol=1e-5)
    # Non-global rows are the ordinary sparse pattern.
    plain = _layer(L, heads, 4, [1, 2], 3, 0, "banded")
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("global_qkv")})
    assert torch.allclose(plain(x, ctx)[:, 3:], y[:, 3:], atol=1e-6)


def test_model_switches_to_sparse_attention_by_config_alone(tmp_path):
    from conftest import tiny_overrides
    from sadiffuseq.train import train

    overrides = tiny_overrides(tmp_path, **{"model.attention": "sparse", "model.window": 4,
                                            "model.dilations": "[1,2]", "model.global_first": 2})
    cfg = load_config(None, overrides)
    run = train(cfg, progress=False, log=lambda *_: None)
    from sadiffuseq.checkpoint import load_model

    model, loaded_cfg, _ = load_model(run)
    assert loaded_cfg.model.attention == "sparse"
    assert type(model.blocks[0].attn).__name__ == "SparseSelfAttention"
    dense = Denoiser(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_emb=16), 300)
    assert type(dense.blocks[0].attn).__name__ == "DenseSelfAttention"


def test_sparse_denoiser_equals_dense_denoiser_when_the_window_covers_everything():
    torch.manual_seed(0)
    base = dict(d_model=32, n_layers=2, n_heads=2, d_emb=8, dropout=0.0)
    dense = Denoiser(ModelConfig(**base), 50)
    sparse = Denoiser(ModelConfig(**base, attention="sparse", window=100, attention_backend="banded"), 50)
    sparse.load_state_dict(dense.state_dict())
    x, t = torch.randn(2, 40, 8), torch.tensor([3, 900])
    assert torch.allclose(dense(x, t), sparse(x, t), atol=1e-5)


def _dense_flex(q, k, v, block_mask, return_lse=False):
    """FlexAttention's math with autograd: softmax over the BlockMask's own mask_mod (per batch row and head),
    materialised densely. Rows without keys (global query rows under the split schedule) give 0 and lse = -inf,
    as in FlexAttention."""
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    qi = torch.arange(Lq)[:, None]
    ki = torch.arange(Lk)[None, :]
    mask = torch.stack([torch.stack([block_mask.mask_mod(torch.tensor(b), torch.tensor(h), qi, ki)
                                     for h in range(H)]) for b in range(B)])
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1)[..., None]
    out = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0) @ v
    return (out, scores.logsumexp(-1)) if return_lse else out


@pytest.mark.parametrize("schedule", ["inline", "split"])
@pytest.mark.parametrize("case", CASES)
def test_flex_path_matches_dense_including_gradients(case, schedule, monkeypatch):
    """Everything the flex backend does around the kernel computes the pattern, forward and backward: each
    head's own token order (the per-head permutation and its gradient), the head-dependent BlockMask, and under
    the split schedule the band-only mask, the log-sum-exp merge with the global keys, the global rows and the
    documents.

    On the CPU, FlexAttention has no backward, so the kernel is replaced by the same math over the BlockMask's
    own mask_mod with autograd.
    """
    from sadiffuseq.attention import backends

    monkeypatch.setattr(backends, "_flex", _dense_flex)
    for a, b in zip(_out_and_grads(case, "dense"), _out_and_grads(case, "flex", schedule=schedule)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["inline", "split"])
def test_flex_runs_every_head_of_a_layer_in_one_kernel_call(schedule, monkeypatch):
    """Mixed dilations (interleaved heads) must not fall back to one call per group of heads: the kernel sees all
    heads at once, each head's BlockMask row following its own dilation."""
    from sadiffuseq.attention import backends

    calls = []

    def counting_flex(q, k, v, block_mask, return_lse=False):
        calls.append(q.shape)
        return _dense_flex(q, k, v, block_mask, return_lse)

    monkeypatch.setattr(backends, "_flex", counting_flex)
    case = (300, 4, 5, [4, 1, 2, 1], 3, 0, False)
    out = _out_and_grads(case, "flex", schedule=schedule)[0]
    assert calls == [torch.Size([2, 4, 300, 8])]
    assert torch.allclose(out, _out_and_grads(case, "dense")[0], atol=2e-5)


def test_split_epilogue_by_hand_with_documents():
    """Four positions, one global token (position 0), documents [0, 0, 1, 1], chunks of 2 positions. Rows 2 and 3
    see no global key (it is in another document): the merge must return their band output unchanged, not NaN.
    Row 1 mixes its band with global key 0; the global row 0 attends to keys 0 and 1."""
    from sadiffuseq.attention.backends import split_epilogue

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 2, generator=g).requires_grad_() for _ in range(3))
    out_b, lse_b = torch.randn(1, 1, 4, 2, generator=g).requires_grad_(), torch.randn(1, 1, 4, generator=g)
    out = split_epilogue(q, k, v, out_b, lse_b, 1, docs=torch.tensor([[0, 0, 1, 1]]), chunk=2)[0, 0]
    assert torch.equal(out[2:], out_b[0, 0, 2:])
    s10 = float(q[0, 0, 1].detach() @ k[0, 0, 0].detach()) / 2 ** 0.5
    w = torch.tensor([float(lse_b[0, 0, 1]), s10]).softmax(0)
    assert torch.allclose(out[1], w[0] * out_b[0, 0, 1] + w[1] * v[0, 0, 0], atol=1e-6)
    p = (k[0, 0, :2] @ q[0, 0, 0] / 2 ** 0.5).softmax(0)
    assert torch.allclose(out[0], p @ v[0, 0, :2], atol=1e-6)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, out_b))


def test_auto_schedule_switches_to_split_for_long_sequences():
    from sadiffuseq.attention.backends import SPLIT_FROM_LENGTH, resolve_schedule

    assert resolve_schedule("auto", SPLIT_FROM_LENGTH - 1) == "inline"
    assert resolve_schedule("auto", SPLIT_FROM_LENGTH) == "split"
    assert resolve_schedule("inline", 10**6) == "inline"
    with pytest.raises(ValueError, match="unknown global-token schedule"):
        resolve_schedule("diagonal", 10)


def test_auto_compile_mode_autotunes_long_sequences_only():
    from sadiffuseq.attention.backends import SPLIT_FROM_LENGTH, resolve_compile_mode

    assert resolve_compile_mode("auto", SPLIT_FROM_LENGTH - 1) == "default"
    assert resolve_compile_mode("auto", SPLIT_FROM_LENGTH) == "max-autotune-no-cudagraphs"
    assert resolve_compile_mode("reduce-overhead", 10**6) == "reduce-overhead"
