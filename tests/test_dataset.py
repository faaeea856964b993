import json

import numpy as np
import pytest
import torch

from sadiffuseq.cli import main
from sadiffuseq.config import load_config
from sadiffuseq.data.dataset import BucketBatcher, Row, TokenizedSplit, build_dataset, collate, ensure_dataset, extract_target
from sadiffuseq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, load_tokenizer, decode
from sadiffuseq.errors import UserError

from conftest import tiny_overrides


def test_collate_layout_and_masks():
    rows = [Row(np.array([10, 11]), np.array([20, 21, 22])), Row(np.array([12]), np.array([23]))]
    b = collate(rows, multiple=8)
    B, S, E, P = BOS_ID, SEP_ID, EOS_ID, PAD_ID
    assert b["ids"].tolist() == [[B, 10, 11, S, 20, 21, 22, E], [B, 12, S, 23, E, P, P, P]]
    assert b["input_mask"].int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    assert b["pad_mask"].int().tolist() == [[0] * 8, [0, 0, 0, 0, 0, 1, 1, 1]]
    assert b["src_len"].tolist() == [2, 1]
    gen = collate([Row(np.array([10, 11]), None)], pad_to=6)
    assert gen["ids"].tolist() == [[B, 10, 11, S, P, P]] and gen["input_mask"].int().tolist() == [[0, 0, 0, 0, 1, 1]]
    assert extract_target([B, 10, 11, S, 20, 21, E, 30], src_len=2) == [20, 21]
    assert extract_target(torch.tensor([B, 10, S, 20, P, 21]), src_len=1) == [20]


def test_bucket_batcher_covers_every_example_once_deterministically():
    lengths = np.random.default_rng(0).integers(5, 500, size=1003)
    batcher = BucketBatcher(lengths, batch_size=10, seed=3, window=20)
    epoch0 = batcher.epoch(0)
    flat = np.concatenate(epoch0)
    assert sorted(flat.tolist()) == list(range(1003))
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, BucketBatcher(lengths, 10, seed=3, window=20).epoch(0)))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, batcher.epoch(1)))
    # Bucketing: rows within a batch are far closer in length than random batches would be.
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in epoch0])
    assert spread < 0.25 * (lengths.max() - lengths.min())


def test_build_counts_truncation_and_drops_exactly(tmp_path):
    # Hand-made corpus over a byte-level vocabulary (vocab_size=260: no merges, 1 token per byte).
    pairs = tmp_path / "p.jsonl"
    records = [("ab", "xyz"), ("abcdefgh", "x"), ("a", "0123456789"), ("abcdef", "0123456789")]
    pairs.write_text("".join(json.dumps({"src": s, "trg": t}) + "\n" for s, t in records))
    base = [f"--data.train_path={pairs}", "--data.task=jsonl", "--data.vocab_size=260", "--data.seq_len=12",
            "--data.max_src_len=4", "--data.valid_frac=0", "--data.test_frac=0"]
    cfg = load_config(None, base)
    meta = build_dataset(cfg.data, tmp_path / "trunc", progress=False)
    # budgets (12 - 3 - len(src)): 7, 5 (src cut to 4), 8, 5 (src cut to 4)
    assert meta["splits"]["train"] == {"examples": 4, "src_truncated": 2, "trg_truncated": 2, "dropped": 0,
                                       "tokens": 2 + 3 + 4 + 1 + 1 + 8 + 4 + 5}
    split = TokenizedSplit(tmp_path / "trunc", "train")
    tok = load_tokenizer(tmp_path / "trunc" / "tokenizer.json")
    assert [decode(tok, split.source(i).tolist()) for i in range(4)] == ["ab", "abcd", "a", "abcd"]
    assert [decode(tok, split.target(i).tolist()) for i in range(4)] == ["xyz", "x", "01234567", "01234"]
    assert split.row_lengths.max() <= 12

    cfg = load_config(None, base + ["--data.overlong=drop"])
    meta = build_dataset(cfg.data, tmp_path / "drop", progress=False)
    assert meta["splits"]["train"]["examples"] == 2 and meta["splits"]["train"]["dropped"] == 2


def test_data_folder_is_reused_only_with_the_same_settings(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    ensure_dataset(cfg.data, tmp_path / "d", progress=False)
    again = ensure_dataset(cfg.data, tmp_path / "d", progress=False)
    assert again["config"]["seq_len"] == 32
    cfg.data.seq_len = 64
    with pytest.raises(UserError, match=r"data.seq_len: built with 32, now 64"):
        ensure_dataset(cfg.data, tmp_path / "d", progress=False)


def test_splits_are_by_document_and_disjoint(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    ensure_dataset(cfg.data, cfg.data_dir, progress=False)
    ids = {}
    for split in ("train", "valid", "test"):
        ids[split] = set(json.loads((cfg.data_dir / f"{split}.docs.json").read_text()))
    assert sum(map(len, ids.values())) == 80
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"src": "a", "trg": "b"}\n{"src": "a", "trg": \n', "line 2"),
        ('{"src": "a", "trg": "b"}\n{"src": "", "trg": "b"}\n', "line 2"),
        ('{"src": "a"}\n', "trg"),
    ],
)
def test_bad_data_is_a_clear_error_from_the_command_line(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code = main(["data", *tiny_overrides(tmp_path, **{"data.train_path": bad})])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and expected in err and "Traceback" not in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    code = main(["data", *tiny_overrides(tmp_path, **{"data.train_path": tmp_path / "nope.jsonl"})])
    err = capsys.readouterr().err
    assert code == 2 and "nope.jsonl" in err


def test_named_task_takes_its_input_and_options_from_config(tmp_path):
    docs = tmp_path / "texts"
    docs.mkdir()
    for i in range(12):
        (docs / f"doc{i}.txt").write_text(" ".join(f"w{i}_{j}" for j in range(40)))
    cfg = load_config(None, [f"--data.train_path={docs}", "--data.task=text_prefix", "--data.vocab_size=300",
                             "--data.task_options={prefix_words: 5, target_words: 7}", "--data.seq_len=64",
                             "--data.max_src_len=32", "--data.valid_frac=0", "--data.test_frac=0"])
    build_dataset(cfg.data, tmp_path / "d", progress=False)
    split = TokenizedSplit(tmp_path / "d", "train")
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    assert len(split) == 12
    assert all(len(decode(tok, split.source(i).tolist()).split()) == 5 for i in range(12))
    assert all(len(decode(tok, split.target(i).tolist()).split()) == 7 for i in range(12))
    bad = load_config(None, [f"--data.train_path={docs}", "--data.task=text_prefix", "--data.task_options={nope: 1}"])
    with pytest.raises(UserError, match="nope"):
        build_dataset(bad.data, tmp_path / "bad", progress=False)


def test_rows_padded_to_seq_len_when_asked(tmp_path):
    from sadiffuseq.data.dataset import make_batch_stream

    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.pad_to_seq_len": "true"}))
    ensure_dataset(cfg.data, cfg.data_dir, progress=False)
    split = TokenizedSplit(cfg.data_dir, "train")
    stream = make_batch_stream(split, cfg.data, batch_size=4, seed=0)
    for _ in range(5):
        batch = stream.next()
        assert batch["ids"].shape[1] == cfg.data.seq_len
        # everything after [SEP] is generated, the [PAD] tail included
        assert bool(batch["input_mask"][:, -1].all())
    cfg.data.pad_to_seq_len = False
    shorter = make_batch_stream(split, cfg.data, batch_size=4, seed=0).next()
    assert shorter["ids"].shape[1] < cfg.data.seq_len
