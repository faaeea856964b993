"""DPM-Solver++(2M), log-SNR step spacing and MBR decoding."""

import pytest
import torch

from sadiffuseq.config import DiffusionConfig, load_config
from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.diffusion.samplers import (
    SAMPLERS,
    log_snr,
    logsnr_timesteps,
    nearest_embedding,
    respaced_timesteps,
    round_to_tokens,
    sample_x0,
    sampling_timesteps,
)
from sadiffuseq.errors import UserError
from sadiffuseq.generate import mbr_select

from conftest import tiny_overrides
from test_samplers import GaussianPosteriorModel, _expected_final_variance, _tiny_model

MU, S = 1.5, 0.7


@pytest.fixture(scope="module")
def sqrt2000():
    return Diffusion(DiffusionConfig(steps=2000, schedule="sqrt"))  # the default process


def _toy_run(diffusion, sampler, steps, spacing, n=4096, seed=0):
    """Final predictions on n-1 target positions (d=4) and the noise x_{T-1} they started from."""
    model = GaussianPosteriorModel(diffusion, MU, S)
    ids = torch.zeros(1, n, dtype=torch.long)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[:, 0] = False
    gen = torch.Generator().manual_seed(seed)
    x0 = sample_x0(model, diffusion, ids, mask, sampler, steps, generator=gen, spacing=spacing)
    assert torch.equal(x0[0, 0], torch.zeros(4))  # the source position is re-imposed
    noise = torch.randn((1, n, 4), generator=torch.Generator().manual_seed(seed))  # the sampler's first draw
    return x0[0, 1:].double(), noise[0, 1:].double()


def _exact_ode_prediction(diffusion, x_start):
    """E[x0 | x_0] where x_0 is the exact probability-flow ODE solution started at x_{T-1} = x_start.

    For Gaussian data the marginals are N(sqrt(ab_t) mu, v_t) with v_t = ab_t s^2 + 1 - ab_t, and the flow is the
    monotone affine map between them: x_0 = sqrt(ab_0) mu + sqrt(v_0 / v_{T-1}) (x_{T-1} - sqrt(ab_{T-1}) mu).
    """
    ab = diffusion.alphas_cumprod
    v0, vT = ab[0] * S**2 + 1 - ab[0], ab[-1] * S**2 + 1 - ab[-1]
    x_0 = ab[0].sqrt() * MU + (v0 / vT).sqrt() * (x_start - ab[-1].sqrt() * MU)
    gain = ab[0].sqrt() * S**2 / (ab[0] * S**2 + 1 - ab[0])
    return MU + gain * (x_0 - ab[0].sqrt() * MU)


# Measured with 4095 x 4 values, seed 0, T=2000 sqrt schedule, 20 steps (relative error of the variance of the
# final prediction, expected 0.4756; every mean is within 0.01 of mu = 1.5):
#                 time spacing   logsnr spacing
#   ddpm             -38.9 %        -28.6 %
#   ddim             -25.3 %        -14.7 %
#   dpm++2m          +13.4 %         +1.8 %
# Time-uniform steps are a poor fit for the sqrt schedule (in λ its first step spans 5.9, its last 1.48, the
# middle ones 0.09), so there the second-order solver only halves DDIM's error; with log-SNR spacing it is
# within sampling noise of the target. Hence the two tolerances.
@pytest.mark.parametrize("spacing,var_tol", [("logsnr", 0.06), ("time", 0.20)])
def test_dpm_solver_reproduces_the_gaussian_toy_in_20_steps(sqrt2000, spacing, var_tol):
    expected_var = _expected_final_variance(sqrt2000.alphas_cumprod[0].item(), S)
    dpm, _ = _toy_run(sqrt2000, "dpm++2m", 20, spacing)
    ddim, _ = _toy_run(sqrt2000, "ddim", 20, spacing)
    dpm_err = dpm.var().item() / expected_var - 1
    ddim_err = ddim.var().item() / expected_var - 1
    assert dpm.mean().item() == pytest.approx(MU, abs=0.03)
    assert abs(dpm_err) < var_tol
    assert abs(dpm_err) < abs(ddim_err)  # at least as good as DDIM (time: 13.4 % vs 25.3 %)
    if spacing == "logsnr":
        assert abs(dpm_err) < 0.25 * abs(ddim_err)  # far better: 1.8 % vs 14.7 %


def test_dpm_solver_tracks_the_exact_ode_path(sqrt2000):
    """Pathwise error against the exact ODE solution from the same x_{T-1} (no sampling noise involved).

    Measured max |error| over 256 x 4 values at 20 steps: ddim 2.3e-1 / dpm++2m 1.3e-2 (logsnr), ddim 3.9e-1 /
    dpm++2m 1.7e-1 (time). Under logsnr spacing, going to 40 steps cuts DDIM's error by 2.11 (first order) and
    DPM-Solver++'s by 3.96 (second order).
    """
    errors = {}
    for spacing in ("time", "logsnr"):
        for sampler in ("ddim", "dpm++2m"):
            for steps in (20, 40):
                pred, start = _toy_run(sqrt2000, sampler, steps, spacing, n=257)
                errors[spacing, sampler, steps] = (pred - _exact_ode_prediction(sqrt2000, start)).abs().max().item()
    assert errors["logsnr", "dpm++2m", 20] < 0.1 * errors["logsnr", "ddim", 20]
    assert errors["time", "dpm++2m", 20] < 0.6 * errors["time", "ddim", 20]
    assert errors["logsnr", "ddim", 20] / errors["logsnr", "ddim", 40] == pytest.approx(2.0, rel=0.25)
    assert errors["logsnr", "dpm++2m", 20] / errors["logsnr", "dpm++2m", 40] > 3.0


def test_dpm_first_step_is_ddim(sqrt2000):
    # With two visited steps there is one update, which is first order: it must equal DDIM's.
    a, _ = _toy_run(sqrt2000, "dpm++2m", 2, "time", n=65)
    b, _ = _toy_run(sqrt2000, "ddim", 2, "time", n=65)
    assert torch.allclose(a, b, atol=1e-5)


def test_logsnr_spacing_is_even_in_lambda(sqrt2000):
    lam = log_snr(sqrt2000.alphas_cumprod)
    for steps in (10, 20, 50):
        ts = logsnr_timesteps(sqrt2000.alphas_cumprod, steps)
        assert len(ts) == steps and len(set(ts)) == steps
        assert ts[0] == 1999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
        assert all(isinstance(t, int) for t in ts)
        assert ts == sampling_timesteps(sqrt2000, steps, "logsnr")

    ts = logsnr_timesteps(sqrt2000.alphas_cumprod, 20)
    gaps = lam[ts[1:]] - lam[ts[:-1]]
    assert (gaps > 0).all()
    # The sqrt schedule's last step clips β at 0.999, so λ(1999) → λ(1998) is a forced jump of ≈3.45 that no
    # spacing can split; the other 18 gaps are even (measured max/min 1.22, all ≈0.35).
    assert gaps[0].item() == pytest.approx((lam[1998] - lam[1999]).item())
    assert (gaps[1:].max() / gaps[1:].min()).item() < 1.5
    time_ts = respaced_timesteps(2000, 20)
    time_gaps = lam[time_ts[1:]] - lam[time_ts[:-1]]
    assert (time_gaps[1:].max() / time_gaps[1:].min()).item() > 10  # measured 16.6 (0.09 mid-way, 1.48 at the end)
    # A table without such a jump (linear schedule): every gap, the first included, is even.
    lin = Diffusion(DiffusionConfig(steps=2000, schedule="linear")).alphas_cumprod
    lin_gaps = log_snr(lin)[logsnr_timesteps(lin, 20)].diff()
    assert (lin_gaps.max() / lin_gaps.min()).item() < 1.6  # measured 1.45

    assert logsnr_timesteps(sqrt2000.alphas_cumprod, 1) == [1999]
    assert logsnr_timesteps(sqrt2000.alphas_cumprod, 2000) == list(range(1999, -1, -1))
    with pytest.raises(ValueError):
        logsnr_timesteps(sqrt2000.alphas_cumprod, 2001)
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(sqrt2000, 10, "karras")


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("clamp", [False, True])
def test_dpm_shapes_source_and_determinism(spacing, clamp):
    assert "dpm++2m" in SAMPLERS
    model = _tiny_model()
    diffusion = Diffusion(DiffusionConfig(steps=50))
    ids = torch.randint(4, 40, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[:, 8:] = True

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return sample_x0(model, diffusion, ids, mask, "dpm++2m", 10, clamp, gen, spacing=spacing)

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (3, 20, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :8], model.get_embeds(ids)[:, :8])
    assert torch.equal(round_to_tokens(model, a, ids, mask)[:, :8], ids[:, :8])
    if clamp:
        assert torch.equal(nearest_embedding(model.embed.weight, a[mask]), a[mask])


def test_mbr_picks_the_consensus_candidate():
    # All four have 9 distinct words, so BLEU's brevity penalty is 1 and BLEU = (p1 p2 p3 p4)^(1/4).
    #   central (index 2) vs either variant: one end word differs -> 8/9, 7/8, 6/7, 5/6 of the 1..4-grams match,
    #     BLEU = (5/9)^(1/4) ≈ 0.863 (both directions);
    #   variant 0 vs variant 3: both end words differ -> 7/9, 6/8, 5/7, 4/6, BLEU = (5/18)^(1/4) ≈ 0.726;
    #   the outlier (index 1) shares no word with anything -> BLEU 0 (nltk returns 0 without a unigram match).
    # Mean BLEU against the other three: central (0.863 + 0.863 + 0)/3 = 0.575, each variant
    # (0.863 + 0.726 + 0)/3 = 0.530, outlier 0 -> index 2.
    candidates = [
        "the quick brown fox jumps over one lazy cat",  # variant: last word changed
        "seven green parrots sing loudly near old harbour walls",  # outlier
        "the quick brown fox jumps over one lazy dog",  # central (not first or last: no default passes)
        "a quick brown fox jumps over one lazy dog",  # variant: first word changed
    ]
    assert mbr_select(candidates) == 2


def test_mbr_single_candidate_and_ties():
    assert mbr_select(["anything at all"]) == 0
    assert mbr_select([""]) == 0
    assert mbr_select(["x y z", "x y z", "x y z"]) == 0  # all equal
    assert mbr_select(["a b c d", "e f g h"]) == 0  # symmetric: both score 0
    assert mbr_select(["", ""]) == 0
    # Candidates 1 and 3 are the same sentence, so their pairwise scores are the same multiset (in a different
    # order); the tie must still go to index 1, ahead of 3.
    assert mbr_select(["p q r s", "a b c d e", "a b c d f", "a b c d e"]) == 1
    with pytest.raises(ValueError):
        mbr_select([])


@pytest.mark.parametrize(
    "override,key",
    [
        ("--sample.sampler=dpm++3m", "sample.sampler"),
        ("--sample.spacing=karras", "sample.spacing"),
        ("--sample.mbr=0", "sample.mbr"),
        ("--sample.mbr=-2", "sample.mbr"),
    ],
)
def test_config_validation_names_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_config_accepts_the_new_settings():
    overrides = ["--sample.sampler=dpm++2m", "--sample.steps=10", "--sample.mbr=5", "--sample.spacing=logsnr"]
    cfg = load_config(None, overrides)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.mbr, cfg.sample.spacing) == ("dpm++2m", 10, 5, "logsnr")
    default = load_config(None, [])
    assert (default.sample.spacing, default.sample.mbr) == ("time", 1)


def test_generate_with_mbr_end_to_end(tmp_path):
    from sadiffuseq.checkpoint import load_model
    from sadiffuseq.generate import generate_records, split_sources
    from sadiffuseq.train import train

    cfg = load_config(None, tiny_overrides(tmp_path))
    run = train(cfg, progress=False, log=lambda *_: None)
    model, cfg, tokenizer = load_model(run, torch.device("cpu"), "ema")
    srcs, refs = split_sources(cfg, tokenizer, "test", limit=4)
    assert srcs and len(srcs) <= cfg.sample.batch_size  # one batch (the tiny config's batch_size is 4)
    cfg.sample.sampler, cfg.sample.spacing, cfg.sample.mbr = "dpm++2m", "logsnr", 3
    cfg.validate()
    records = generate_records(model, cfg, tokenizer, srcs, refs, torch.device("cpu"), progress=False)
    assert len(records) == len(srcs)
    for r in records:
        assert len(r["candidates"]) == 3 and all(isinstance(c, str) for c in r["candidates"])
        assert r["generated"] == r["candidates"][mbr_select(r["candidates"])]
    again = generate_records(model, cfg, tokenizer, srcs, refs, torch.device("cpu"), progress=False)
    assert again == records  # seeded

    cfg.sample.mbr = 1  # no candidates key, and the same noise as the first MBR candidate
    single = generate_records(model, cfg, tokenizer, srcs, refs, torch.device("cpu"), progress=False)
    assert all("candidates" not in r for r in single)
    assert [r["generated"] for r in single] == [r["candidates"][0] for r in records]
