"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``).

Byte-level BPE maps every input byte to a symbol before merging, so any text (code indentation, tabs,
newlines, any Unicode) round-trips exactly: ``decode(tok, encode_batch(tok, [s])[0]) == s``. Text is
never normalised and no prefix space is added.

Four special tokens have fixed ids, which the rest of the package relies on:

======  ==
[PAD]   0
[BOS]   1
[SEP]   2
[EOS]   3
======  ==

The tokenizer has no post-processor: the data pipeline places ``[BOS]``/``[SEP]``/``[EOS]`` itself. The
special-token strings occurring literally in input text are encoded as ordinary text (the tokenizer's
``encode_special_tokens`` flag), so a corpus that happens to contain ``"[SEP]"`` still round-trips.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sadiffuseq.errors import UserError

__all__ = [
    "PAD",
    "BOS",
    "SEP",
    "EOS",
    "PAD_ID",
    "BOS_ID",
    "SEP_ID",
    "EOS_ID",
    "SPECIAL_TOKENS",
    "N_SPECIAL",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "encode_batch",
    "decode",
    "decode_batch",
]

PAD = "[PAD]"
BOS = "[BOS]"
SEP = "[SEP]"
EOS = "[EOS]"
PAD_ID = 0
BOS_ID = 1
SEP_ID = 2
EOS_ID = 3
SPECIAL_TOKENS = (PAD, BOS, SEP, EOS)
N_SPECIAL = len(SPECIAL_TOKENS)

_N_BYTES = 256


def _special_ids_ok(tok: Tokenizer) -> bool:
    return all(tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def _configure(tok: Tokenizer) -> Tokenizer:
    # Literal "[PAD]" etc. in input text is tokenized as text, never mapped to the special ids.
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (streamed; any iterable of strings).

    ``vocab_size`` counts the 4 special tokens and the 256 byte symbols, so it must be at least 260.
    """
    if vocab_size < N_SPECIAL + _N_BYTES:
        raise UserError(
            f"vocab_size must be at least {N_SPECIAL + _N_BYTES} (4 special tokens + 256 bytes), got {vocab_size}"
        )
    if min_frequency < 1:
        raise UserError(f"min_frequency must be at least 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if not _special_ids_ok(tok):
        got = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        raise RuntimeError(f"special tokens did not get ids 0..3: {got}")
    return _configure(tok)


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tok`` as a ``tokenizer.json`` file at ``path`` atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(tok.to_str())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer written by :func:`save_tokenizer`; :class:`UserError` naming ``path`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such tokenizer file")
    try:
        text = p.read_text(encoding="utf-8")
        json.loads(text)
        tok = Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{p}: not a tokenizer file ({type(exc).__name__}: {str(exc)[:200]})") from None
    except Exception as exc:  # the Rust side raises plain Exception for a malformed tokenizer description
        raise UserError(f"{p}: not a tokenizer file ({str(exc)[:200]})") from None
    if not _special_ids_ok(tok):
        got = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        raise UserError(f"{p}: not a sadiffuseq tokenizer: special tokens must have ids 0..3, got {got}")
    return _configure(tok)


def encode_batch(tok: Tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added); encoded in parallel by the Rust side."""
    return [enc.ids for enc in tok.encode_batch(list(texts), add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``, with special tokens (ids 0..3) dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def decode_batch(tok: Tokenizer, batch: Iterable[Iterable[int]]) -> list[str]:
    """:func:`decode` for several sequences at once."""
    return tok.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=True)
