import math

import pytest
import torch

from sadiffuseq.config import DiffusionConfig, ModelConfig
from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.diffusion.samplers import nearest_embedding, respaced_timesteps, round_to_tokens, sample_x0
from sadiffuseq.model import Denoiser


class GaussianPosteriorModel(torch.nn.Module):
    """The exact x0-predictor for data x0 ~ N(mu, s^2) per coordinate under q(x_t | x0) = N(sqrt(ab) x0, 1 - ab):

    E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) * (x_t - sqrt(ab) mu).
    """

    def __init__(self, diffusion, mu, s, d=4):
        super().__init__()
        self.ab = diffusion.alphas_cumprod.float()
        self.mu, self.s = mu, s
        self.embed = torch.nn.Embedding(3, d)

    def get_embeds(self, ids):
        return torch.zeros(*ids.shape, self.embed.embedding_dim)

    def forward(self, x, t, doc_ids=None):
        ab = self.ab[t][:, None, None]
        gain = ab.sqrt() * self.s**2 / (ab * self.s**2 + 1 - ab)
        return self.mu + gain * (x - ab.sqrt() * self.mu)


def _expected_final_variance(ab0, s):
    # The last prediction is E[x0 | x_0]; its variance over x_0 ~ N(sqrt(ab0) mu, ab0 s^2 + 1 - ab0).
    return s**2 * (ab0 * s**2) / (ab0 * s**2 + 1 - ab0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_many_step_samplers_reproduce_a_gaussian_data_distribution(sampler):
    diffusion = Diffusion(DiffusionConfig(steps=200, schedule="sqrt"))
    mu, s = 1.5, 0.7
    model = GaussianPosteriorModel(diffusion, mu, s)
    ids = torch.zeros(1, 4096, dtype=torch.long)
    mask = torch.ones(1, 4096, dtype=torch.bool)
    mask[:, 0] = False
    gen = torch.Generator().manual_seed(0)
    x0 = sample_x0(model, diffusion, ids, mask, sampler, steps=200, generator=gen)
    values = x0[0, 1:].flatten()
    expected_var = _expected_final_variance(diffusion.alphas_cumprod[0].item(), s)
    assert values.mean().item() == pytest.approx(mu, abs=0.03)
    assert values.var().item() == pytest.approx(expected_var, rel=0.06)
    assert torch.equal(x0[0, 0], torch.zeros(4))  # the source position is re-imposed


def test_respacing():
    assert respaced_timesteps(2000, 2000) == list(range(1999, -1, -1))
    ts = respaced_timesteps(2000, 10)
    assert ts[0] == 1999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert respaced_timesteps(2000, 1) == [1999]
    with pytest.raises(ValueError):
        respaced_timesteps(10, 11)


def test_nearest_embedding_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 8, generator=g)
    x = torch.randn(3, 7, 8, generator=g)
    brute = emb[torch.cdist(x.reshape(-1, 8), emb).argmin(1)].view(3, 7, 8)
    assert torch.allclose(nearest_embedding(emb, x, chunk=5), brute)


def _tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_emb=16, dropout=0.0)
    return Denoiser(cfg, vocab_size=40).eval()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("clamp", [False, True])
def test_sampler_shapes_source_and_determinism(sampler, clamp):
    model = _tiny_model()
    diffusion = Diffusion(DiffusionConfig(steps=50))
    ids = torch.randint(4, 40, (3, 20))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[:, 8:] = True

    def run(seed):
        return sample_x0(model, diffusion, ids, mask, sampler, 10, clamp, torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (3, 20, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same seed, same result
    assert not torch.equal(a, c)  # the seed matters
    assert torch.equal(a[:, :8], model.get_embeds(ids)[:, :8])  # source kept exactly
    tokens = round_to_tokens(model, a, ids, mask)
    assert torch.equal(tokens[:, :8], ids[:, :8])
    if clamp:  # every clamped output is a word embedding
        assert torch.equal(nearest_embedding(model.embed.weight, a[mask]), a[mask])
