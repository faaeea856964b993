"""Configuration: one dataclass per component, YAML presets, ``--section.key=value`` overrides.

A run is described by a :class:`Config` with five sections — ``model``, ``diffusion``, ``data``, ``train``,
``sample`` — each a small dataclass that owns its defaults and its validation. Presets live in ``configs/*.yaml``
and hold only the keys they change; the command line overrides single keys::

    sadiffuseq train --config configs/tiny.yaml --train.steps=500 --model.n_layers=4

Everything a user can get wrong is a :class:`~sadiffuseq.errors.UserError` that names the key: unknown keys
(with the closest valid spelling), values of the wrong type, values out of range, and combinations that cannot
work (a sequence length too short to hold the source, a width that does not split into heads).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sadiffuseq.errors import UserError


@dataclass
class ModelConfig:
    """The denoiser network (see ``model.py``)."""

    d_model: int = 768  # transformer width
    n_layers: int = 12
    n_heads: int = 12
    d_emb: int = 128  # word-embedding width: the space diffusion happens in (tied to the output head)
    ffn_mult: float = 4.0  # feed-forward width = ffn_mult * d_model
    dropout: float = 0.1
    attention: str = "dense"  # dense (SDPA, the DiffuSeq baseline) or sparse (window + dilated + global)
    ffn: str = "dense"  # which feed-forward module each block uses
    rope_base: float = 10000.0  # rotary position embedding base (positions work at any length)
    grad_checkpoint: bool = False  # recompute block activations in backward: memory for long sequences
    # Sparse attention (model.attention=sparse); see attention/patterns.py.
    window: int = 256  # half-width w: a head sees keys within ±w (a head of dilation d: every d-th key within ±w·d)
    layer_windows: list[int] = field(default_factory=list)  # per-layer w (empty: `window` in every layer)
    dilations: list[int] = field(default_factory=list)  # per-head dilation (empty: all 1), e.g. [1,1,1,1,1,1,4,4,4,4,4,4]
    global_first: int = 16  # the first n positions of a row ([BOS] + source start) are global tokens
    global_every: int = 0  # also every k-th position (0: none)
    global_proj: bool = False  # Longformer's separate q/k/v projections for the global attention rows
    # auto (flex on CUDA, banded on the CPU), flex, flash (FlashAttention-2 band; CUDA, bf16/fp16), banded,
    # dense (the reference, O(L²))
    attention_backend: str = "auto"
    # flash: the band kernel: auto (cudnn from 64k tokens where NVIDIA's cuDNN frontend is installed, else fa2),
    # cudnn (pip install nvidia-cudnn-frontend), fa2
    flash_kernel: str = "auto"
    flex_globals: str = "auto"  # flex: global-token schedule: auto (split from 16k tokens), inline, split
    # flex: torch.compile mode of the attention region: auto (max-autotune-no-cudagraphs from 16k tokens, default
    # below), default, max-autotune-no-cudagraphs (searches the kernels' tile sizes: minutes more for the first
    # compile of each length, faster steps), reduce-overhead (CUDA graphs: for short sequences, where launching
    # kernels costs more than running them), max-autotune (both)
    flex_compile: str = "auto"
    # Mixture-of-Experts feed-forward (model.ffn=moe); see moe.py.
    moe_experts: int = 8  # E routed experts per MoE layer
    moe_top_k: int = 2  # experts each token is sent to (token-choice routing)
    moe_layers: list[int] = field(default_factory=list)  # layers (0-based) with experts; empty: every layer
    moe_ffn_mult: float = 0.0  # expert width = moe_ffn_mult * d_model; 0: ffn_mult / (top_k + shared), the dense FLOPs
    moe_shared_expert: bool = False  # one more expert of the same width that every token goes through
    moe_capacity_factor: float = 0.0  # 0: dropless; c > 0: at most ceil(c * tokens * top_k / E) per expert
    moe_aux_weight: float = 0.01  # Switch load-balancing loss weight, per MoE layer
    moe_z_weight: float = 0.001  # router z-loss weight, per MoE layer
    moe_bias_update: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3) bias step per training step; 0: off
    # expert matmuls: auto (triton, else grouped, else loop: the first that the device and dtype support), triton
    # (moe_gemm.py: Triton grouped matmuls, weight gradients in fp32), grouped (torch._grouped_mm), loop
    moe_impl: str = "auto"

    def validate(self) -> None:
        _positive(self, "d_model", "n_layers", "n_heads", "d_emb", "ffn_mult", "rope_base")
        if self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                "each head needs an equal share of the width"
            )
        if (self.d_model // self.n_heads) % 2:
            raise UserError(
                f"model.d_model / model.n_heads = {self.d_model // self.n_heads} must be even "
                "(rotary position embeddings rotate pairs of dimensions)"
            )
        _in_range(self, "dropout", 0.0, 1.0, hi_open=True)
        _choice(self, "attention", ("dense", "sparse"))
        _choice(self, "attention_backend", ("auto", "flash", "flex", "banded", "dense"))
        _choice(self, "flash_kernel", ("auto", "cudnn", "fa2", "reference"))
        if self.flex_globals == "copies":  # an earlier schedule of the same function, retired: split replaces it
            self.flex_globals = "split"
        _choice(self, "flex_globals", ("auto", "inline", "split"))
        _choice(self, "flex_compile", ("auto", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"))
        _non_negative(self, "window", "global_first", "global_every")
        if self.dilations and (len(self.dilations) != self.n_heads or min(self.dilations) < 1):
            raise UserError(
                f"model.dilations={self.dilations} must list one dilation >= 1 per head (model.n_heads={self.n_heads})"
            )
        if self.layer_windows and (len(self.layer_windows) != self.n_layers or min(self.layer_windows) < 0):
            raise UserError(
                f"model.layer_windows={self.layer_windows} must list one window >= 0 per layer "
                f"(model.n_layers={self.n_layers})"
            )
        _choice(self, "ffn", ("dense", "moe"))
        _positive(self, "moe_experts", "moe_top_k")
        _non_negative(self, "moe_ffn_mult", "moe_capacity_factor", "moe_aux_weight", "moe_z_weight", "moe_bias_update")
        _choice(self, "moe_impl", ("auto", "triton", "grouped", "loop"))
        if self.moe_top_k > self.moe_experts:
            raise UserError(
                f"model.moe_top_k={self.moe_top_k} exceeds model.moe_experts={self.moe_experts}: "
                "a token cannot be sent to more experts than there are"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad or len(set(self.moe_layers)) != len(self.moe_layers):
            raise UserError(
                f"model.moe_layers={self.moe_layers} must list distinct layer indices in [0, {self.n_layers - 1}] "
                f"(model.n_layers={self.n_layers}; layers are counted from 0)"
            )


@dataclass
class DiffusionConfig:
    """The forward process and the training loss (see ``diffusion/``)."""

    steps: int = 2000  # T, the number of diffusion steps
    schedule: str = "sqrt"  # noise schedule: sqrt (DiffuSeq), cosine, linear
    timestep_sampler: str = "loss_aware"  # loss_aware (DiffuSeq's importance sampling) or uniform
    rounding_weight: float = 1.0  # cross-entropy that keeps the embedding space decodable
    prior_weight: float = 1.0  # ||sqrt(abar_T) x0||^2: the endpoint must be close to N(0, I)
    pred_ce_weight: float = 0.0  # optional cross-entropy of the *predicted* x0 (0 = DiffuSeq's loss)
    # Soft absorbing state (DiffuSeq-v2, Gong et al. 2023; see diffusion/process.py). Off = DiffuSeq exactly.
    absorbing: bool = False  # learned vector m: x_t is centred on m, target tokens are replaced by m
    absorb_gamma: float = 0.5  # γ: a target token is absorbed with probability γ·sqrt(1-abar_t), in [0, 1]
    absorb_reg: float = 0.01  # weight of the regulariser ||m|| added to the loss
    # Ours (sparse-attention tailoring): the first n positions of a row are never absorbed. They are the
    # sparse-attention global tokens, so this should equal model.global_first (0 absorbs every target).
    absorb_protect_global: int = 16
    absorb_stratified: bool = False  # ours: exactly round(p·n) absorbed in each window instead of Bernoulli draws
    absorb_window: int = 256  # stratified mode: window of this many consecutive (absorbable) target positions

    def validate(self) -> None:
        _positive(self, "steps")
        if self.steps < 2:
            raise UserError(f"diffusion.steps={self.steps} must be at least 2")
        _choice(self, "schedule", ("sqrt", "cosine", "linear"))
        _choice(self, "timestep_sampler", ("loss_aware", "uniform"))
        _non_negative(self, "rounding_weight", "prior_weight", "pred_ce_weight")
        _in_range(self, "absorb_gamma", 0.0, 1.0)
        _non_negative(self, "absorb_reg", "absorb_protect_global")
        _positive(self, "absorb_window")


@dataclass
class DataConfig:
    """Where examples come from and how they become token rows (see ``data/``)."""

    task: str = "stdlib_functions"  # jsonl, or a named task (`sadiffuseq data --help` lists them)
    train_path: str = ""  # jsonl: training file ({src, trg} per line, .jsonl[.gz]); named task: its input (optional)
    task_options: dict[str, Any] = field(default_factory=dict)  # named task options, e.g. {history_words: 1000}
    valid_path: str = ""  # jsonl task: validation file (empty: split off the training file by document)
    test_path: str = ""  # jsonl task: test file (empty: split off the training file by document)
    src_field: str = "src"
    trg_field: str = "trg"
    dir: str = ""  # tokenised data folder; empty means <train.out_dir>/data
    seq_len: int = 128  # row length: [BOS] src [SEP] trg [EOS] [PAD]...
    max_src_len: int = 48  # sources longer than this are truncated (counted and reported)
    # Targets that do not fit the row (seq_len - 3 - len(src)): truncate, drop, or split into consecutive
    # windows that each become an example with the same source (all counted and reported).
    overlong: str = "truncate"
    # Rows of one batch are padded to the longest row (fast for long documents); with pad_to_seq_len every row is
    # padded to seq_len as in DiffuSeq, so the model also learns the long [PAD] tails it fills at sampling time.
    pad_to_seq_len: bool = False
    # Training rows: false = one example per row, length-bucketed batches; true = several examples packed into
    # each row of exactly seq_len tokens, attending only within their own example (see data/dataset.py).
    # A batching choice only: the same data folder serves both.
    packing: bool = False
    vocab_size: int = 8000  # BPE vocabulary, including the 4 special tokens
    split_seed: int = 0  # seed of the document-level train/valid/test split
    valid_frac: float = 0.05
    test_frac: float = 0.05
    max_examples: int = 0  # cap on examples read per split (0 = all), for quick experiments

    def validate(self) -> None:
        from sadiffuseq.data.sources import task_names

        _choice(self, "task", ("jsonl", *task_names()))
        _positive(self, "seq_len", "max_src_len", "vocab_size")
        _non_negative(self, "max_examples")
        _choice(self, "overlong", ("truncate", "drop", "split"))
        _in_range(self, "valid_frac", 0.0, 0.5)
        _in_range(self, "test_frac", 0.0, 0.5)
        if self.vocab_size < 260:
            raise UserError(f"data.vocab_size={self.vocab_size} is too small: byte-level BPE needs 256 bytes + 4 specials")
        # [BOS] src [SEP] trg [EOS]: three special tokens plus at least one target token.
        if self.seq_len < self.max_src_len + 4:
            raise UserError(
                f"data.seq_len={self.seq_len} cannot hold a source of data.max_src_len={self.max_src_len} tokens: "
                f"a row needs max_src_len + 3 special tokens + at least 1 target token = {self.max_src_len + 4}. "
                "Raise data.seq_len or lower data.max_src_len."
            )
        if self.task == "jsonl" and not self.train_path:
            raise UserError("data.task=jsonl needs data.train_path (a jsonl file with src and trg fields)")


@dataclass
class TrainConfig:
    """The optimisation loop (see ``train.py``)."""

    out_dir: str = "runs/default"  # run directory: config, tokenizer, metrics.jsonl, checkpoints/
    steps: int = 10000
    batch_size: int = 32  # rows per step: length-bucketed rows, or packed rows of data.seq_len (data.packing)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    decay: str = "linear"  # learning-rate decay after warm-up: linear, cosine or constant
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999  # with warm-up: the effective decay is min(ema_decay, (1+n)/(10+n))
    seed: int = 0
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32
    compile: bool = False  # torch.compile each transformer block (Denoiser.compile_blocks)
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps (0 = only at the end)
    eval_batches: int = 8
    save_every: int = 1000
    keep_checkpoints: int = 2
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    time_limit_min: float = 0.0  # stop (and checkpoint) after this many minutes of training (0 = no limit)

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "lr", "log_every", "save_every", "keep_checkpoints", "eval_batches")
        _non_negative(self, "weight_decay", "warmup_steps", "grad_clip", "eval_every", "threads", "time_limit_min")
        _in_range(self, "ema_decay", 0.0, 1.0, hi_open=True)
        _choice(self, "decay", ("linear", "cosine", "constant"))
        _choice(self, "dtype", ("auto", "bf16", "fp32"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"train.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"train.device={self.device!r} must be auto, cpu, cuda or cuda:N")


@dataclass
class SampleConfig:
    """Generation (see ``diffusion/samplers.py`` and ``generate.py``)."""

    sampler: str = "ddpm"  # ddpm (ancestral), ddim (deterministic) or dpm++2m (DPM-Solver++(2M), deterministic)
    steps: int = 200  # denoising steps: a subset of the T training steps, chosen by `spacing`
    spacing: str = "time"  # which steps: time (evenly spread in t) or logsnr (evenly spread in log-SNR λ)
    # diffusion.absorbing: mask = the network sees re-absorbed positions as m while their trajectory goes on;
    # replace = the trajectory itself is set to m (biased toward m; kept to reproduce earlier results)
    absorb_reinject: str = "mask"
    mbr: int = 1  # candidates per source; >1 keeps the minimum-Bayes-risk one (highest mean BLEU to the others)
    clamp: bool = False  # snap each x0 prediction to the nearest word embedding
    batch_size: int = 16
    num_examples: int = 0  # how many examples of the split to generate (0 = all)
    split: str = "test"  # which split of the tokenised data to generate for
    seed: int = 0
    weights: str = "ema"  # ema or raw model weights

    def validate(self) -> None:
        _choice(self, "sampler", ("ddpm", "ddim", "dpm++2m"))
        _choice(self, "spacing", ("time", "logsnr"))
        _choice(self, "absorb_reinject", ("mask", "replace"))
        _positive(self, "steps", "batch_size", "mbr")
        _non_negative(self, "num_examples")
        _choice(self, "split", ("train", "valid", "test"))
        _choice(self, "weights", ("ema", "raw"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> "Config":
        for section in _sections(self):
            getattr(self, section).validate()
        if self.sample.steps > self.diffusion.steps:
            raise UserError(
                f"sample.steps={self.sample.steps} exceeds diffusion.steps={self.diffusion.steps}: "
                "sampling can only use (a subset of) the training steps"
            )
        return self

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else Path(self.train.out_dir) / "data"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        return out


# ---------------------------------------------------------------------------------------------------------
# Loading, merging and overriding


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← ``section.key=value`` overrides, then validated."""
    cfg = Config()
    if path is not None:
        apply_dict(cfg, read_yaml(path), origin=str(path))
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model, diffusion, data, train, sample)")
    return data


def apply_dict(cfg: Config, data: dict[str, Any], origin: str = "config") -> None:
    for section, values in data.items():
        sec = _get_section(cfg, section, origin)
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section '{section}' must be a mapping of keys to values")
        for key, value in values.items():
            _set_field(sec, section, key, value, origin)


def apply_override(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` (a leading ``--`` is allowed); the value is parsed as YAML."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"override {item!r} must look like --section.key=value, e.g. --train.steps=500")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    _set_field(_get_section(cfg, section, "command line"), section, key, value, "command line")


def save_config(cfg: Config, path: str | Path) -> None:
    from sadiffuseq.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict[str, Any], origin: str = "config") -> Config:
    cfg = Config()
    apply_dict(cfg, data, origin)
    return cfg.validate()


def _sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _get_section(cfg: Config, section: str, origin: str):
    names = _sections(cfg)
    if section not in names:
        raise UserError(f"{origin}: unknown config section '{section}'{_did_you_mean(section, names)}; sections: {', '.join(names)}")
    return getattr(cfg, section)


# Keys that were renamed, so that configs saved with earlier runs still load: old key -> (new key, value map).
_RENAMED = {("model", "flex_global_copies"): ("flex_globals", lambda copies: "split" if copies else "inline")}


def _set_field(sec, section: str, key: str, value: Any, origin: str) -> None:
    if (section, key) in _RENAMED:
        key, convert = _RENAMED[(section, key)]
        value = convert(value)
    fields = {f.name: f for f in dataclasses.fields(sec)}
    if key not in fields:
        raise UserError(
            f"{origin}: unknown key '{section}.{key}'{_did_you_mean(key, list(fields), prefix=section + '.')}; "
            f"valid keys of '{section}': {', '.join(fields)}"
        )
    hint = typing.get_type_hints(type(sec))[key]
    setattr(sec, key, _coerce(value, hint, f"{section}.{key}", origin))


def _coerce(value: Any, hint: Any, name: str, origin: str) -> Any:
    """Accept a value only if it has the field's type (ints are accepted for floats, never bools for numbers)."""
    wrong = UserError(f"{origin}: {name}={value!r} has the wrong type: expected {_type_name(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. --train.device=0 is not meant, but a numeric path component is harmless
        raise wrong
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise wrong
        return dict(value)
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise wrong
        (arg,) = typing.get_args(hint)
        return [_coerce(v, arg, name, origin) for v in value]
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise wrong
        return tuple(_coerce(v, a, name, origin) for v, a in zip(value, args))
    raise TypeError(f"unsupported config type {hint} for {name}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is dict:
        return "a mapping, e.g. {key: value}"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    if typing.get_origin(hint) is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(hint))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _section_name(obj) -> str:
    return type(obj).__name__.removesuffix("Config").lower()


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise UserError(f"{_section_name(obj)}.{name}={getattr(obj, name)} must be positive")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise UserError(f"{_section_name(obj)}.{name}={getattr(obj, name)} must not be negative")


def _in_range(obj, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
    v = getattr(obj, name)
    if v < lo or v > hi or (hi_open and v == hi):
        bracket = ")" if hi_open else "]"
        raise UserError(f"{_section_name(obj)}.{name}={v} must be in [{lo}, {hi}{bracket}")


def _choice(obj, name: str, options: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if v not in options:
        raise UserError(
            f"{_section_name(obj)}.{name}={v!r} is not one of: {', '.join(options)}{_did_you_mean(str(v), list(options))}"
        )
