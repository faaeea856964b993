"""SparseSelfAttention: the SA-DiffuSeq attention module (``model.attention: sparse``).

Each head has a dilation (``model.dilations``, default 1) and sees the tokens in its own order (see
``patterns.Layout``). The ``flex`` backend runs all heads in one kernel call; ``banded`` and ``dense`` run each
group of heads of equal dilation separately. Every head of a layer uses the
layer's window (``model.layer_windows`` or ``model.window``) and the same global tokens. Rotary position
embeddings are applied before any reordering, so positions keep their original meaning.

With ``model.global_proj`` the rows of the global tokens are recomputed with their own query/key/value
projections over all keys, as in Longformer's separate global attention.

On the ``flex`` backend the Python side of the attention (layouts, BlockMask, schedule) is a
:class:`~sadiffuseq.attention.backends.FlexPlan`, made by the Denoiser once per forward and pattern before its
blocks run; a compiled block then traces the attention into its own graph (see ``Denoiser.compile_blocks``).
Called on its own (``attend``), the layer makes the plan itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sadiffuseq.attention import flash, patterns
from sadiffuseq.attention.backends import FlexPlan, flex_plan, resolve_backend, run_flex_plan, run_group
from sadiffuseq.attention.rotary import apply_rotary
from sadiffuseq.config import ModelConfig


class SparseSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.window = cfg.layer_windows[layer] if cfg.layer_windows else cfg.window
        self.global_first, self.global_every = cfg.global_first, cfg.global_every
        self.backend = cfg.attention_backend
        self.global_schedule = cfg.flex_globals
        self.compile_mode = cfg.flex_compile
        # the flash backend's band kernel: auto, cudnn, fa2 (tests may set "reference", plain PyTorch, for the CPU)
        self.flash_kernel = cfg.flash_kernel
        dilations = cfg.dilations or [1] * cfg.n_heads
        self.dilations = tuple(dilations)
        # (dilation, head indices) groups; ``head_order`` restores the original head order after concatenation.
        self.groups = [(d, [h for h, dh in enumerate(dilations) if dh == d]) for d in sorted(set(dilations))]
        order = [h for _, heads in self.groups for h in heads]
        self.register_buffer("head_order", torch.tensor(order).argsort(), persistent=False)
        self.contiguous_groups = order == list(range(cfg.n_heads))
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.global_qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model) if cfg.global_proj else None

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        plan = ctx.plans.get(self.plan_key) if getattr(ctx, "plans", None) else None
        if isinstance(plan, FlexPlan) and plan.in_block_graph and torch.compiler.is_compiling():
            y = run_flex_plan(q, k, v, plan)  # traced into the compiled block's graph: no graph break
        else:
            y = self.attend(q, k, v, ctx.doc_ids, plan)
        if self.global_qkv is not None and self.global_first + self.global_every > 0:
            y = self._global_rows(x, y, ctx)
        return self.out(y.transpose(1, 2).reshape(B, L, D))

    @property
    def plan_key(self) -> tuple:
        """Layers with equal keys share one :class:`~sadiffuseq.attention.backends.FlexPlan`."""
        return (self.backend, self.head_dim, self.window, self.global_first, self.global_every, self.dilations,
                self.global_schedule, self.compile_mode)

    def plan(self, length: int, device: torch.device, doc_ids=None, batch: int = 1):
        """This layer's plan for ``batch`` rows of ``length`` tokens on the backend it resolves to: a
        :class:`~sadiffuseq.attention.backends.FlexPlan` or a :class:`~sadiffuseq.attention.flash.FlashPlan`, None
        for the backends that need none."""
        backend = resolve_backend(self.backend, torch.device(device), self.head_dim)
        if backend == "flash":
            return self.flash_plan(length, device, doc_ids, batch)
        return self.flex_plan(length, device, doc_ids) if backend == "flex" else None

    def flash_plan(self, length: int, device: torch.device, doc_ids=None, batch: int = 1) -> flash.FlashPlan:
        """The ``flash`` backend's plan (head groups, token runs, global tokens) for ``batch`` rows of ``length``."""
        if doc_ids is not None:
            batch = doc_ids.shape[0]
        kernel = flash.resolve_kernel(self.flash_kernel, device, length)
        return flash.plan_for(self.dilations, self.window, length, batch, torch.device(device), self.global_first,
                              self.global_every, doc_ids, kernel)

    def flex_plan(self, length: int, device: torch.device, doc_ids=None) -> FlexPlan | None:
        """This layer's FlexAttention plan for ``length`` tokens (token orders, BlockMask, schedule), or None where
        the layer does not run the ``flex`` backend. Made outside any compiled graph: the layouts and BlockMasks
        are cached in Python, which a graph cannot do."""
        if resolve_backend(self.backend, torch.device(device), self.head_dim) != "flex":
            return None
        heads = patterns.cached_head_layouts(length, self.global_first, self.global_every, self.dilations,
                                             self.window, device)
        return flex_plan(heads, length, doc_ids, self.global_schedule, self.compile_mode)

    @torch.compiler.disable  # the kernels run as their own compiled region; layouts and BlockMasks are Python state
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids=None,
               plan: FlexPlan | None = None) -> torch.Tensor:
        """The sparse pattern on (B, H, L, hd) queries/keys/values (rotary already applied). ``plan``: the flex
        backend's plan when the caller has made it (see :meth:`flex_plan`)."""
        L = q.shape[2]
        backend = resolve_backend(self.backend, q.device, self.head_dim)
        if backend == "flash":  # every head at once: the band through FlashAttention's sliding window
            kernel = flash.resolve_kernel(self.flash_kernel, q.device, L)
            if not flash.kernel_supports(q.device, q.dtype, self.head_dim, kernel):
                need = ("the cuDNN frontend (pip install nvidia-cudnn-frontend), a head width up to 128"
                        if kernel == "cudnn" else "a head width that is a multiple of 8 up to 256")
                raise ValueError(
                    f"attention backend 'flash' with band kernel '{kernel}' needs a CUDA GPU, fp16/bf16 inputs and "
                    f"{need} (got {q.device.type}, {q.dtype}, head width {self.head_dim}); train in bf16 "
                    f"(train.precision), set model.flash_kernel, or set model.attention_backend to auto, flex or "
                    f"banded")
            if not isinstance(plan, flash.FlashPlan):
                plan = self.flash_plan(L, q.device, doc_ids, q.shape[0])
            # model.flex_compile's CUDA-graph modes replay the flash bodies as CUDA graphs too
            graphs = self.compile_mode in ("reduce-overhead", "max-autotune")
            return flash.flash_attention(q, k, v, plan, "reduce-overhead" if graphs else "default")
        if backend == "flex":  # every head at once, each on its own token order
            if not isinstance(plan, FlexPlan):
                plan = self.flex_plan(L, q.device, doc_ids)
            return run_flex_plan(q, k, v, plan)
        is_global = patterns.global_positions(L, self.global_first, self.global_every, device=q.device)
        outs = []
        start = 0
        for d, heads in self.groups:
            if self.contiguous_groups:
                sl = slice(start, start + len(heads))
                qg, kg, vg = q[:, sl], k[:, sl], v[:, sl]
                start += len(heads)
            else:
                idx = torch.tensor(heads, device=q.device)
                qg, kg, vg = q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx)
            layout = patterns.cached_layout(L, self.global_first, self.global_every, d, q.device)
            outs.append(run_group(backend, qg, kg, vg, layout, self.window, is_global, doc_ids))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if not self.contiguous_groups:
            y = y.index_select(1, self.head_order)
        return y

    def _global_rows(self, x, y, ctx):
        """Replace the global tokens' outputs by full attention with the separate global projections."""
        B, L, D = x.shape
        qg, kg, vg = self.global_qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qg, kg = apply_rotary(qg, ctx.cos, ctx.sin), apply_rotary(kg, ctx.cos, ctx.sin)
        is_global = patterns.global_positions(L, self.global_first, self.global_every, device=x.device)
        rows = is_global.nonzero().squeeze(1)
        mask = None
        if ctx.doc_ids is not None:
            mask = (ctx.doc_ids[:, rows, None] == ctx.doc_ids[:, None, :])[:, None]
        g = F.scaled_dot_product_attention(qg[:, :, rows], kg, vg, attn_mask=mask)
        return y.index_copy(2, rows, g)
