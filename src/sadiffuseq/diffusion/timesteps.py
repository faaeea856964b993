"""Which diffusion steps to train on.

``uniform`` draws t uniformly. ``loss_aware`` is DiffuSeq's importance sampling (from Nichol & Dhariwal 2021):
keep the last ``history`` losses seen at every t, draw t with probability ∝ sqrt(E[loss_t²]) (mixed with a
little uniform mass so no step starves), and weight each example by 1 / (T · p_t) so the loss stays an
unbiased estimate of the uniform-t objective. Until every t has a full history it behaves as uniform.

Both samplers own a ``torch.Generator`` and expose ``state_dict`` / ``load_state_dict`` so a resumed run draws
exactly the steps the uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch


class UniformSampler:
    def __init__(self, steps: int, seed: int = 0):
        self.steps = steps
        self.generator = torch.Generator().manual_seed(seed)

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.steps,), 1.0 / self.steps, dtype=torch.float64)

    def sample(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (t, weights) with weights = 1 / (T · p_t)."""
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=self.generator)
        w = 1.0 / (self.steps * p[t])
        return t.to(device), w.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class LossAwareSampler(UniformSampler):
    def __init__(self, steps: int, seed: int = 0, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(steps, seed)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(steps, history, dtype=torch.float64)
        self.counts = torch.zeros(steps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        w = self.losses.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.steps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.counts[ti])
            if n < self.history:
                self.losses[ti, n] = li
            else:  # drop the oldest
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            self.counts[ti] = n + 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def make_timestep_sampler(name: str, steps: int, seed: int = 0) -> UniformSampler:
    return {"uniform": UniformSampler, "loss_aware": LossAwareSampler}[name](steps, seed)
