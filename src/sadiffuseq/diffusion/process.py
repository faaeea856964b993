"""The forward (noising) process and the training loss of DiffuSeq, in embedding space.

Notation: ``ids`` is a batch of token rows ``[BOS] src [SEP] trg [EOS] [PAD]…``; ``input_mask`` is True on the
positions the model must generate (target, EOS and padding — predicting PAD is how the model chooses the
output length, as in DiffuSeq). Source positions are never noised (*partial noising*).

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

:meth:`Diffusion.noise_inputs` is the single place where x_t is made, so other corruptions (the soft
absorbing state of DiffuSeq-v2) extend the process by overriding it.
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

    # -- forward process -------------------------------------------------------------------------------------

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t][:, None, None]

    def x_start(self, emb: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(emb) if noise is None else noise
        return emb + float(self.sqrt_1m_ab[0]) * noise

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x_t on masked (target) positions; x0 unchanged elsewhere."""
        x_t = self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_1m_ab, t) * noise
        return torch.where(mask[..., None], x_t, x0)

    def noise_inputs(self, x0: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Make the network input x_t from x0. Override to add other corruptions."""
        return self.q_sample(x0, t, torch.randn_like(x0), mask)

    # -- loss ------------------------------------------------------------------------------------------------

    def training_losses(self, model, batch: dict[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example loss terms (each of shape (B,)); ``loss`` is the weighted sum that is optimised."""
        ids, mask = batch["ids"], batch["input_mask"]
        emb = model.get_embeds(ids)
        x0 = self.x_start(emb)
        x_t = self.noise_inputs(x0, t, mask)
        pred = model(x_t, t, batch.get("doc_ids"))

        target = torch.where((t == 0)[:, None, None], emb, x0)
        maskf = mask.float()
        n_target = maskf.sum(1).clamp(min=1.0)

        def masked_mean(per_position: torch.Tensor) -> torch.Tensor:
            return (per_position.float() * maskf).sum(1) / n_target

        mse = masked_mean((pred.float() - target.float()).pow(2).mean(-1))
        prior = masked_mean((float(self.sqrt_ab[-1]) * x0.float()).pow(2).mean(-1))
        rounding = masked_mean(self._token_ce(model, x0, ids, mask))
        c = self.cfg
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.pred_ce_weight > 0):  # a metric unless weighted
            pred_ce = masked_mean(self._token_ce(model, pred, ids, mask))
        loss = mse + c.rounding_weight * rounding + c.prior_weight * prior + c.pred_ce_weight * pred_ce
        return {"loss": loss, "mse": mse, "rounding": rounding, "prior": prior, "pred_ce": pred_ce}

    @staticmethod
    def _token_ce(model, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the tokens given vectors x, computed only at masked positions (saves B·L·V memory)."""
        out = torch.zeros(ids.shape, device=ids.device, dtype=torch.float32)
        logits = model.get_logits(x[mask]).float()
        out[mask] = F.cross_entropy(logits, ids[mask], reduction="none")
        return out
