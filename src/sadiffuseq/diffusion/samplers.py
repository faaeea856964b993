"""Reverse processes: from x_T ~ N(0, I) on target positions to x0, with the source held fixed.

Every sampler here works with an x0-predicting ``model(x_t, t) -> x̂0`` and a descending list of the training
steps to visit (*respacing*, Nichol & Dhariwal 2021: visiting K of the T steps with the same ᾱ values). After
every step the source positions are re-imposed (they were never noised in training either).

* ``ddpm``: ancestral sampling from the posterior q(x_s | x_t, x̂0) between consecutive visited steps t > s:
  β' = 1 − ᾱ_t/ᾱ_s, mean = sqrt(ᾱ_s)β'/(1−ᾱ_t) · x̂0 + sqrt(1−β')(1−ᾱ_s)/(1−ᾱ_t) · x_t,
  variance = β'(1−ᾱ_s)/(1−ᾱ_t).
* ``ddim``: the deterministic DDIM update (η = 0, Song et al. 2021): ε̂ = (x_t − sqrt(ᾱ_t) x̂0)/sqrt(1−ᾱ_t),
  x_s = sqrt(ᾱ_s) x̂0 + sqrt(1−ᾱ_s) ε̂.

* ``dpm++2m``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
  Probabilistic Models", Algorithm 2), a second-order multistep solver of the probability-flow ODE written for a
  data-prediction (x0) model. With α_t = sqrt(ᾱ_t), σ_t = sqrt(1−ᾱ_t), λ_t = log(α_t/σ_t) and h = λ_s − λ_t for
  consecutive visited steps t > s, the first step is first order (DPM-Solver++1, identical to DDIM):
  x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) x̂0_t, and every later step replaces x̂0_t by the extrapolation
  D = (1 + 1/(2r)) x̂0_t − 1/(2r) x̂0_prev with r = h_prev/h, where x̂0_prev is the prediction of the previous
  visited step and h_prev the previous λ increment.

Which training steps are visited (``spacing``): ``time`` spreads them evenly over [0, T−1]
(:func:`respaced_timesteps`); ``logsnr`` spreads them (as nearly as the discrete table allows) evenly in λ, the
variable DPM-Solver integrates in (:func:`logsnr_timesteps`). Either spacing works with every sampler.

Optional *clamping* (Diffusion-LM) snaps every x̂0 to its nearest word embedding before it is used.

*Soft absorbing state* (``diffusion.absorbing``, DiffuSeq-v2; see ``process.py``): the process is centred on the
learned vector m (``model.absorb``), so sampling starts from x_T = m + N(0, I) on target positions and every
Gaussian update above is applied to y = x − m with the prediction ŷ0 = x̂0 − m (then x = y + m). The discrete
noise is re-injected at every step but the last, at the training rate γ·σ_t, σ_t = sqrt(1−ᾱ_t) of the step
being evaluated (Bernoulli or stratified as configured; never at the protected global positions nor the source).
How it is re-injected is ``reinject``:

* ``mask`` (default, ours): the network *sees* the drawn positions as m, but the trajectory x keeps its Gaussian
  state there and is updated like every other position, with the prediction the network made from context.
  Every network input is then distributed as in training (each target position either m or on the Gaussian
  marginal) and the solver integrates one coherent trajectory.
* ``replace``: the trajectory state itself is set to m after each update (the rule our first GPU measurements
  used). Later updates then move such a position only by α_s(1 − e^{−h})·ŷ0 from m — little when steps are
  small — so it lingers near m in states training never produced. On a Gaussian toy with the exact predictor
  this pulls the sample mean from μ = 1.5 to 1.01 / 0.65 / 0.31 with DPM-Solver++ at 10 / 20 / 50 steps, where
  ``mask`` stays at 1.49–1.50 (tests/test_absorbing.py). Kept to reproduce earlier measurements.

The final prediction always sees every position. With absorbing off nothing here changes.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.utils import autocast

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
REINJECT = ("mask", "replace")
SPACINGS = ("time", "logsnr")


def respaced_timesteps(total: int, steps: int) -> list[int]:
    """``steps`` training steps evenly spread over [0, total-1], descending; always includes total-1 and 0."""
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    if steps == 1:
        return [total - 1]
    ts = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long().unique()
    return ts.flip(0).tolist()


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ_t = log(α_t/σ_t) = ½ log(ᾱ_t / (1 − ᾱ_t)) in float64; decreasing in t."""
    ab = alphas_cumprod.double()
    return 0.5 * (ab.log() - torch.log1p(-ab))


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> list[int]:
    """``steps`` distinct training steps, descending from T−1 to 0, whose λ values are as evenly spaced as possible.

    Greedy: after T−1, each next step is the one whose λ is nearest to the point a 1/k of the way from the
    current λ to λ(0), where k is the number of steps still to place (and enough steps are left below it for
    the remaining ones to stay distinct). Where the table has no gaps larger than the ideal increment this is the
    nearest-step rounding of a uniform λ grid; where it has one — the sqrt schedule's last step, whose β is clipped
    at 0.999, jumps by ≈3.5 in λ — the steps that a fixed grid would waste inside that gap (all rounding to the
    same two steps) are instead spread evenly over the rest of the λ range.
    """
    total = len(alphas_cumprod)
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    lam = log_snr(alphas_cumprod)
    out = [total - 1]
    for placed in range(1, steps):
        left = steps - placed  # steps still to place, this one included; the last must be 0
        prev = out[-1]
        target = lam[prev] + (lam[0] - lam[prev]) / left
        lo = left - 1  # keep room for left-1 distinct steps below this one
        t = lo + int((lam[lo:prev] - target).abs().argmin())
        out.append(t)
    return out


def sampling_timesteps(diffusion: Diffusion, steps: int, spacing: str = "time") -> list[int]:
    """The descending training steps a sampler visits: ``time`` (even in t) or ``logsnr`` (even in λ)."""
    if spacing == "time":
        return respaced_timesteps(diffusion.steps, steps)
    if spacing == "logsnr":
        return logsnr_timesteps(diffusion.alphas_cumprod, steps)
    raise ValueError(f"unknown spacing {spacing!r}; choose from {SPACINGS}")


def nearest_embedding(embedding: torch.Tensor, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Replace every vector of x (..., d) by the closest row of ``embedding`` (V, d) in Euclidean distance."""
    flat = x.reshape(-1, x.shape[-1]).float()
    emb = embedding.float()
    sq = emb.pow(2).sum(1)
    out = torch.empty_like(flat)
    for i in range(0, flat.shape[0], chunk):
        part = flat[i : i + chunk]
        # argmin ||x - e||² = argmax (2 x·e - ||e||²)
        idx = (2 * part @ emb.t() - sq).argmax(dim=1)
        out[i : i + chunk] = emb[idx]
    return out.view_as(x).to(x.dtype)


@torch.no_grad()
def sample_x0(
    model,
    diffusion: Diffusion,
    ids: torch.Tensor,
    input_mask: torch.Tensor,
    sampler: str = "ddpm",
    steps: int = 200,
    clamp: bool = False,
    generator: torch.Generator | None = None,
    doc_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    spacing: str = "time",
    reinject: str = "mask",
) -> torch.Tensor:
    """Run the reverse process; returns the final x̂0 (B, L, d_emb) in float32.

    ``ids`` supplies the source tokens (its target positions are ignored); ``input_mask`` marks the positions
    to generate. ``spacing`` chooses the visited steps (see :func:`sampling_timesteps`); ``reinject`` how the
    absorbing state's discrete noise is re-injected (module docstring).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if reinject not in REINJECT:
        raise ValueError(f"unknown re-injection rule {reinject!r}; choose from {REINJECT}")
    device = ids.device
    src = model.get_embeds(ids).float()
    mask = input_mask[..., None]
    noise = torch.randn(src.shape, generator=generator, device=device, dtype=torch.float32)
    m = diffusion.absorb_vector(model)  # soft absorbing state: the vector m, or None
    m = None if m is None else m.detach().float()
    x = torch.where(mask, noise if m is None else noise + m, src)
    ab = diffusion.alphas_cumprod
    timesteps = sampling_timesteps(diffusion, steps, spacing)

    def absorbed_at(step: int) -> torch.Tensor:
        """Target positions to absorb for a network call at ``step``, (B, L, 1), at rate γ·σ_step."""
        p = torch.full((ids.shape[0],), diffusion.cfg.absorb_gamma * (1 - float(ab[step])) ** 0.5, device=device)
        return diffusion.absorb_positions(input_mask, p, generator)[..., None]

    hidden = absorbed_at(timesteps[0]) if m is not None and reinject == "mask" and len(timesteps) > 1 else None
    x0 = x
    prev_x0, prev_h = None, None  # dpm++2m: the previous prediction and λ increment
    for i, t in enumerate(tqdm(timesteps, desc=f"{sampler} {steps} steps", disable=not progress, leave=False)):
        t_vec = torch.full((ids.shape[0],), t, device=device, dtype=torch.long)
        x_in = x if hidden is None else torch.where(hidden, m, x)  # mask: the network sees m there
        with autocast(device, dtype):
            x0 = model(x_in, t_vec, doc_ids).float()
        if clamp:
            x0 = nearest_embedding(model.embed.weight, x0)
        x0 = torch.where(mask, x0, src)
        if i + 1 == len(timesteps):
            break
        s = timesteps[i + 1]
        ab_t, ab_s = float(ab[t]), float(ab[s])
        pred = x0
        if m is not None:  # absorbing: the Gaussian updates act on y = x − m, ŷ0 = x̂0 − m
            x, x0 = x - m, x0 - m
        if sampler == "ddpm":
            beta = 1.0 - ab_t / ab_s
            mean = (ab_s**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t)) * x
            var = beta * (1 - ab_s) / (1 - ab_t)
            z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
            x = mean + var**0.5 * z
        elif sampler == "ddim":
            eps = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
            x = ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * eps
        else:  # dpm++2m (Lu et al. 2022, Algorithm 2)
            alpha_s, sigma_t, sigma_s = ab_s**0.5, (1 - ab_t) ** 0.5, (1 - ab_s) ** 0.5
            h = 0.5 * (math.log(ab_s / (1 - ab_s)) - math.log(ab_t / (1 - ab_t)))  # λ_s − λ_t > 0
            if prev_x0 is None:
                d = x0  # first step: first order (= DDIM)
            else:
                half_inv_r = h / (2 * prev_h)  # 1/(2r) with r = h_prev / h
                d = (1 + half_inv_r) * x0 - half_inv_r * prev_x0
            x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
            prev_x0, prev_h = x0, h
        if m is not None:
            x, x0 = x + m, pred
            last = i + 2 == len(timesteps)  # s is the final step: its prediction sees every position
            if reinject == "mask":
                hidden = None if last else absorbed_at(s)
            elif not last:  # replace: the trajectory itself jumps to m
                x = torch.where(absorbed_at(s), m, x)
        x = torch.where(mask, x, src)
    return x0


def round_to_tokens(model, x0: torch.Tensor, ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
    """Token ids: the source as given, each target position the word whose embedding scores highest."""
    tokens = model.get_logits(x0.float()).argmax(dim=-1)
    return torch.where(input_mask, tokens, ids)
