"""Byte-level BPE tokenizer: fixed special ids, exact round trip, save/load."""

from __future__ import annotations

import json

import pytest

from sadiffuseq.data.tokenizer import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    SEP,
    SEP_ID,
    decode,
    decode_batch,
    encode_batch,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from sadiffuseq.errors import UserError

CORPUS = [
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n",
    "class Box:\n    def __init__(self, v):\n        self.v = v\n",
    "\tif x:\n\t\treturn None  # tabs\n",
    "for i in range(10):\n    print(i, end=' ')\n",
    "Ünïcödé text: naïve café, 日本語, emoji 🚀\n",
]

TRICKY = [
    "",
    " ",
    "\n",
    "    return x\n",
    "def f():\n    if a:\n        return 1\n    return 2\n",
    "\tindented\twith\ttabs\n\t\tdeeper",
    "  \n\n\t \r\n trailing spaces   ",
    "naïve café — “quotes” ½ 日本語 🚀🤖 \u200b zero width",
    "\x00 control \x1b[31m chars \x7f",
    "literal [PAD] [BOS] [SEP] [EOS] in the text",
    "no_space_prefix",
    " leading space",
]


@pytest.fixture(scope="module")
def tok():
    # A generator: training must accept a stream, not only a list.
    return train_tokenizer((text for _ in range(20) for text in CORPUS), vocab_size=320, min_frequency=2)


def test_special_ids(tok):
    assert (PAD_ID, BOS_ID, SEP_ID, EOS_ID) == (0, 1, 2, 3)
    assert [tok.token_to_id(t) for t in (PAD, BOS, SEP, EOS)] == [0, 1, 2, 3]
    assert [tok.id_to_token(i) for i in range(4)] == ["[PAD]", "[BOS]", "[SEP]", "[EOS]"]


def test_vocab_size_and_merges(tok):
    assert 260 < tok.get_vocab_size() <= 320
    # merges were learned: a frequent word is shorter than its byte count
    (ids,) = encode_batch(tok, ["return"])
    assert len(ids) < len("return")


def test_vocab_size_too_small():
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    (ids,) = encode_batch(tok, [text])
    assert all(i >= 4 for i in ids)  # no special token ids come from text, even literal "[SEP]"
    assert decode(tok, ids) == text


def test_encode_batch_matches_single(tok):
    batch = encode_batch(tok, TRICKY)
    assert batch == [encode_batch(tok, [t])[0] for t in TRICKY]
    assert batch[0] == []
    assert decode_batch(tok, batch) == TRICKY


def test_decode_drops_special_tokens(tok):
    (ids,) = encode_batch(tok, ["return x"])
    assert decode(tok, [BOS_ID, *ids, SEP_ID, EOS_ID, PAD_ID, PAD_ID]) == "return x"


def test_no_special_tokens_added(tok):
    (ids,) = encode_batch(tok, ["a"])
    assert len(ids) == 1


def test_save_load_same_ids(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = load_tokenizer(path)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert encode_batch(loaded, TRICKY) == encode_batch(tok, TRICKY)
    assert [loaded.token_to_id(t) for t in (PAD, BOS, SEP, EOS)] == [0, 1, 2, 3]
    # overwriting in place works
    save_tokenizer(loaded, path)
    assert encode_batch(load_tokenizer(path), TRICKY) == encode_batch(tok, TRICKY)


def test_load_missing(tmp_path):
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "nope.json")
    assert "nope.json" in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        "this is not json",
        json.dumps({"hello": "world"}),
        "",
    ],
)
def test_load_not_a_tokenizer(tmp_path, content):
    path = tmp_path / "weird.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_tokenizer(path)
    assert "weird.json" in str(err.value)


def test_load_directory(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path.name)):
        load_tokenizer(tmp_path)


def test_load_tokenizer_with_wrong_special_ids(tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.BPE())
    other.add_special_tokens(["[EOS]", "[PAD]"])
    path = tmp_path / "foreign.json"
    other.save(str(path))
    with pytest.raises(UserError, match="foreign.json"):
        load_tokenizer(path)


def test_round_trip_real_source_file(tok):
    import os

    with open(os.__file__, encoding="utf-8") as fh:
        text = fh.read()
    (ids,) = encode_batch(tok, [text])
    assert decode(tok, ids) == text
