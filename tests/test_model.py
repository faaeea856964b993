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
