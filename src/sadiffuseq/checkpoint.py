"""Checkpoints: self-contained, atomically written, exactly resumable.

Layout of a run directory::

    runs/NAME/
      config.yaml  tokenizer.json  metrics.jsonl  loss.png
      checkpoints/
        latest                  name of the newest complete checkpoint (replaced atomically)
        step_00001000/
          model.safetensors     raw weights
          ema.safetensors       exponential-moving-average weights (used for sampling by default)
          config.yaml           the full config of the run
          tokenizer.json        the tokenizer, so the folder alone is enough to sample
          trainer_state.pt      optimizer, step, data position, timestep-sampler and RNG states

A checkpoint folder is written under a temporary name and renamed into place only when complete, and
``latest`` is updated after that, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sadiffuseq.config import Config, config_from_dict, read_yaml, save_config
from sadiffuseq.errors import UserError
from sadiffuseq.utils import atomic_write_text

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "config.yaml", "tokenizer.json", "trainer_state.pt")


class EMA:
    """Exponential moving average of the parameters, in fp32, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = list(self.shadow)
        params = dict(model.named_parameters())
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for n, v in tensors.items():
            self.shadow[n].copy_(v)
        self.updates = updates


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    ema: EMA,
    cfg: Config,
    tokenizer_path: str | Path,
    trainer_state: dict,
    keep: int = 2,
) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    torch.save({**trainer_state, "step": step, "ema_updates": ema.updates}, tmp / "trainer_state.pt")
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run directory (then its latest checkpoint); check it is complete."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "checkpoints").is_dir():
        latest = path / "checkpoints" / "latest"
        if not latest.is_file():
            raise UserError(f"{path} is a run directory without a finished checkpoint yet (no checkpoints/latest)")
        path = path / "checkpoints" / latest.read_text().strip()
    if not path.is_dir():
        raise UserError(f"{path} is not a checkpoint: expected a folder holding {', '.join(CHECKPOINT_FILES)}")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise UserError(
            f"{path} is not a sadiffuseq checkpoint: missing {', '.join(missing)} "
            "(pass a run directory or one of its checkpoints/step_* folders)"
        )
    return path


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / "latest").is_file()


def load_checkpoint_config(ckpt: Path) -> Config:
    return config_from_dict(read_yaml(ckpt / "config.yaml"), origin=str(ckpt / "config.yaml"))


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    name = {"ema": "ema.safetensors", "raw": "model.safetensors"}[which]
    try:
        return load_file(str(ckpt / name))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{ckpt / name} could not be read as safetensors: {exc}") from None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)


def load_model(ckpt: str | Path, device: torch.device | str = "cpu", weights: str = "ema"):
    """(model in eval mode, config, tokenizer) from a checkpoint or run directory."""
    from sadiffuseq.data.tokenizer import load_tokenizer
    from sadiffuseq.model import Denoiser

    ckpt = find_checkpoint(ckpt)
    cfg = load_checkpoint_config(ckpt)
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    state = load_weights(ckpt, weights)
    model = Denoiser(cfg.model, state["embed.weight"].shape[0], absorbing=cfg.diffusion.absorbing)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), cfg, tokenizer
