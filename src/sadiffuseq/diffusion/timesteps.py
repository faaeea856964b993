"""Which diffusion steps to train on.

``uniform`` draws t uniformly. ``loss_aware`` is DiffuSeq's importance sampling (from Nichol & Dhariwal 2021):
keep the last ``history`` losses seen at every t, draw t with probability ∝ sqrt(E[loss_t²]) (mixed with a
little uniform mass so no step starves), and weight each example by 1 / (T · p_t) so the loss stays an
unbiased estimate of the uniform-t objective. Until every t has a full history it behaves as uniform.

Both samplers own a ``torch.Generator`` and expose ``state_dict`` / ``load_state_dict`` so a resumed run draws
exactly the steps the uninterrupted run would have drawn.

On a GPU the loss-aware sampler does not read the losses back when it is told them: that would make the host wait
for the whole training step at the end of every step, so it could not queue the next one while the GPU works. The
losses are copied to the host without waiting and entered one step later (at the sample after next), by which time
that copy has long finished; the draw at step n therefore uses the losses of steps ≤ n − 2 — deterministic, and
with ``history`` losses per step out of thousands of steps, no measurable change to the distribution.
"""

from __future__ import annotations

from collections import deque

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
    def __init__(self, steps: int, seed: int = 0, history: int = 10, uniform_prob: float = 0.001,
                 defer: bool | None = None):
        super().__init__(steps, seed)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(steps, history, dtype=torch.float64)
        self.counts = torch.zeros(steps, dtype=torch.long)
        # defer: enter each update one step late without waiting for it (None: when the losses live on a GPU)
        self.defer = defer
        self._pending: deque = deque()  # (t, losses, CUDA event or None), host tensors, oldest first

    def sample(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._pending) > 1:  # every deferred update but the last step's
            self._enter(*self._pending.popleft())
        return super().sample(batch_size, device)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        w = self.losses.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.steps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        losses = losses.detach().double()
        defer = self.defer if self.defer is not None else losses.device.type == "cuda"
        if not defer:
            self._enter(t, losses, None)
            return
        event = None
        if losses.device.type == "cuda":  # copy into pinned memory without waiting; the event marks its end
            t_host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            loss_host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True).copy_(losses, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            t, losses = t_host, loss_host
        self._pending.append((t, losses, event))

    def _enter(self, t: torch.Tensor, losses: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()  # long finished by now: recorded a whole training step ago
        for ti, li in zip(t.tolist(), losses.cpu().tolist()):
            n = int(self.counts[ti])
            if n < self.history:
                self.losses[ti, n] = li
            else:  # drop the oldest
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            self.counts[ti] = n + 1

    def state_dict(self) -> dict:
        """Includes the updates not yet entered (waiting for their copies), so a resumed run enters them when the
        uninterrupted one would."""
        pending = []
        for t, losses, event in self._pending:
            if event is not None:
                event.synchronize()
            pending.append((t.cpu().clone(), losses.cpu().clone()))
        return {**super().state_dict(), "losses": self.losses.clone(), "counts": self.counts.clone(),
                "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])
        self._pending = deque((t, losses, None) for t, losses in state.get("pending", []))


def make_timestep_sampler(name: str, steps: int, seed: int = 0) -> UniformSampler:
    return {"uniform": UniformSampler, "loss_aware": LossAwareSampler}[name](steps, seed)
