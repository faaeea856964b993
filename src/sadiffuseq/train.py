"""The training loop.

One step: draw a batch (length-bucketed rows, or packed rows with ``data.packing``), draw diffusion steps t (loss-aware importance sampling), compute the
per-example losses of :class:`~sadiffuseq.diffusion.process.Diffusion`, weight them by the importance weights,
back-propagate, clip, AdamW, update the EMA weights and the timestep sampler's loss history.

Everything that decides what happens next — parameters, optimizer moments, EMA, the step, the position in the
data stream, the timestep sampler and the RNG states — is saved in the checkpoint, so ``--resume`` continues
with exactly the losses the uninterrupted run would have produced (tested in ``tests/test_train.py``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sadiffuseq.checkpoint import (
    EMA,
    find_checkpoint,
    has_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from sadiffuseq.config import Config, save_config
from sadiffuseq.data.dataset import TokenizedSplit, describe, ensure_dataset, fixed_batches, make_batch_stream
from sadiffuseq.diffusion.process import Diffusion
from sadiffuseq.diffusion.timesteps import make_timestep_sampler
from sadiffuseq.errors import UserError
from sadiffuseq.model import Denoiser
from sadiffuseq.moe import MoEStatsMeter
from sadiffuseq.utils import autocast, autocast_dtype, resolve_device


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr``, then linear or cosine decay to 0 at ``steps`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    if cfg.decay == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def build_model(cfg: Config, vocab_size: int, device: torch.device) -> Denoiser:
    torch.manual_seed(cfg.train.seed)
    return Denoiser(cfg.model, vocab_size, absorbing=cfg.diffusion.absorbing).to(device)


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # No weight decay on biases, norms and the word embeddings (their scale is tied to the noise scale).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.startswith("embed") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=device.type == "cuda")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model, diffusion: Diffusion, split: TokenizedSplit, cfg: Config, device, dtype) -> dict[str, float]:
    """Mean loss terms over a fixed set of validation batches at fixed, uniformly drawn steps.

    Runs under a forked RNG with a fixed seed: the numbers are comparable across steps and runs, and the
    training RNG stream is left untouched (so evaluating does not change what training does next). The batches
    have the training layout (packed rows with ``data.packing``), so the loss is averaged over the same kind of
    rows as in training.
    """
    was_training = model.training
    model.eval()
    batches = fixed_batches(split, cfg.data, cfg.train.batch_size, cfg.train.eval_batches, seed=1234)
    gen = torch.Generator().manual_seed(4321)
    totals: dict[str, float] = {}
    n = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(1234)
        for batch in batches:
            batch = to_device(batch, device)
            rows = batch["ids"].shape[0]
            t = torch.randint(0, diffusion.steps, (rows,), generator=gen).to(device)
            with autocast(device, dtype):
                losses = diffusion.training_losses(model, batch, t)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.float().sum())
            n += rows
    model.train(was_training)
    return {f"val_{k}": v / max(n, 1) for k, v in totals.items()}


class MetricsLog:
    """Append-only JSONL of training metrics; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: Config, resume: bool = False, progress: bool = True, log=print) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the run directory."""
    run_dir = Path(cfg.train.out_dir)
    if not resume and has_checkpoint(run_dir):
        raise UserError(
            f"{run_dir} already holds a training run; continue it with `sadiffuseq train --resume {run_dir}` "
            "or choose another --train.out_dir"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.dtype, device)

    meta = ensure_dataset(cfg.data, cfg.data_dir, progress=progress)
    log(describe(meta))
    train_split = TokenizedSplit(cfg.data_dir, "train")
    valid_split = TokenizedSplit(cfg.data_dir, "valid")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer_path = run_dir / "tokenizer.json"
    shutil.copyfile(cfg.data_dir / "tokenizer.json", tokenizer_path)

    model = build_model(cfg, meta["vocab_size"], device)
    diffusion = Diffusion(cfg.diffusion)
    optimizer = make_optimizer(model, cfg, device)
    ema = EMA(model, cfg.train.ema_decay)
    ts_sampler = make_timestep_sampler(cfg.diffusion.timestep_sampler, cfg.diffusion.steps, seed=cfg.train.seed)
    # data.packing: rows of exactly data.seq_len holding several examples (with doc_ids), else bucketed rows.
    stream = make_batch_stream(train_split, cfg.data, cfg.train.batch_size, seed=cfg.train.seed)
    step = 0

    if resume:
        ckpt = find_checkpoint(run_dir)
        state = load_trainer_state(ckpt)
        model.load_state_dict(load_weights(ckpt, "raw"))
        ema.load(load_weights(ckpt, "ema"), state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        ts_sampler.load_state_dict(state["timestep_sampler"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step = state["step"]
        log(f"resumed {ckpt} at step {step}")
    else:
        torch.manual_seed(cfg.train.seed + 1)  # the training noise stream, independent of the init stream
    metrics = MetricsLog(run_dir / "metrics.jsonl", step if resume else None)

    if cfg.train.compile:
        model.compile_blocks()
    fwd = model
    # MoE: per-layer expert load, router entropy and dropped pairs, averaged over the steps of each log interval.
    moe_meter = MoEStatsMeter() if model.moe_modules() else None
    n_params = model.num_parameters()
    log(f"model: {n_params / 1e6:.2f}M parameters, device {device}, autocast {dtype or 'fp32'}; run dir {run_dir}")

    def trainer_state() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "timestep_sampler": ts_sampler.state_dict(),
            "data": stream.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
        }

    def save() -> Path:
        return save_checkpoint(
            run_dir, step, model, ema, cfg, tokenizer_path, trainer_state(), keep=cfg.train.keep_checkpoints
        )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    sums: dict[str, float] = {}
    seen_rows = seen_targets = interval_steps = 0
    t_last = started = time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=step, desc="training", disable=not progress, dynamic_ncols=True)
    while step < cfg.train.steps:
        batch = to_device(stream.next(), device)
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays (compile modes with graphs)
        t, weights = ts_sampler.sample(batch["ids"].shape[0], device)
        with autocast(device, dtype):
            losses = diffusion.training_losses(fwd, batch, t)
        loss = (losses["loss"] * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        lr = lr_at(step, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        ema.update(model)
        ts_sampler.update(t, losses["loss"])
        step += 1

        # Accumulate on the device; read back (one synchronisation) only at log steps.
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float().mean()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        if moe_meter is not None:
            moe_meter.add(model.moe_stats())
        seen_rows += batch["ids"].numel()
        seen_targets = seen_targets + batch["input_mask"].sum() - batch["pad_mask"].sum()
        interval_steps += 1
        bar.update(1)

        out_of_time = cfg.train.time_limit_min > 0 and time.perf_counter() - started > 60 * cfg.train.time_limit_min
        if step % cfg.train.log_every == 0 or step == cfg.train.steps or out_of_time:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_last
            record = {"step": step, "lr": lr}
            record.update({k: float(v) / interval_steps for k, v in sums.items()})
            record["tokens_per_s"] = seen_rows / elapsed
            record["target_tokens_per_s"] = int(seen_targets) / elapsed
            if moe_meter is not None:
                record.update(moe_meter.flush())
            if device.type == "cuda":
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                record.update(validation_loss(model, diffusion, valid_split, cfg, device, dtype))
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            sums, seen_rows, seen_targets, interval_steps = {}, 0, 0, 0
            t_last = time.perf_counter()
        if out_of_time:
            log(f"\nstopping at step {step}: train.time_limit_min={cfg.train.time_limit_min} reached")
            break
        if step % cfg.train.save_every == 0 and step < cfg.train.steps:
            save()
    bar.close()

    if len(valid_split):
        final_val = validation_loss(model, diffusion, valid_split, cfg, device, dtype)
        metrics.write({"step": step, **final_val})
        log("validation: " + ", ".join(f"{k}={v:.4f}" for k, v in final_val.items()))
    path = save()
    log(f"saved {path}")
    try:
        from sadiffuseq.plots import plot_losses

        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        if moe_meter is not None:
            from sadiffuseq.plots import plot_expert_load

            plot_expert_load(run_dir / "metrics.jsonl", run_dir / "expert_load.png")
    except ImportError:  # matplotlib missing: the numbers are in metrics.jsonl
        pass
    return run_dir

