"""Tokenised storage, length-bucketed or packed batches and collation.

Building a data folder (``sadiffuseq data``, or the first ``train``) does three streaming passes:

1. read the task's examples once, split by document, into a temporary text copy (``.raw/``);
2. train the BPE tokenizer on the training split (``tokenizer.json``);
3. tokenise each split in chunks into one flat token array plus an index::

       {split}.tokens.npy   uint16 (uint32 when the vocabulary exceeds 65,535): src and trg tokens back to back
       {split}.index.npy    int64 (N, 4): src offset, src length, trg offset, trg length
       {split}.docs.json    the document id of every example (splits are disjoint by document)
       meta.json            the data config it was built with, vocabulary size, per-split counts

Lengths are fitted to ``data.seq_len`` at build time: sources longer than ``max_src_len`` are truncated;
targets longer than what remains (the row budget ``seq_len − 3 − len(src)``) are handled by ``data.overlong``:

* ``truncate``: cut to the budget (counted as ``trg_truncated``);
* ``drop``: the example is left out (``dropped``);
* ``split``: cut into consecutive windows of the budget (the last one shorter), each its own example with the
  same source and the same document id (``split_sources`` targets were split into ``split_examples``
  examples). Full windows make rows of exactly ``seq_len`` tokens; the windows share the stored source.

Every such event is counted in ``meta.json`` and printed — never silent.

**Bucketed rows** (``data.packing=false``, the DiffuSeq layout). A training row is ``[BOS] src [SEP] trg [EOS]
[PAD]…``. Batches hold rows of similar length (bucketing), padded to the longest row of the batch rounded up to
a multiple of 8; ``input_mask`` is True from the first target token to the end of the row (target, EOS and
padding are all generated, as in DiffuSeq: predicting PAD after EOS is how the model chooses the length).

**Packed rows** (``data.packing=true``). Every row is exactly ``seq_len`` tokens: several examples, each laid
out as its own segment ``[BOS] src [SEP] trg [EOS]``, one after the other, then ``[PAD]`` up to ``seq_len``
only where no further example fits. ``doc_ids`` (B, L) holds each position's segment number in its row (0, 1,
…) and −1 on the trailing padding; attention modules attend only within equal ids, so no example sees another
(the padding sees only padding). ``input_mask`` is True on each segment's target and [EOS]; the trailing padding
is *not* generated: each segment's [EOS] already marks where its target ends, and the padding's length says
nothing about any example — it is whatever space the packer left over, so learning to predict it would only
teach the model the packer's leftovers (and would dilute the loss). Rows are formed by best-fit-decreasing bin
packing over windows of ``PACK_WINDOW`` examples of a shuffled order, then shuffled and cut into batches:
deterministic per (seed, epoch), and resumable exactly like the bucketed stream.

Trade-offs of packing, by design:

* the diffusion step t is drawn per row, so all examples packed into a row share one t (and one loss-aware
  importance weight); over many rows every example still sees every t, but the draws are correlated within a
  row;
* the loss of a row is averaged over all its target positions, so inside a packed row a long example weighs
  more than a short one (token-level averaging), whereas a bucketed row is one example;
* rotary positions continue across segments (attention scores depend only on relative positions, so an
  example's offset in its row changes nothing but rounding); the sparse-attention global tokens are the first
  positions of the row and so belong to its first segment only — later segments get window attention alone.

``padding waste`` (:func:`bucket_padding_waste`, :func:`packed_padding_waste`, ``sadiffuseq data stats``) is the
fraction of row positions that hold padding: after [EOS] up to the batch's padded length when bucketing (generated
by the model, but no example's content), the trailing row padding when packing.
"""

from __future__ import annotations

import bisect
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
    save_tokenizer,
    train_tokenizer,
)
from sadiffuseq.errors import UserError
from sadiffuseq.utils import write_json

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
ENCODE_CHUNK = 1000
PACK_WINDOW = 2000  # examples packed together (a window of the shuffled order): fuller rows vs. more mixing
PAD_DOC = -1  # doc_ids of the trailing padding of a packed row


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


#: Settings that only change how stored examples are batched, not what is stored: a folder serves every value.
BATCHING_KEYS = ("packing", "pad_to_seq_len")


def _identity(cfg: DataConfig) -> dict:
    """The data settings a built folder depends on (``dir`` itself is where it lives, not what it is)."""
    # Paths are kept as written so a folder built here can be carried to another machine and reused.
    return {k: v for k, v in vars(cfg).items() if k != "dir" and k not in BATCHING_KEYS}


def ensure_dataset(cfg: DataConfig, data_dir: str | Path, progress: bool = True) -> dict:
    """Build the data folder unless it already holds data built with the same settings; returns meta."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{data_dir} holds data of an older format; delete it or choose another data.dir")
        # A key the folder's meta.json lacks (added to DataConfig later) was built with that key's default.
        built = {**_identity(DataConfig()), **meta["config"]}
        diff = {k: (built.get(k), v) for k, v in _identity(cfg).items() if built.get(k) != v}
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
    if cfg.overlong == "split":
        stats.update(split_sources=0, split_examples=0)
    records = _read_raw(raw_path)
    bar = tqdm(desc=f"tokenising {split}", disable=not progress, unit=" ex")
    while chunk := list(itertools.islice(records, ENCODE_CHUNK)):
        src_ids = encode_batch(tok, [r["src"] for r in chunk])
        trg_ids = encode_batch(tok, [r["trg"] for r in chunk])
        for rec, s, t in zip(chunk, src_ids, trg_ids):
            if len(s) > cfg.max_src_len:
                s = s[: cfg.max_src_len]
                stats["src_truncated"] += 1
            budget = cfg.seq_len - 3 - len(s)  # >= 1: DataConfig.validate guarantees seq_len >= max_src_len + 4
            windows = [(0, len(t))]  # (start, length) of each example's target inside t
            if len(t) > budget:
                if cfg.overlong == "drop":
                    stats["dropped"] += 1
                    continue
                if cfg.overlong == "split":
                    # Consecutive windows of the full budget (rows exactly seq_len long), the rest in the last one.
                    windows = [(k, min(budget, len(t) - k)) for k in range(0, len(t), budget)]
                    stats["split_sources"] += 1
                    stats["split_examples"] += len(windows)
                else:
                    t = t[:budget]
                    windows = [(0, budget)]
                    stats["trg_truncated"] += 1
            if not t:  # only possible if the target tokenises to nothing; keep rows meaningful
                stats["dropped"] += 1
                continue
            # The source and the target are stored once; the windows of a split target share the source.
            token_parts.append(np.asarray(s + t, dtype=dtype))
            for start, length in windows:
                index.append((offset, len(s), offset + len(s) + start, length))
                doc_ids.append(rec["doc_id"])
            offset += len(s) + len(t)
            stats["examples"] += len(windows)
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
        split_part = ""
        if "split_sources" in s:
            split_part = f", {s['split_sources']} targets split into {s['split_examples']} examples"
        lines.append(
            f"{split:>5}: {s['examples']:>7} examples, {s['tokens']:>10} tokens; fitted to seq_len: "
            f"{s['src_truncated']} sources truncated, {s['trg_truncated']} targets truncated{split_part}, "
            f"{s['dropped']} dropped"
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
        """Tokens of each example's ``[BOS] src [SEP] trg [EOS]``."""
        return self.index[:, 1] + self.index[:, 3] + 3

    @property
    def source_lengths(self) -> np.ndarray:
        return self.index[:, 1]

    @property
    def target_lengths(self) -> np.ndarray:
        return self.index[:, 3]

    def row(self, i: int) -> "Row":
        return Row(self.source(i), self.target(i))

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
    ``pad_mask`` (True on padding after [EOS], i.e. the generated padding) and ``src_len`` (B,). Rows without a
    target (generation) are padded to ``pad_to`` and their target positions hold PAD. No ``doc_ids``: one
    example per row (packed rows come from :func:`collate_packed`).
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


def collate_packed(packs: list[list[Row]], seq_len: int) -> dict[str, torch.Tensor]:
    """Batch packed rows: each row holds the segments ``[BOS] src [SEP] trg [EOS]`` of its examples in order,
    then PAD up to ``seq_len``.

    Returns ``ids`` (B, seq_len); ``doc_ids`` (B, seq_len): the segment number of every position (0, 1, … in
    the row) and ``PAD_DOC`` (−1) on the trailing padding; ``input_mask``: True on each segment's target and
    [EOS] (the trailing padding is not generated; see the module docstring); ``pad_mask``: the generated padding,
    as in :func:`collate` — none here, so all False (``input_mask.sum() − pad_mask.sum()`` counts target tokens
    in both layouts).
    """
    ids = np.full((len(packs), seq_len), PAD_ID, dtype=np.int64)
    input_mask = np.zeros((len(packs), seq_len), dtype=bool)
    doc_ids = np.full((len(packs), seq_len), PAD_DOC, dtype=np.int64)
    for b, pack in enumerate(packs):
        pos = 0
        for k, r in enumerate(pack):
            if r.target is None:
                raise ValueError("packed rows are for training: every example needs a target")
            ns, nt = len(r.source), len(r.target)
            end = pos + ns + nt + 3
            if end > seq_len:
                raise ValueError(f"packed row {b} needs more than seq_len={seq_len} tokens")
            ids[b, pos] = BOS_ID
            ids[b, pos + 1 : pos + 1 + ns] = r.source
            ids[b, pos + 1 + ns] = SEP_ID
            ids[b, pos + 2 + ns : end - 1] = r.target
            ids[b, end - 1] = EOS_ID
            input_mask[b, pos + 2 + ns : end] = True
            doc_ids[b, pos:end] = k
            pos = end
    return {
        "ids": torch.from_numpy(ids),
        "input_mask": torch.from_numpy(input_mask),
        "pad_mask": torch.zeros(ids.shape, dtype=torch.bool),
        "doc_ids": torch.from_numpy(doc_ids),
    }


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


def best_fit_decreasing(order: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack the items ``order`` (indices into ``lengths``) into bins of ``capacity``: longest first, each into
    the fullest bin it still fits (best fit), else a new bin. Ties keep the order given. Returns the bins, each
    listing its items in the order they were placed."""
    order = np.asarray(order)
    lens = np.asarray(lengths)[order]
    if len(order) and int(lens.max()) > capacity:
        raise UserError(f"an example of {int(lens.max())} tokens does not fit a row of {capacity}")
    order = order[np.argsort(-lens.astype(np.int64), kind="stable")]
    smallest = int(lens.min()) if len(order) else 0
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin), sorted; bins that can take nothing more are left out
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
            bins[b].append(i)
            room -= n
        else:
            b, room = len(bins), capacity - n
            bins.append([i])
        if room >= smallest:
            bisect.insort(free, (room, b))
    return bins


class PackedBatcher:
    """Deterministic packed batches: shuffle, pack windows of ``window`` examples into rows of ``seq_len``
    (best-fit decreasing), shuffle the rows, cut them into batches of ``batch_size`` rows.

    ``epoch(e)`` is a list of batches, each a list of rows, each an array of example indices in segment order;
    every example appears exactly once per epoch, and the epoch is a function of (seed, epoch) alone.
    """

    def __init__(self, lengths: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, window: int = PACK_WINDOW):
        if len(lengths) == 0:
            raise UserError("cannot batch an empty split")
        self.lengths = np.asarray(lengths)
        if int(self.lengths.max()) > seq_len:
            raise UserError(
                f"an example of {int(self.lengths.max())} tokens does not fit a packed row of data.seq_len={seq_len}"
            )
        self.seq_len, self.batch_size, self.seed, self.window = seq_len, batch_size, seed, window

    def rows(self, epoch: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """The epoch's packed rows, before shuffling."""
        rng = np.random.default_rng([self.seed, epoch]) if rng is None else rng
        perm = rng.permutation(len(self.lengths))
        rows = []
        for start in range(0, len(perm), self.window):
            rows += best_fit_decreasing(perm[start : start + self.window], self.lengths, self.seq_len)
        return [np.asarray(r, dtype=np.int64) for r in rows]

    def epoch(self, epoch: int) -> list[list[np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        rows = self.rows(epoch, rng)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]


class BatchStream:
    """An endless, resumable stream of collated training batches over a split (one example per row)."""

    packing = False

    def __init__(self, split: TokenizedSplit, batch_size: int, seed: int = 0, pad_to: int | None = None):
        self.split = split
        self.pad_to = pad_to  # None: pad to the batch's longest row; an int: every row to that length
        self.batcher = BucketBatcher(split.row_lengths, batch_size, seed)
        self.epoch, self.position = 0, 0
        self._batches = self.batcher.epoch(0)

    def next(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self.batcher.epoch(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return self._collate(batch)

    def _collate(self, idx) -> dict[str, torch.Tensor]:
        return collate([self.split.row(i) for i in idx], pad_to=self.pad_to)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position}
        if self.packing:
            state["packing"] = True
        return state

    def load_state_dict(self, state: dict) -> None:
        if bool(state.get("packing", False)) != self.packing:
            was, now = ("true", "false") if state.get("packing") else ("false", "true")
            raise UserError(
                f"the checkpoint's data stream was made with data.packing={was}, this run has data.packing={now}; "
                "resume with the setting the run was started with"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._batches = self.batcher.epoch(self.epoch)


class PackedBatchStream(BatchStream):
    """An endless, resumable stream of packed batches (rows of exactly ``seq_len`` tokens, with ``doc_ids``)."""

    packing = True

    def __init__(self, split: TokenizedSplit, seq_len: int, batch_size: int, seed: int = 0, window: int = PACK_WINDOW):
        self.split = split
        self.seq_len = seq_len
        self.batcher = PackedBatcher(split.row_lengths, seq_len, batch_size, seed, window)
        self.epoch, self.position = 0, 0
        self._batches = self.batcher.epoch(0)

    def _collate(self, rows) -> dict[str, torch.Tensor]:
        return collate_packed([[self.split.row(i) for i in row] for row in rows], self.seq_len)


def make_batch_stream(split: TokenizedSplit, cfg: DataConfig, batch_size: int, seed: int = 0) -> BatchStream:
    """The training stream of ``cfg``: packed rows of ``seq_len`` if ``cfg.packing``, else length-bucketed rows."""
    if cfg.packing:
        return PackedBatchStream(split, cfg.seq_len, batch_size, seed)
    return BatchStream(split, batch_size, seed, pad_to=cfg.seq_len if cfg.pad_to_seq_len else None)


def fixed_batches(split: TokenizedSplit, cfg: DataConfig, batch_size: int, n_batches: int, seed: int = 1234):
    """The first ``n_batches`` collated batches of epoch 0 of a stream seeded ``seed``, in the layout of ``cfg``
    (packed or bucketed): a fixed evaluation set (validation loss)."""
    if cfg.packing:
        rows = PackedBatcher(split.row_lengths, cfg.seq_len, batch_size, seed).epoch(0)[:n_batches]
        return [collate_packed([[split.row(i) for i in r] for r in b], cfg.seq_len) for b in rows]
    batches = BucketBatcher(split.row_lengths, batch_size, seed=seed).epoch(0)[:n_batches]
    pad_to = cfg.seq_len if cfg.pad_to_seq_len else None
    return [collate([split.row(i) for i in idx], pad_to=pad_to) for idx in batches]


# ---------------------------------------------------------------------------------------------------------
# Padding waste and data statistics


def bucket_padding_waste(lengths: np.ndarray, batch_size: int, seed: int = 0, multiple: int = 8) -> float:
    """Fraction of row positions that are padding over one epoch of length-bucketed batches (as
    :class:`BatchStream` makes them): each batch is padded to its longest row rounded up to ``multiple``.
    The model generates this padding (DiffuSeq), but it is still no example's content: it counts as waste."""
    lengths = np.asarray(lengths)
    padded = 0
    for idx in BucketBatcher(lengths, batch_size, seed).epoch(0):
        padded += len(idx) * (-(-int(lengths[idx].max()) // multiple) * multiple)
    return 1.0 - float(lengths.sum()) / padded


def packed_padding_waste(lengths: np.ndarray, seq_len: int, seed: int = 0, window: int = PACK_WINDOW) -> float:
    """Fraction of row positions that are trailing padding over one epoch of packed rows of ``seq_len``."""
    lengths = np.asarray(lengths)
    rows = PackedBatcher(lengths, seq_len, 1, seed, window).rows(0)
    return 1.0 - float(lengths.sum()) / (len(rows) * seq_len)


def packing_waste_bound(lengths: np.ndarray, seq_len: int) -> float:
    """A lower bound on the padding waste of *any* packing that keeps examples whole: at least
    ``ceil(total / seq_len)`` rows, and at least one row per example longer than ``seq_len / 2`` (no two fit)."""
    lengths = np.asarray(lengths)
    rows = max(-(-int(lengths.sum()) // seq_len), int((2 * lengths > seq_len).sum()))
    return 1.0 - float(lengths.sum()) / (rows * seq_len) if rows else 0.0


def _percentiles(x: np.ndarray) -> dict[str, int]:
    if len(x) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99], method="lower")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(x.max())}


FIT_KEYS = ("src_truncated", "trg_truncated", "split_sources", "split_examples", "dropped")


def data_stats(data_dir: str | Path, batch_size: int, packing: bool, seed: int = 0) -> dict:
    """Per-split statistics of a built data folder: example count, source/target/row length percentiles, the
    fit counts of ``meta.json``, and the padding waste of both batchings (bucketing with ``batch_size`` rows,
    packing into rows of the folder's ``seq_len``); ``configured`` names the one ``packing`` selects."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{data_dir} holds no built data (no meta.json); build it first with `sadiffuseq data`")
    meta = json.loads(meta_path.read_text())
    seq_len = int(meta["config"]["seq_len"])
    out = {
        "data_dir": str(data_dir),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "configured": "packing" if packing else "bucketing",
        "splits": {},
    }
    for split in SPLITS:
        ts = TokenizedSplit(data_dir, split)
        rows = ts.row_lengths
        counts = meta["splits"].get(split, {})
        entry = {
            "examples": len(ts),
            "source_len": _percentiles(ts.source_lengths),
            "target_len": _percentiles(ts.target_lengths),
            "row_len": _percentiles(rows),
            "fit": {k: counts[k] for k in FIT_KEYS if k in counts},
            "tokens_in_rows": int(rows.sum()),
        }
        if len(ts):
            n_packed = len(PackedBatcher(rows, seq_len, 1, seed).rows(0))
            entry["padding_waste"] = {
                "bucketing": bucket_padding_waste(rows, batch_size, seed),
                "packing": 1.0 - float(rows.sum()) / (n_packed * seq_len),  # = packed_padding_waste(rows, seq_len)
            }
            entry["packed_rows"] = n_packed
            entry["packing_waste_bound"] = packing_waste_bound(rows, seq_len)
        out["splits"][split] = entry
    return out


def format_stats(stats: dict) -> str:
    """The table ``sadiffuseq data stats`` prints."""
    lines = [
        f"{stats['data_dir']}: seq_len {stats['seq_len']}; padding waste = fraction of row positions that are "
        f"padding (bucketing: batches of {stats['batch_size']} rows; packing: rows of {stats['seq_len']}); "
        f"configured: {stats['configured']}"
    ]
    for split, e in stats["splits"].items():
        lines.append(f"{split}: {e['examples']} examples")
        for key, name in (("source_len", "source"), ("target_len", "target"), ("row_len", "row")):
            p = e[key]
            lines.append(f"  {name:<7} length  p50 {p['p50']:>7}  p90 {p['p90']:>7}  p99 {p['p99']:>7}  max {p['max']:>7}")
        fit = ", ".join(f"{k} {v}" for k, v in e["fit"].items())
        lines.append(f"  fitted to seq_len: {fit or 'nothing recorded'}")
        if "padding_waste" in e:
            w = e["padding_waste"]
            mark = {stats["configured"]: "configured; "}
            lines.append(
                f"  padding waste: bucketing {100 * w['bucketing']:.2f}%"
                + (" (configured)" if "bucketing" in mark else "")
                + f", packing {100 * w['packing']:.2f}% ({mark.get('packing', '')}{e['packed_rows']} rows; "
                f"no packing of whole examples can go below {100 * e['packing_waste_bound']:.2f}%)"
            )
    return "\n".join(lines)

