"""The forward (noising) process and the training loss of DiffuSeq, in embedding space.

Notation: ``ids`` is a batch of token rows ``[BOS] src [SEP] trg [EOS] [PAD]…``; ``input_mask`` is True on the
positions the model must generate (target, EOS and padding — predicting PAD is how the model chooses the
output length, as in DiffuSeq; in packed rows, each segment's target and EOS, and ``doc_ids`` keeps the
segments apart). Source positions are never noised (*partial noising*).

* ``x0 = E[w] + sqrt(1-ᾱ_0) ε``: the clean embedding plus the tiny noise of step 0, so x0 is a continuous
  variable and the rounding loss below has something to learn from.
* ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` on target positions; ``x_t = x0`` on source positions.
* The network predicts x0. Per target position:

  - ``mse``: ‖x̂0 − x0‖² / d_emb (at t = 0 the target is E[w] itself, as in DiffuSeq);
  - ``rounding``: cross-entropy of the token given x0 (logits x0·Eᵀ) — keeps embeddings decodable;
  - ``prior``: ‖sqrt(ᾱ_{T-1}) x0‖² / d_emb — the mean of q(x_T | x0) must be ≈ 0 so sampling can start at
    N(0, I);
  - ``pred_ce`` (reported always, weighted by ``pred_ce_weight``, 0 by default): cross-entropy of the token
    given the *prediction* x̂0 — the quantity decoding actually relies on.

  Each term is averaged over the target positions of its row (DiffuSeq averaged over source positions too,
  which dilutes the loss with positions that are never generated), giving one loss per example so that
  loss-aware timestep sampling can track it.

:meth:`Diffusion.noise_inputs` is the single place where x_t is made, so other corruptions extend the process
by overriding it.

**Soft absorbing state** (DiffuSeq-v2, Gong et al. 2023; ``diffusion.absorbing``). A learned vector m ∈ R^{d_emb}
(the model's parameter ``absorb``) plays the role of a [MASK] embedding:

* the Gaussian part is centred on m: ``x_t = sqrt(ᾱ_t)(x0 − m) + sqrt(1−ᾱ_t) ε + m`` on target positions, so
  x_T → m + N(0, I) and sampling starts there;
* then each target position is replaced by m with probability ``p_t = γ·sqrt(1−ᾱ_t)`` (``absorb_gamma``).
  Padding positions are targets and may be absorbed like any other; source positions never are.
* the loss gains ``absorb_reg·‖m‖`` (reported as ``absorb_reg``), and the prior term uses the m-centred mean:
  ``‖sqrt(ᾱ_{T-1})(x0 − m)‖² / d_emb`` — the mean of q(x_T | x0) minus m, which must be ≈ 0 for sampling to start
  at m + N(0, I). m is learned through x_t (the network input) and through the prior and the regulariser.

Our tailoring to sparse attention (ablatable): the first ``absorb_protect_global`` positions of a row — the
global tokens, ``model.global_first`` — are never absorbed (every other position reads them, so they are kept
clean); and with ``absorb_stratified`` the absorbed positions are not independent Bernoulli draws but, inside
every window of ``absorb_window`` consecutive absorbable target positions (counted per row, after the protected
ones are removed), exactly ``round(p_t · n_window)`` positions chosen uniformly at random, so every attention
window sees the same absorbed fraction. Random draws: the Gaussian noise first, then the absorbing draws, from
torch's default generator in training (``generator`` for sampling), so resumed runs stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sadiffuseq.config import DiffusionConfig
from sadiffuseq.diffusion.schedule import alphas_cumprod


class Diffusion:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.steps = cfg.steps
        ab = alphas_cumprod(cfg.schedule, cfg.steps)  # float64, (T,)
        self.alphas_cumprod = ab
        self.sqrt_ab = ab.sqrt().float()
        self.sqrt_1m_ab = (1.0 - ab).sqrt().float()
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    # -- forward process -------------------------------------------------------------------------------------

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Copied to the device once: a copy from (pageable) host memory waits for the device's queue every time.
        key = (id(table), t.device)
        if key not in self._device_tables:
            self._device_tables[key] = table.to(t.device)
        return self._device_tables[key][t][:, None, None]

    def x_start(self, emb: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(emb) if noise is None else noise
        return emb + float(self.sqrt_1m_ab[0]) * noise

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x_t on masked (target) positions; x0 unchanged elsewhere."""
        x_t = self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_1m_ab, t) * noise
        return torch.where(mask[..., None], x_t, x0)

    def noise_inputs(
        self, x0: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, absorb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Make the network input x_t from x0. Override to add other corruptions.

        With ``diffusion.absorbing``, ``absorb`` is the vector m (d_emb,): the Gaussian part is centred on m and
        target positions are then absorbed into m with probability γ·sqrt(1−ᾱ_t) (see the module docstring).
        """
        if not self.cfg.absorbing:
            return self.q_sample(x0, t, torch.randn_like(x0), mask)
        if absorb is None:
            raise ValueError("diffusion.absorbing=true needs the absorbing vector m (the model's `absorb`)")
        m = absorb.to(x0.dtype)
        gauss = self._at(self.sqrt_ab, t) * (x0 - m) + self._at(self.sqrt_1m_ab, t) * torch.randn_like(x0) + m
        x_t = torch.where(mask[..., None], gauss, x0)
        absorbed = self.absorb_positions(mask, self.absorb_prob(t))
        return torch.where(absorbed[..., None], m, x_t)

    # -- soft absorbing state --------------------------------------------------------------------------------

    def absorb_vector(self, model) -> torch.Tensor | None:
        """The model's absorbing vector m when ``diffusion.absorbing`` is on, else None."""
        if not self.cfg.absorbing:
            return None
        m = getattr(model, "absorb", None)
        if m is None:
            raise ValueError(
                "diffusion.absorbing=true but the model has no absorbing vector: build it with "
                "Denoiser(..., absorbing=True) (train.build_model and checkpoint.load_model do)"
            )
        return m

    def absorb_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p_t = γ·sqrt(1−ᾱ_t) for each step in t, shape (B,), float32."""
        return self.cfg.absorb_gamma * self._at(self.sqrt_1m_ab, t)[:, 0, 0]

    def absorb_positions(
        self, mask: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Which positions (B, L) to replace by m: target positions past the protected ones, each row at rate p (B,).

        Independent Bernoulli(p) draws, or (``absorb_stratified``) exactly round(p·n) uniformly chosen positions
        in every window of ``absorb_window`` consecutive absorbable positions of a row (n: the window's size; the
        last window of a row may be shorter).
        """
        c = self.cfg
        eligible = mask.bool().clone()
        eligible[:, : c.absorb_protect_global] = False
        B, L = eligible.shape
        u = torch.rand((B, L), generator=generator, device=mask.device, dtype=torch.float64)
        p = p.to(mask.device, torch.float64)
        if not c.absorb_stratified:
            return eligible & (u < p[:, None])
        W = c.absorb_window
        n_win = -(-L // W)
        rank = eligible.long().cumsum(1) - 1  # rank among the absorbable positions of the row
        win = torch.where(eligible, rank // W, torch.full_like(rank, n_win))  # window n_win: not absorbable
        counts = torch.zeros(B, n_win + 1, dtype=torch.long, device=mask.device)
        counts.scatter_add_(1, win, torch.ones_like(win))  # positions per window
        quota = torch.round(p[:, None] * counts.double()).long()
        quota[:, n_win] = 0
        start = counts.cumsum(1) - counts  # first sorted index of each window
        # Sort each row by window, in random order inside a window (two stable sorts: by u, then by window).
        by_u = u.argsort(dim=1, stable=True)
        order = by_u.gather(1, win.gather(1, by_u).argsort(dim=1, stable=True))
        win_sorted = win.gather(1, order)
        index_in_win = torch.arange(L, device=mask.device)[None, :] - start.gather(1, win_sorted)
        take = index_in_win < quota.gather(1, win_sorted)
        return torch.zeros_like(eligible).scatter_(1, order, take)

    # -- loss ------------------------------------------------------------------------------------------------

    def training_losses(self, model, batch: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example loss terms (each of shape (B,)); ``loss`` is the weighted sum that is optimised."""
        ids, mask = batch["ids"], batch["input_mask"]
        # The target positions, found once and first: finding them needs the device to report how many there
        # are, a synchronisation that costs nothing while the device has no work queued yet, and would otherwise
        # stall the host behind the whole forward pass (several times: once per boolean index).
        targets = mask.reshape(-1).nonzero().squeeze(1)
        emb = model.get_embeds(ids)
        x0 = self.x_start(emb)
        m = self.absorb_vector(model)  # None unless diffusion.absorbing
        x_t = self.noise_inputs(x0, t, mask) if m is None else self.noise_inputs(x0, t, mask, absorb=m)
        pred = model(x_t, t, batch.get("doc_ids"))

        target = torch.where((t == 0)[:, None, None], emb, x0)
        maskf = mask.float()
        n_target = maskf.sum(1).clamp(min=1.0)

        def masked_mean(per_position: torch.Tensor) -> torch.Tensor:
            return (per_position.float() * maskf).sum(1) / n_target

        mse = masked_mean((pred.float() - target.float()).pow(2).mean(-1))
        centred = x0.float() if m is None else x0.float() - m.float()  # absorbing: q(x_T | x0) is centred on m
        prior = masked_mean((float(self.sqrt_ab[-1]) * centred).pow(2).mean(-1))
        rounding = masked_mean(self._token_ce(model, x0, ids, targets))
        c = self.cfg
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.pred_ce_weight > 0):  # a metric unless weighted
            pred_ce = masked_mean(self._token_ce(model, pred, ids, targets))
        loss = mse + c.rounding_weight * rounding + c.prior_weight * prior + c.pred_ce_weight * pred_ce
        extra = {}
        if m is not None:  # absorb_reg·‖m‖, the same for every example
            extra["absorb_reg"] = (c.absorb_reg * m.float().norm()).expand_as(loss)
            loss = loss + extra["absorb_reg"]
        aux_losses = getattr(model, "aux_losses", None)  # MoE: load balancing and router z-loss (moe.py)
        for name, (value, weight) in ((aux_losses() if aux_losses else None) or {}).items():
            extra[name] = value.float().expand_as(loss)  # one scalar per batch, the same for every example
            loss = loss + weight * extra[name]
        return {"loss": loss, "mse": mse, "rounding": rounding, "prior": prior, "pred_ce": pred_ce, **extra}

    @staticmethod
    def _token_ce(model, x: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the tokens given vectors x (B, L, d), computed only at the flat positions ``targets``
        (saves B·L·V memory); zero elsewhere."""
        logits = model.get_logits(x.reshape(-1, x.shape[-1]).index_select(0, targets)).float()
        ce = F.cross_entropy(logits, ids.reshape(-1).index_select(0, targets), reduction="none")
        out = torch.zeros(ids.numel(), device=ids.device, dtype=torch.float32).index_copy(0, targets, ce)
        return out.view(ids.shape)
