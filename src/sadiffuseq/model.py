"""The denoiser: a bidirectional transformer that maps a noisy embedding sequence x_t and the step t to x0.

Shape of the computation (DiffuSeq, Gong et al. 2023, with our choices marked)::

    ids ──embed (V × d_emb, tied)──▶ x0 ──(diffusion adds noise on target positions)──▶ x_t
    x_t ──up-projection──▶ h ( + time embedding of t, at every position)
    h ──n_layers × Block(attention, feed-forward)──▶ final LayerNorm ──down-projection──▶ x̂0 (d_emb)
    logits = x̂0 · Eᵀ  (the rounding head reuses the embedding matrix)

Our choices, and why:

* **Rotary position embeddings** rather than DiffuSeq's learned table: nothing to size in advance, so the same
  weights run at 128 or 128k tokens, and relative positions are what window attention needs anyway.
* **Pre-LayerNorm** blocks (DiffuSeq reuses BERT's post-LN): stable at depth and at long lengths without
  warm-up tricks.
* The attention module and the feed-forward module are looked up by name in :data:`ATTENTION` and
  :data:`FFN`, so sparse attention and Mixture-of-Experts plug in through configuration alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sadiffuseq.attention.layer import SparseSelfAttention
from sadiffuseq.attention.rotary import apply_rotary, rotary_tables
from sadiffuseq.config import ModelConfig
from sadiffuseq.moe import MoEFFN, collect_aux_losses, collect_stats, compute_dtype, moe_modules, uses_moe


@dataclass
class AttentionContext:
    """What an attention module may need beyond the hidden states: rotary tables and packing information.

    ``doc_ids`` (B, L) marks which example each position belongs to when several are packed into one row;
    positions only attend within their own example. ``None`` means one example per row. ``plans``: the sparse
    attention's FlexAttention plans for this forward, one per distinct pattern (``SparseSelfAttention.plan_key``),
    made once before the blocks run so that compiled blocks can trace the attention into their graphs.
    """

    cos: torch.Tensor  # (L, head_dim/2)
    sin: torch.Tensor  # (L, head_dim/2)
    doc_ids: torch.Tensor | None = None
    plans: dict | None = None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) diffusion steps, as in the Transformer / DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class DenseSelfAttention(nn.Module):
    """Full bidirectional attention through PyTorch SDPA (FlashAttention on GPU): the DiffuSeq baseline."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        mask = None
        if ctx.doc_ids is not None:  # packed rows: block-diagonal mask, (B, 1, L, L)
            mask = (ctx.doc_ids[:, :, None] == ctx.doc_ids[:, None, :])[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class DenseFFN(nn.Module):
    """The position-wise feed-forward of a transformer block (GELU)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        hidden = int(cfg.ffn_mult * cfg.d_model)
        self.up = nn.Linear(cfg.d_model, hidden)
        self.down = nn.Linear(hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


# Registries: config name → module class. Sparse attention and MoE register here.
ATTENTION: dict[str, type[nn.Module]] = {"dense": DenseSelfAttention, "sparse": SparseSelfAttention}
FFN: dict[str, type[nn.Module]] = {"dense": DenseFFN, "moe": MoEFFN}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = ATTENTION[cfg.attention](cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        # With model.ffn=moe, the layers not listed in model.moe_layers keep the dense feed-forward.
        self.ffn = FFN[cfg.ffn if cfg.ffn != "moe" or uses_moe(cfg, layer) else "dense"](cfg, layer)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = h + self.drop(self.attn(self.ln1(h), ctx))
        return h + self.drop(self.ffn(self.ln2(h)))


class Denoiser(nn.Module):
    """Predicts x0 (in embedding space, width d_emb) from x_t and the diffusion step t."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, absorbing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        d, e = cfg.d_model, cfg.d_emb
        # N(0, 1) word embeddings as in DiffuSeq: their scale matches the unit-variance noise.
        self.embed = nn.Embedding(vocab_size, e)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.up = nn.Sequential(nn.Linear(e, d), nn.Tanh(), nn.Linear(d, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.ln_in = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self._moes = moe_modules(self.blocks)  # found once: the forward visits them every call
        self.ln_out = nn.LayerNorm(d)
        self.down = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, e))
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # The learned soft absorbing vector m of DiffuSeq-v2 (diffusion.absorbing; None otherwise). Our choice:
        # zeros, so that at initialisation the m-centred Gaussian noising is exactly DiffuSeq's and m sits at the
        # mean of the N(0, 1) word embeddings, far (norm 0 vs ≈sqrt(d_emb)) from every word; no RNG is used, so
        # the other parameters are initialised identically with and without it.
        if absorbing:
            self.absorb = nn.Parameter(torch.zeros(e))
        else:
            self.register_parameter("absorb", None)

    def get_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def get_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Rounding head: similarity of each vector to every word embedding (tied weights)."""
        return x @ self.embed.weight.t().to(x.dtype)

    def _rope(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, device)
        if key not in self._rope_cache:
            head_dim = self.cfg.d_model // self.cfg.n_heads
            self._rope_cache[key] = rotary_tables(length, head_dim, self.cfg.rope_base, device)
        return self._rope_cache[key]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x_t.shape
        dtype = compute_dtype(x_t)
        for m in self._moes:
            m.prepare(x_t.device, dtype)  # before any compiled block traces it
            if self.training and torch.is_grad_enabled():  # auxiliary-loss-free balancing: last step's counts
                m.apply_bias_update()
        h = self.up(x_t) + self.time_mlp(timestep_embedding(t, self.cfg.d_model).to(x_t.dtype))[:, None, :]
        h = self.drop(self.ln_in(h))
        cos, sin = self._rope(L, x_t.device)
        ctx = AttentionContext(cos=cos, sin=sin, doc_ids=doc_ids, plans=self._plans(L, x_t.device, doc_ids, B))
        for block in self.blocks:
            if self.cfg.grad_checkpoint and self.training:
                h = checkpoint(block, h, ctx, use_reentrant=False)
            else:
                h = block(h, ctx)
        return self.down(self.ln_out(h))

    def _plans(self, length: int, device: torch.device, doc_ids, batch: int) -> dict | None:
        """One sparse-attention plan per distinct pattern among the blocks (None without any)."""
        plans = {}
        for block in self.blocks:
            attn = block.attn
            if isinstance(attn, SparseSelfAttention) and attn.plan_key not in plans:
                plan = attn.plan(length, device, doc_ids, batch)
                if plan is not None:
                    plans[attn.plan_key] = plan
        return plans or None

    def compile_blocks(self, **compile_options) -> "Denoiser":
        """Compile each transformer block in place (regional compilation, as torchtitan does): one compiled
        graph serves every layer of equal configuration, compile time stays small, and parameter names are
        unchanged, so checkpoints do not depend on it. The sparse attention is traced into the blocks' graphs
        where its compile mode is the default one (below 16k tokens with ``model.flex_compile=auto``; its Python
        side — layouts, BlockMasks — is planned before the blocks run, see ``AttentionContext.plans``), and runs as
        its own region with its own mode otherwise (autotuned kernels from 16k); MoE layers are regions of their
        own. What the blocks' graphs fuse besides is the rest — LayerNorms, projections, rotary embedding, GELU,
        residuals — which at 32k tokens costs more than the sparse attention itself."""
        for block in self.blocks:
            block.compile(**compile_options)  # options of torch.compile, e.g. backend or mode
        for moe in self.moe_modules():
            moe.compile_routed(**compile_options)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_modules(self) -> list[MoEFFN]:
        return list(self._moes)

    def aux_losses(self) -> dict[str, tuple[torch.Tensor, float]] | None:
        """MoE auxiliary losses of the last forward, ``{name: (sum over MoE layers, weight)}``; None without MoE."""
        return collect_aux_losses(self.moe_modules(), self.cfg)

    def moe_stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per-layer MoE statistics of the last forward (expert load, router entropy, dropped pairs); see moe.py."""
        return collect_stats(self.moe_modules())
