"""Noise schedules: ᾱ_t, the fraction of signal variance left after t of T discrete steps.

Each schedule is defined by a continuous ᾱ(s), s ∈ [0, 1], discretised as in Nichol & Dhariwal (2021):
β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), 0.999), ᾱ_t = Π_{i≤t} (1 - β_i). The ``sqrt`` schedule is DiffuSeq's
(Li et al. 2022, Diffusion-LM): ᾱ(s) = 1 - sqrt(s + 1e-4), which adds noise quickly at first — word
embeddings are easy to recognise under small noise, so little training signal is spent there.
"""

from __future__ import annotations

import math

import torch

MAX_BETA = 0.999


def _alpha_bar_fn(name: str):
    if name == "sqrt":
        return lambda s: 1.0 - math.sqrt(s + 1e-4)
    if name == "cosine":
        return lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    raise ValueError(f"unknown noise schedule {name!r}")


def betas(name: str, steps: int) -> torch.Tensor:
    """β_1..β_T as float64."""
    if name == "linear":
        scale = 1000.0 / steps  # DDPM's 1e-4..0.02 range, rescaled so any T spans the same total noise
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    f = _alpha_bar_fn(name)
    return torch.tensor(
        [min(1.0 - f((i + 1) / steps) / f(i / steps), MAX_BETA) for i in range(steps)], dtype=torch.float64
    )


def alphas_cumprod(name: str, steps: int) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 (float64, strictly decreasing)."""
    return torch.cumprod(1.0 - betas(name, steps), dim=0)
