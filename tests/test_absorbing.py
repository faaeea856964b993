"""The soft absorbing state (DiffuSeq-v2): noising, stratified absorption, loss terms, sampling, config, training."""

import json
import math

import pytest
import torch

from sadiffuseq.config import DiffusionConfig, ModelConfig, load_config
from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.diffusion.samplers import sample_x0, sampling_timesteps
from sadiffuseq.errors import UserError
from sadiffuseq.model import Denoiser

from conftest import tiny_overrides


def _diffusion(**kw) -> Diffusion:
    base = {"steps": 100, "absorbing": True, "absorb_gamma": 0.5, "absorb_protect_global": 4}
    base.update(kw)
    return Diffusion(DiffusionConfig(**base))


def _varied_mask(B: int, L: int, seed: int = 0) -> torch.Tensor:
    """Target masks with source lengths 1..29, so some rows have targets inside the protected prefix."""
    g = torch.Generator().manual_seed(seed)
    src_len = torch.randint(1, 30, (B,), generator=g)
    return torch.arange(L)[None, :] >= src_len[:, None]


def _is_m(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x == m).all(-1)


# -- forward process ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 10, 50, 99])
def test_absorbed_fraction_matches_gamma_sqrt_one_minus_abar(t):
    torch.manual_seed(t)
    diff = _diffusion()
    B, L, d = 64, 128, 4
    x0, m = torch.randn(B, L, d), torch.randn(d) + 3.0
    mask = _varied_mask(B, L)
    x_t = diff.noise_inputs(x0, torch.full((B,), t), mask, absorb=m)
    eligible = mask.clone()
    eligible[:, :4] = False
    n = int(eligible.sum())
    k = int(_is_m(x_t, m)[eligible].sum())
    p = 0.5 * math.sqrt(1 - diff.alphas_cumprod[t].item())
    assert diff.absorb_prob(torch.tensor([t])).item() == pytest.approx(p, rel=1e-6)
    assert abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def test_source_and_protected_positions_are_never_absorbed():
    torch.manual_seed(0)
    diff = _diffusion(absorb_gamma=1.0, absorb_protect_global=6)
    B, L, d = 32, 64, 4
    x0, m = torch.randn(B, L, d), torch.randn(d)
    mask = _varied_mask(B, L)
    for _ in range(5):
        x_t = diff.noise_inputs(x0, torch.full((B,), 99), mask, absorb=m)
        absorbed = _is_m(x_t, m)
        assert torch.equal(x_t[~mask], x0[~mask])  # source: x0 bit for bit
        assert not absorbed[:, :6].any()  # protected global positions (targets among them too)
        assert absorbed[mask].float().mean() > 0.8  # p = sqrt(1 - abar_99) ≈ 0.99 elsewhere
    # Protected target positions are noised (Gaussian part), just never absorbed.
    assert (mask[:, :6] & ~(x_t[:, :6] == x0[:, :6]).all(-1)).any()


@pytest.mark.parametrize("window", [1, 7, 16])
def test_stratified_mode_absorbs_exactly_round_p_n_in_every_window(window):
    diff = _diffusion(absorb_stratified=True, absorb_window=window, absorb_protect_global=3)
    B, L = 6, 90
    mask = _varied_mask(B, L, seed=1)
    mask[2, 50:] = False  # a row whose targets stop early (source-like tail)
    p = torch.tensor([0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0], dtype=torch.float64)
    # The windows, written out position by position: (row, window) -> expected number absorbed.
    window_of = torch.full((B, L), -1, dtype=torch.long)
    expected = {}
    for b in range(B):
        positions = [i for i in range(3, L) if mask[b, i]]
        for w in range(0, len(positions), window):
            chunk = positions[w : w + window]
            window_of[b, chunk] = w // window
            expected[b, w // window] = round(p[b].item() * len(chunk))
    inside = window_of >= 0
    want = torch.zeros(B, L, dtype=torch.long)
    for (b, w), k in expected.items():
        want[b, w] = k
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(B, L)
    for _ in range(200):
        absorbed = diff.absorb_positions(mask, p, gen)
        hits += absorbed
        assert not absorbed[~inside].any()  # never the source, the protected prefix or past the last target
        got = torch.zeros(B, L, dtype=torch.long).scatter_add_(1, window_of.clamp(min=0), (absorbed & inside).long())
        assert torch.equal(got, want)
    # Uniform inside a window: every absorbable position of row 3 (p = 0.5) is hit about equally often.
    if window > 1:
        freq = hits[3][mask[3] & (torch.arange(L) >= 3)] / 200
        whole = freq[: (len(freq) // window) * window]
        assert (whole - 0.5).abs().max() < 0.2


def test_stratified_noise_inputs_keep_the_fraction_equal_in_every_window():
    torch.manual_seed(0)
    diff = _diffusion(absorb_stratified=True, absorb_window=10, absorb_protect_global=0)
    B, L, d = 3, 100, 4
    x0, m = torch.randn(B, L, d), torch.randn(d)
    mask = torch.ones(B, L, dtype=torch.bool)
    t = torch.tensor([5, 40, 99])
    absorbed = _is_m(diff.noise_inputs(x0, t, mask, absorb=m), m)
    p = diff.absorb_prob(t).double()
    for b in range(B):
        counts = absorbed[b].view(10, 10).sum(1)
        assert (counts == round(p[b].item() * 10)).all()


def test_gaussian_part_is_centred_on_m():
    torch.manual_seed(0)
    diff = _diffusion(absorb_gamma=0.3)
    B, L, d = 8, 256, 16
    x0, m = torch.randn(B, L, d), torch.full((d,), 4.0)
    mask = torch.ones(B, L, dtype=torch.bool)
    for t in (10, 60, 99):
        ab = diff.alphas_cumprod[t].item()
        x_t = diff.noise_inputs(x0, torch.full((B,), t), mask, absorb=m)
        keep = ~_is_m(x_t, m)
        resid = (x_t - m - math.sqrt(ab) * (x0 - m))[keep]
        assert resid.mean().abs().item() < 0.02
        assert resid.var().item() == pytest.approx(1 - ab, rel=0.05)


def test_absorbing_off_is_the_plain_q_sample_bit_for_bit():
    diff = Diffusion(DiffusionConfig(steps=100))
    x0 = torch.randn(4, 32, 8)
    mask = _varied_mask(4, 32)
    t = torch.tensor([0, 3, 50, 99])
    torch.manual_seed(5)
    got = diff.noise_inputs(x0, t, mask)
    torch.manual_seed(5)
    noise = torch.randn_like(x0)
    ab = diff.alphas_cumprod  # float64; the square roots are taken in float64, then rounded to float32
    plain = ab.sqrt().float()[t][:, None, None] * x0 + (1 - ab).sqrt().float()[t][:, None, None] * noise
    assert torch.equal(got, torch.where(mask[..., None], plain, x0))


# -- loss -----------------------------------------------------------------------------------------------------


class EchoModel(torch.nn.Module):
    """Fixed embeddings and an absorbing vector; predicts its input."""

    def __init__(self, vocab=11, d=4, absorbing=True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Embedding(vocab, d)
        self.embed.weight.data = torch.randn(vocab, d, generator=g)
        self.absorb = torch.nn.Parameter(torch.randn(d, generator=g)) if absorbing else None

    def get_embeds(self, ids):
        return self.embed(ids)

    def get_logits(self, x):
        return x @ self.embed.weight.t()

    def forward(self, x, t, doc_ids=None):
        return x


def test_regulariser_and_m_centred_prior_enter_the_loss():
    diff = _diffusion(steps=50, absorb_reg=0.03, absorb_protect_global=0)
    model = EchoModel()
    ids = torch.tensor([[1, 5, 2, 7, 8, 3, 0, 0], [1, 4, 6, 2, 9, 3, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    torch.manual_seed(7)
    out = diff.training_losses(model, {"ids": ids, "input_mask": mask}, torch.tensor([10, 30]))
    m = model.absorb.detach()
    assert torch.allclose(out["absorb_reg"], torch.full((2,), 0.03 * m.norm().item()))
    total = out["mse"] + out["rounding"] + out["prior"] + out["absorb_reg"]
    assert torch.allclose(out["loss"], total)
    torch.manual_seed(7)
    emb = model.embed.weight[ids].detach()
    x0 = emb + math.sqrt(1 - diff.alphas_cumprod[0].item()) * torch.randn_like(emb)
    per_pos = (diff.alphas_cumprod[-1].item() * (x0 - m) ** 2).mean(-1)
    prior = (per_pos * mask).sum(1) / mask.sum(1)
    assert torch.allclose(out["prior"], prior, rtol=1e-5)
    out["loss"].sum().backward()
    assert model.absorb.grad is not None and model.absorb.grad.abs().sum() > 0  # m is learned


def test_absorbing_needs_the_models_vector():
    diff = _diffusion()
    ids = torch.tensor([[1, 5, 2, 7, 8, 3, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="absorbing"):
        diff.training_losses(EchoModel(absorbing=False), {"ids": ids, "input_mask": mask}, torch.tensor([3]))
    out = Diffusion(DiffusionConfig(steps=100)).training_losses(
        EchoModel(), {"ids": ids, "input_mask": mask}, torch.tensor([3])
    )
    assert "absorb_reg" not in out  # off: the vector is ignored and no term is added


# -- sampling -------------------------------------------------------------------------------------------------


def _tiny_model(absorbing: bool) -> Denoiser:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_emb=16, dropout=0.0)
    return Denoiser(cfg, vocab_size=40, absorbing=absorbing).eval()


def _plain_sample(model, diffusion, ids, input_mask, sampler, steps, generator):
    """The samplers as they were before the absorbing state (no clamping, fp32), written out independently."""
    src = model.get_embeds(ids).float()
    mask = input_mask[..., None]
    x = torch.where(mask, torch.randn(src.shape, generator=generator), src)
    ab = diffusion.alphas_cumprod
    ts = sampling_timesteps(diffusion, steps)
    prev = None
    for i, t in enumerate(ts):
        x0 = torch.where(mask, model(x, torch.full((ids.shape[0],), t)).float(), src)
        if i + 1 == len(ts):
            return x0
        a_t, a_s = float(ab[ts[i]]), float(ab[ts[i + 1]])
        if sampler == "ddpm":
            beta = 1.0 - a_t / a_s
            mean = (a_s**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t)) * x
            x = mean + (beta * (1 - a_s) / (1 - a_t)) ** 0.5 * torch.randn(x.shape, generator=generator)
        elif sampler == "ddim":
            x = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * ((x - a_t**0.5 * x0) / (1 - a_t) ** 0.5)
        else:
            h = 0.5 * (math.log(a_s / (1 - a_s)) - math.log(a_t / (1 - a_t)))
            d = x0 if prev is None else (1 + h / (2 * prev[1])) * x0 - h / (2 * prev[1]) * prev[0]
            x = ((1 - a_s) ** 0.5 / (1 - a_t) ** 0.5) * x - a_s**0.5 * math.expm1(-h) * d
            prev = (x0, h)
        x = torch.where(mask, x, src)


def _rows():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 40, (3, 24), generator=g)
    mask = torch.zeros(3, 24, dtype=torch.bool)
    mask[0, 8:], mask[1, 2:], mask[2, 12:] = True, True, True  # row 1: targets inside the protected prefix
    return ids, mask


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sampling_with_absorbing_off_is_unchanged(sampler):
    model, diffusion = _tiny_model(False), Diffusion(DiffusionConfig(steps=50))
    ids, mask = _rows()
    got = sample_x0(model, diffusion, ids, mask, sampler, 10, generator=torch.Generator().manual_seed(1))
    ref = _plain_sample(model, diffusion, ids, mask, sampler, 10, torch.Generator().manual_seed(1))
    assert torch.equal(got, ref)
    if sampler != "ddpm":  # deterministic updates: m = 0 and γ = 0 must take exactly the same path
        on = Diffusion(DiffusionConfig(steps=50, absorbing=True, absorb_gamma=0.0))
        same = sample_x0(_tiny_model(True), on, ids, mask, sampler, 10, generator=torch.Generator().manual_seed(1))
        assert torch.equal(same, ref)


class CentredGaussianModel(torch.nn.Module):
    """Exact x0-predictor for x0 ~ N(mu, s^2) under q(x_t | x0) = N(sqrt(ab)(x0 - m) + m, 1 - ab)."""

    def __init__(self, diffusion, mu, s, m, d=4):
        super().__init__()
        self.ab = diffusion.alphas_cumprod.float()
        self.mu, self.s = mu, s
        self.embed = torch.nn.Embedding(3, d)
        self.absorb = torch.nn.Parameter(torch.full((d,), m))

    def get_embeds(self, ids):
        return torch.zeros(*ids.shape, self.embed.embedding_dim)

    def forward(self, x, t, doc_ids=None):
        ab = self.ab[t][:, None, None]
        gain = ab.sqrt() * self.s**2 / (ab * self.s**2 + 1 - ab)
        return self.mu + gain * (x - self.absorb - ab.sqrt() * (self.mu - self.absorb))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_samplers_shift_by_m(sampler):
    # With γ = 0 only the centring acts: the samplers must reproduce the data distribution for any m.
    diffusion = Diffusion(DiffusionConfig(steps=200, absorbing=True, absorb_gamma=0.0))
    mu, s = 1.5, 0.7
    model = CentredGaussianModel(diffusion, mu, s, m=-3.0)
    ids, mask = torch.zeros(1, 4096, dtype=torch.long), torch.ones(1, 4096, dtype=torch.bool)
    steps = 200 if sampler != "dpm++2m" else 50
    x0 = sample_x0(model, diffusion, ids, mask, sampler, steps, generator=torch.Generator().manual_seed(0))
    ab0 = diffusion.alphas_cumprod[0].item()
    assert x0.mean().item() == pytest.approx(mu, abs=0.03)
    assert x0.var().item() == pytest.approx(s**2 * ab0 * s**2 / (ab0 * s**2 + 1 - ab0), rel=0.08)


@pytest.mark.parametrize("reinject", ["mask", "replace"])
@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_sampling_with_absorbing_keeps_source_reinjects_and_is_seeded(sampler, stratified, reinject):
    model = _tiny_model(True)
    with torch.no_grad():
        model.absorb.copy_(torch.randn(16))
    m = model.absorb.detach()
    cfg = DiffusionConfig(steps=50, absorbing=True, absorb_gamma=0.8, absorb_protect_global=4,
                          absorb_stratified=stratified, absorb_window=5)
    diffusion = Diffusion(cfg)
    ids, mask = _rows()
    inputs = []
    handle = model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))

    def run(seed):
        return sample_x0(model, diffusion, ids, mask, sampler, 10, generator=torch.Generator().manual_seed(seed),
                         reinject=reinject)

    a = run(1)
    seen, inputs[:] = list(inputs), []
    b, c = run(1), run(2)
    handle.remove()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[~mask], model.get_embeds(ids)[~mask])  # source kept exactly
    absorbed = [_is_m(x, m) for x in seen]
    assert not any(x[:, :4].any() for x in absorbed)  # never at protected positions
    assert not any(x[~mask].any() for x in absorbed)  # nor at the source
    assert not absorbed[-1].any()  # no re-injection before the final prediction
    assert all(x[mask].any() for x in absorbed[1:-1])  # re-injected at the steps in between
    # mask: the first call is absorbed at the training rate of step T-1 too; replace starts from m + N(0, I).
    assert absorbed[0].any() == (reinject == "mask")
    # x_T is centred on m: the first state minus m is ≈ N(0, I) on the target positions the network sees.
    start = (seen[0] - m)[mask & ~absorbed[0]]
    assert start.mean().abs().item() < 0.15 and start.std().item() == pytest.approx(1.0, rel=0.15)


class AbsorbingGaussianModel(CentredGaussianModel):
    """The Gaussian toy's exact predictor with absorbing: an input exactly at m carries no information about its
    x0 (coordinates are independent), so the prediction there is the data mean; elsewhere the Gaussian posterior."""

    def forward(self, x, t, doc_ids=None):
        at_m = (x == self.absorb).all(-1, keepdim=True)
        return torch.where(at_m, torch.full_like(x, self.mu), super().forward(x, t, doc_ids))


# Measured (4080 x 4 values, seed 0, T = 2000, γ = 0.5, mean of the final prediction; μ = 1.5; dpm++2m with
# log-SNR spacing, ddpm with time spacing):
#                     dpm++2m 10   dpm++2m 20   dpm++2m 50   ddpm 200   ddpm 2000
#   reinject=mask       1.494        1.492        1.495       1.502      1.497
#   reinject=replace    1.012        0.647        0.311       0.632      0.311
@pytest.mark.parametrize("sampler,steps", [("dpm++2m", 10), ("dpm++2m", 50), ("ddpm", 200)])
def test_mask_reinjection_keeps_the_data_mean_where_replace_drifts_to_m(sampler, steps):
    diffusion = Diffusion(DiffusionConfig(steps=2000, absorbing=True, absorb_gamma=0.5))
    model = AbsorbingGaussianModel(diffusion, 1.5, 0.7, m=0.0)
    ids, mask = torch.zeros(1, 4096, dtype=torch.long), torch.ones(1, 4096, dtype=torch.bool)
    mask[:, :16] = False

    def mean(reinject):
        x0 = sample_x0(model, diffusion, ids, mask, sampler, steps, generator=torch.Generator().manual_seed(0),
                       spacing="logsnr" if sampler == "dpm++2m" else "time", reinject=reinject)
        return x0[0, 16:].mean().item()

    assert mean("mask") == pytest.approx(1.5, abs=0.03)
    assert mean("replace") < 1.2  # pulled toward m = 0 by positions that linger near m


def test_unknown_reinjection_rule_is_refused():
    model, diffusion = _tiny_model(True), Diffusion(DiffusionConfig(steps=50, absorbing=True))
    ids, mask = _rows()
    with pytest.raises(ValueError, match="re-injection"):
        sample_x0(model, diffusion, ids, mask, "ddim", 5, reinject="sometimes")


# -- config and training --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("diffusion.absorb_gamma=1.5", r"absorb_gamma=1.5 must be in \[0.0, 1.0\]"),
        ("diffusion.absorb_gamma=-0.1", "absorb_gamma"),
        ("diffusion.absorb_reg=-1", "absorb_reg=-1.0 must not be negative"),
        ("diffusion.absorb_protect_global=-2", "absorb_protect_global=-2 must not be negative"),
        ("diffusion.absorb_window=0", "absorb_window=0 must be positive"),
        ("diffusion.absorbing=maybe", "diffusion.absorbing='maybe' has the wrong type"),
        ("diffusion.absorb_stratifed=true", "did you mean 'diffusion.absorb_stratified'"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [f"--{override}"])


def test_config_defaults():
    c = load_config(None, ["--diffusion.absorbing=true"]).diffusion
    assert (c.absorbing, c.absorb_gamma, c.absorb_reg, c.absorb_protect_global) == (True, 0.5, 0.01, 16)
    assert (c.absorb_stratified, c.absorb_window) == (False, 256)
    assert DiffusionConfig().absorbing is False


def test_tiny_training_run_with_absorbing_and_checkpoint_round_trip(tmp_path):
    from sadiffuseq.checkpoint import EMA, load_model, save_checkpoint
    from sadiffuseq.data.dataset import ensure_dataset
    from sadiffuseq.train import build_model, train

    extra = {"diffusion.absorbing": "true", "diffusion.absorb_protect_global": 4, "diffusion.absorb_stratified": "true",
             "diffusion.absorb_window": 8, "train.save_every": 100}
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    run = train(cfg, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and all(math.isfinite(r["loss"]) and "absorb_reg" in r for r in steps)
    trained, loaded_cfg, _ = load_model(run, weights="raw")
    assert loaded_cfg.diffusion.absorbing and trained.absorb.shape == (cfg.model.d_emb,)
    assert trained.absorb.abs().sum() > 0  # learned away from its zero initialisation
    assert load_model(run, weights="ema")[0].absorb is not None

    # Exact round trip of `absorb` (raw and EMA), then sampling from the loaded model.
    meta = ensure_dataset(cfg.data, cfg.data_dir, progress=False)
    model = build_model(cfg, meta["vocab_size"], torch.device("cpu")).eval()
    assert model.absorb is not None and not model.absorb.any()  # zero initialisation
    with torch.no_grad():
        model.absorb.normal_()
    ema = EMA(model, 0.9)
    ckpt = save_checkpoint(tmp_path / "r", 1, model, ema, cfg, cfg.data_dir / "tokenizer.json", {})
    raw, _, _ = load_model(ckpt, weights="raw")
    assert torch.equal(raw.absorb, model.absorb)
    assert torch.equal(load_model(ckpt, weights="ema")[0].absorb, ema.shadow["absorb"])
    ids = torch.randint(4, meta["vocab_size"], (2, cfg.data.seq_len))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 10:] = True
    x0 = sample_x0(raw, Diffusion(cfg.diffusion), ids, mask, "ddim", 5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x0).all() and torch.equal(x0[:, :10], raw.get_embeds(ids)[:, :10])
