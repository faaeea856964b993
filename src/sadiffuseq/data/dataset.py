"""Tokenised storage, length-bucketed batches and collation.

Building a data folder (``sadiffuseq data``, or the first ``train``) does three streaming passes:

1. read the task's examples once, split by document, into a temporary text copy (``.raw/``);
2. train the BPE tokenizer on the training split (``tokenizer.json``);
3. tokenise each split in chunks into one flat token array plus an index::

       {split}.tokens.npy   uint16 (uint32 when the vocabulary exceeds 65,535): src and trg tokens back to back
       {split}.index.npy    int64 (N, 4): src offset, src length, trg offset, trg length
       {split}.docs.json    the document id of every example (splits are disjoint by document)
       meta.json            the data config it was built with, vocabulary size, per-split counts

Lengths are fitted to ``data.seq_len`` at build time: sources longer than ``max_src_len`` are truncated;
targets longer than what remains (``seq_len − 3 − len(src)``) are truncated or dropped (``data.overlong``).
Every such event is counted in ``meta.json`` and printed — never silent.

A training row is ``[BOS] src [SEP] trg [EOS] [PAD]…``. Batches hold rows of similar length (bucketing), padded
to the longest row of the batch rounded up to a multiple of 8; ``input_mask`` is True from the first target
token to the end of the row (target, EOS and padding are all generated, as in DiffuSeq).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sadiffuseq.config import DataConfig
from sadiffuseq.data import sources
from sadiffuseq.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    encode_batch,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from sadiffuseq.errors import UserError
from sadiffuseq.utils import write_json

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
ENCODE_CHUNK = 1000


# ---------------------------------------------------------------------------------------------------------
# Reading examples of a task, split by document


def iter_examples(cfg: DataConfig) -> Iterator[tuple[str, sources.Example]]:
    """(split, example) pairs in one pass over the task's source(s).

    jsonl: a split with a file of its own reads that file; the others are split off the training file by
    document. Built-in tasks are split by document. ``max_examples`` caps each split.
    """
    taken = dict.fromkeys(SPLITS, 0)

    def capped(pairs):
        for split, ex in pairs:
            if not cfg.max_examples or taken[split] < cfg.max_examples:
                taken[split] += 1
                yield split, ex

    if cfg.task == "jsonl":
        explicit = {"train": cfg.train_path, "valid": cfg.valid_path, "test": cfg.test_path}
        train_file = sources.read_jsonl_pairs(cfg.train_path, cfg.src_field, cfg.trg_field)
        yield from capped((_split_of(cfg, ex.doc_id, explicit), ex) for ex in train_file)
        for split in ("valid", "test"):
            if explicit[split]:
                own = sources.read_jsonl_pairs(explicit[split], cfg.src_field, cfg.trg_field)
                yield from capped((split, ex) for ex in own)
    else:
        # Named tasks: data.train_path (if given) is the task's input file or folder, data.task_options its options.
        task = sources.get_task(cfg.task)
        try:
            examples = task(cfg.train_path or None, **cfg.task_options)
        except TypeError as exc:
            raise UserError(f"data.task_options={cfg.task_options} do not fit task {cfg.task!r}: {exc}") from None
        yield from capped((_split_of(cfg, ex.doc_id, {}), ex) for ex in examples)


def _split_of(cfg: DataConfig, doc_id: str, explicit: dict[str, str]) -> str:
    valid_frac = 0.0 if explicit.get("valid") else cfg.valid_frac
    test_frac = 0.0 if explicit.get("test") else cfg.test_frac
    return sources.split_of(doc_id, cfg.split_seed, valid_frac, test_frac)


# ---------------------------------------------------------------------------------------------------------
# Building the tokenised folder


def _identity(cfg: DataConfig) -> dict:
    """The data settings a built folder depends on (``dir`` itself is where it lives, not what it is)."""
    # Paths are kept as written so a folder built here can be carried to another machine and reused.
    return {k: v for k, v in vars(cfg).items() if k != "dir"}


def ensure_dataset(cfg: DataConfig, data_dir: str | Path, progress: bool = True) -> dict:
    """Build the data folder unless it already holds data built with the same settings; returns meta."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{data_dir} holds data of an older format; delete it or choose another data.dir")
        diff = {k: (meta["config"].get(k), v) for k, v in _identity(cfg).items() if meta["config"].get(k) != v}
        if diff:
            lines = ", ".join(f"data.{k}: built with {old!r}, now {new!r}" for k, (old, new) in diff.items())
            raise UserError(f"{data_dir} was built with other data settings ({lines}); choose another data.dir")
        return meta
    return build_dataset(cfg, data_dir, progress)


def build_dataset(cfg: DataConfig, data_dir: str | Path, progress: bool = True) -> dict:
    data_dir = Path(data_dir)
    raw = data_dir / ".raw"  # a temporary text copy of the splits; removed once the token arrays exist
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)

    # 1. One pass over the source, split by document, written out as jsonl.
    counts = dict.fromkeys(SPLITS, 0)
    files = {split: open(raw / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    try:
        for split, ex in tqdm(iter_examples(cfg), desc=f"reading {cfg.task}", disable=not progress, unit=" ex"):
            files[split].write(json.dumps({"src": ex.src, "trg": ex.trg, "doc_id": ex.doc_id}) + "\n")
            counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    if counts["train"] == 0:
        raise UserError(f"data.task={cfg.task} produced no training examples; check the input files and data.*_frac")

    # 2. Tokenizer on the training split (streamed).
    def train_texts():
        for rec in _read_raw(raw / "train.jsonl"):
            yield rec["src"]
            yield rec["trg"]

    tok = train_tokenizer(train_texts(), cfg.vocab_size)
    save_tokenizer(tok, data_dir / "tokenizer.json")
    vocab = tok.get_vocab_size()

    # 3. Tokenise, fit to the row length, store.
    splits_meta = {}
    for split in SPLITS:
        splits_meta[split] = _tokenise_split(cfg, tok, raw / f"{split}.jsonl", data_dir, split, vocab, progress)
    meta = {"format": FORMAT_VERSION, "config": _identity(cfg), "vocab_size": vocab, "splits": splits_meta}
    write_json(data_dir / "meta.json", meta)
    shutil.rmtree(raw)
    return meta


def _read_raw(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _tokenise_split(cfg: DataConfig, tok, raw_path: Path, data_dir: Path, split: str, vocab: int, progress: bool) -> dict:
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    token_parts: list[np.ndarray] = []
    index: list[tuple[int, int, int, int]] = []
    doc_ids: list[str] = []
    offset = 0
    stats = {"examples": 0, "src_truncated": 0, "trg_truncated": 0, "dropped": 0, "tokens": 0}
    records = _read_raw(raw_path)
    bar = tqdm(desc=f"tokenising {split}", disable=not progress, unit=" ex")
    while chunk := list(itertools.islice(records, ENCODE_CHUNK)):
        src_ids = encode_batch(tok, [r["src"] for r in chunk])
        trg_ids = encode_batch(tok, [r["trg"] for r in chunk])
        for rec, s, t in zip(chunk, src_ids, trg_ids):
            if len(s) > cfg.max_src_len:
                s = s[: cfg.max_src_len]
                stats["src_truncated"] += 1
            budget = cfg.seq_len - 3 - len(s)
            if len(t) > budget:
                if cfg.overlong == "drop":
                    stats["dropped"] += 1
                    continue
                t = t[:budget]
                stats["trg_truncated"] += 1
            if not t:  # only possible if the target tokenises to nothing; keep rows meaningful
                stats["dropped"] += 1
                continue
            token_parts.append(np.asarray(s + t, dtype=dtype))
            index.append((offset, len(s), offset + len(s), len(t)))
            doc_ids.append(rec["doc_id"])
            offset += len(s) + len(t)
            stats["examples"] += 1
        bar.update(len(chunk))
    bar.close()
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, dtype=dtype)
    stats["tokens"] = int(tokens.size)
    _save_npy(data_dir / f"{split}.tokens.npy", tokens)
    _save_npy(data_dir / f"{split}.index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 4))
    write_json(data_dir / f"{split}.docs.json", doc_ids)
    return stats


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    tmp.replace(path)


def describe(meta: dict) -> str:
    """One line per split: examples and what was truncated or dropped to fit the row length."""
    lines = []
    for split, s in meta["splits"].items():
        lines.append(
            f"{split:>5}: {s['examples']:>7} examples, {s['tokens']:>10} tokens; fitted to seq_len: "
            f"{s['src_truncated']} sources truncated, {s['trg_truncated']} targets truncated, {s['dropped']} dropped"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading the tokenised folder


class TokenizedSplit:
    """Memory-mapped token rows of one split."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        try:
            self.tokens = np.load(data_dir / f"{split}.tokens.npy", mmap_mode="r")
            self.index = np.load(data_dir / f"{split}.index.npy")
        except FileNotFoundError as exc:
            raise UserError(f"{data_dir} has no tokenised '{split}' split ({exc.filename}); run `sadiffuseq data`") from None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def row_lengths(self) -> np.ndarray:
        return self.index[:, 1] + self.index[:, 3] + 3

    def source(self, i: int) -> np.ndarray:
        so, sl, _, _ = self.index[i]
        return np.asarray(self.tokens[so : so + sl], dtype=np.int64)

    def target(self, i: int) -> np.ndarray:
        _, _, to, tl = self.index[i]
        return np.asarray(self.tokens[to : to + tl], dtype=np.int64)


@dataclass
class Row:
    source: np.ndarray
    target: np.ndarray | None  # None when generating


def collate(rows: list[Row], pad_to: int | None = None, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Batch rows ``[BOS] src [SEP] trg [EOS]`` into padded tensors.

    Returns ``ids`` (B, L), ``input_mask`` (True on positions to generate: everything after [SEP]),
    ``pad_mask`` (True on padding after [EOS]) and ``src_len`` (B,). Rows without a target (generation) are
    padded to ``pad_to`` and their target positions hold PAD.
    """
    seqs = []
    for r in rows:
        parts = [[BOS_ID], r.source.tolist(), [SEP_ID]]
        if r.target is not None:
            parts += [r.target.tolist(), [EOS_ID]]
        seqs.append(list(itertools.chain.from_iterable(parts)))
    longest = max(len(s) for s in seqs)
    length = pad_to if pad_to is not None else -(-longest // multiple) * multiple
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({longest})")
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    pos = torch.arange(length)[None]
    src_len = torch.tensor([len(r.source) for r in rows])
    row_len = torch.tensor([len(s) for s in seqs])
    input_mask = pos >= (src_len + 2)[:, None]  # after [BOS] src [SEP]
    pad_mask = pos >= row_len[:, None]
    if rows[0].target is None:
        pad_mask = torch.zeros_like(input_mask)
    return {"ids": ids, "input_mask": input_mask, "pad_mask": pad_mask, "src_len": src_len}


def extract_target(ids: list[int] | torch.Tensor, src_len: int) -> list[int]:
    """The generated target of a row: the tokens after [SEP], up to the first [EOS] or [PAD]."""
    out = []
    for tok in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)[src_len + 2 :]:
        if tok in (EOS_ID, PAD_ID):
            break
        out.append(tok)
    return out


class BucketBatcher:
    """Deterministic length-bucketed batches: shuffle, sort within windows of ``window`` batches, shuffle batches.

    Each epoch's order is a function of (seed, epoch) alone, so a resumed run continues with the same batches.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int = 0, window: int = 50):
        if len(lengths) == 0:
            raise UserError("cannot batch an empty split")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.window
        batches = []
        for start in range(0, len(perm), chunk):
            idx = perm[start : start + chunk]
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """An endless, resumable stream of collated training batches over a split."""

    def __init__(self, split: TokenizedSplit, batch_size: int, seed: int = 0):
        self.split = split
        self.batcher = BucketBatcher(split.row_lengths, batch_size, seed)
        self.epoch, self.position = 0, 0
        self._batches = self.batcher.epoch(0)

    def next(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self.batcher.epoch(self.epoch)
        idx = self._batches[self.position]
        self.position += 1
        return collate([Row(self.split.source(i), self.split.target(i)) for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._batches = self.batcher.epoch(self.epoch)


def load_tokenizer_of(data_dir: str | Path):
    return load_tokenizer(Path(data_dir) / "tokenizer.json")
