"""Reverse processes: from x_T ~ N(0, I) on target positions to x0, with the source held fixed.

Every sampler here works with an x0-predicting ``model(x_t, t) -> x̂0`` and a descending list of the training
steps to visit (*respacing*, Nichol & Dhariwal 2021: visiting K of the T steps with the same ᾱ values). After
every step the source positions are re-imposed (they were never noised in training either).

* ``ddpm``: ancestral sampling from the posterior q(x_s | x_t, x̂0) between consecutive visited steps t > s:
  β' = 1 − ᾱ_t/ᾱ_s, mean = sqrt(ᾱ_s)β'/(1−ᾱ_t) · x̂0 + sqrt(1−β')(1−ᾱ_s)/(1−ᾱ_t) · x_t,
  variance = β'(1−ᾱ_s)/(1−ᾱ_t).
* ``ddim``: the deterministic DDIM update (η = 0, Song et al. 2021): ε̂ = (x_t − sqrt(ᾱ_t) x̂0)/sqrt(1−ᾱ_t),
  x_s = sqrt(ᾱ_s) x̂0 + sqrt(1−ᾱ_s) ε̂.

Optional *clamping* (Diffusion-LM) snaps every x̂0 to its nearest word embedding before it is used.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.utils import autocast

SAMPLERS = ("ddpm", "ddim")


def respaced_timesteps(total: int, steps: int) -> list[int]:
    """``steps`` training steps evenly spread over [0, total-1], descending; always includes total-1 and 0."""
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    if steps == 1:
        return [total - 1]
    ts = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long().unique()
    return ts.flip(0).tolist()


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
) -> torch.Tensor:
    """Run the reverse process; returns the final x̂0 (B, L, d_emb) in float32.

    ``ids`` supplies the source tokens (its target positions are ignored); ``input_mask`` marks the positions
    to generate.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    device = ids.device
    src = model.get_embeds(ids).float()
    mask = input_mask[..., None]
    noise = torch.randn(src.shape, generator=generator, device=device, dtype=torch.float32)
    x = torch.where(mask, noise, src)
    ab = diffusion.alphas_cumprod
    timesteps = respaced_timesteps(diffusion.steps, steps)
    x0 = x
    for i, t in enumerate(tqdm(timesteps, desc=f"{sampler} {steps} steps", disable=not progress, leave=False)):
        t_vec = torch.full((ids.shape[0],), t, device=device, dtype=torch.long)
        with autocast(device, dtype):
            x0 = model(x, t_vec, doc_ids).float()
        if clamp:
            x0 = nearest_embedding(model.embed.weight, x0)
        x0 = torch.where(mask, x0, src)
        if i + 1 == len(timesteps):
            break
        s = timesteps[i + 1]
        ab_t, ab_s = float(ab[t]), float(ab[s])
        if sampler == "ddpm":
            beta = 1.0 - ab_t / ab_s
            mean = (ab_s**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t)) * x
            var = beta * (1 - ab_s) / (1 - ab_t)
            z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
            x = mean + var**0.5 * z
        else:
            eps = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
            x = ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * eps
        x = torch.where(mask, x, src)
    return x0


def round_to_tokens(model, x0: torch.Tensor, ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
    """Token ids: the source as given, each target position the word whose embedding scores highest."""
    tokens = model.get_logits(x0.float()).argmax(dim=-1)
    return torch.where(input_mask, tokens, ids)
