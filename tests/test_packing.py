"""Long-document data: the split policy, packed rows (layout, isolation, epochs, resumption), padding waste,
``sadiffuseq data stats`` and training with packing."""

import json

import numpy as np
import pytest
import torch

from sadiffuseq.attention import patterns
from sadiffuseq.cli import main
from sadiffuseq.config import ModelConfig, load_config
from sadiffuseq.data.dataset import (
    PAD_DOC,
    BatchStream,
    BucketBatcher,
    PackedBatcher,
    PackedBatchStream,
    Row,
    TokenizedSplit,
    best_fit_decreasing,
    bucket_padding_waste,
    build_dataset,
    collate,
    collate_packed,
    ensure_dataset,
    make_batch_stream,
    packed_padding_waste,
    packing_waste_bound,
)
from sadiffuseq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, decode, load_tokenizer
from sadiffuseq.errors import UserError
from sadiffuseq.model import Denoiser
from sadiffuseq.train import train

from conftest import tiny_overrides

B, S, E, P = BOS_ID, SEP_ID, EOS_ID, PAD_ID


# ---------------------------------------------------------------------------------------------------------
# data.overlong=split


def test_split_policy_counts_and_windows_exactly(tmp_path):
    # Byte-level vocabulary (vocab_size=260: no merges), so every character is one token.
    pairs = tmp_path / "p.jsonl"
    records = [
        ("ab", "xyz"),  # budget 12-3-2 = 7: fits
        ("abcdefgh", "x"),  # source cut to 4, budget 5: fits
        ("a", "0123456789"),  # budget 8: split 8 + 2
        ("abcdef", "0123456789ABCDEF"),  # source cut to 4, budget 5: split 5 + 5 + 5 + 1
        ("ab", "0123456789abcdefghij"),  # budget 7: split 7 + 7 + 6
    ]
    pairs.write_text("".join(json.dumps({"id": f"d{i}", "src": s, "trg": t}) + "\n" for i, (s, t) in enumerate(records)))
    base = [f"--data.train_path={pairs}", "--data.task=jsonl", "--data.vocab_size=260", "--data.seq_len=12",
            "--data.max_src_len=4", "--data.valid_frac=0", "--data.test_frac=0"]
    cfg = load_config(None, base + ["--data.overlong=split"])
    meta = build_dataset(cfg.data, tmp_path / "split", progress=False)
    assert meta["splits"]["train"] == {
        "examples": 1 + 1 + 2 + 4 + 3, "src_truncated": 2, "trg_truncated": 0, "dropped": 0,
        "split_sources": 3, "split_examples": 2 + 4 + 3,
        "tokens": 2 + 3 + 4 + 1 + 1 + 10 + 4 + 16 + 2 + 20,  # each source and target stored once
    }
    split = TokenizedSplit(tmp_path / "split", "train")
    tok = load_tokenizer(tmp_path / "split" / "tokenizer.json")
    srcs = [decode(tok, split.source(i).tolist()) for i in range(len(split))]
    trgs = [decode(tok, split.target(i).tolist()) for i in range(len(split))]
    assert srcs == ["ab", "abcd", "a", "a", "abcd", "abcd", "abcd", "abcd", "ab", "ab", "ab"]
    assert trgs == ["xyz", "x", "01234567", "89", "01234", "56789", "ABCDE", "F", "0123456", "789abcd", "efghij"]
    assert json.loads((tmp_path / "split" / "train.docs.json").read_text()) == [
        "d0", "d1", "d2", "d2", "d3", "d3", "d3", "d3", "d4", "d4", "d4"]
    assert split.row_lengths.tolist() == [8, 8, 12, 6, 12, 12, 12, 8, 12, 12, 11]  # full windows fill the row

    # The same corpus under the other policies: the split counts only appear with split.
    truncated = build_dataset(load_config(None, base).data, tmp_path / "trunc", progress=False)["splits"]["train"]
    assert truncated == {"examples": 5, "src_truncated": 2, "trg_truncated": 3, "dropped": 0,
                         "tokens": 2 + 3 + 4 + 1 + 1 + 8 + 4 + 5 + 2 + 7}
    dropped = build_dataset(load_config(None, base + ["--data.overlong=drop"]).data, tmp_path / "drop", progress=False)
    assert dropped["splits"]["train"]["examples"] == 2 and dropped["splits"]["train"]["dropped"] == 3
    with pytest.raises(UserError, match="truncate, drop, split"):
        load_config(None, base + ["--data.overlong=wrap"])


def test_packing_is_a_batching_choice_and_old_folders_stay_reusable(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    ensure_dataset(cfg.data, cfg.data_dir, progress=False)
    cfg.data.packing = True
    ensure_dataset(cfg.data, cfg.data_dir, progress=False)  # the same folder serves packed batches
    # A folder written before `overlong` had a value it lacks compares with the default.
    meta_path = cfg.data_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["overlong"]
    meta_path.write_text(json.dumps(meta))
    ensure_dataset(cfg.data, cfg.data_dir, progress=False)
    cfg.data.overlong = "split"
    with pytest.raises(UserError, match="data.overlong: built with 'truncate', now 'split'"):
        ensure_dataset(cfg.data, cfg.data_dir, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Packed layout


def test_packed_layout_by_hand():
    packs = [
        [Row(np.array([10, 11]), np.array([20, 21, 22])), Row(np.array([12]), np.array([23]))],
        [Row(np.array([13]), np.array([24, 25]))],
    ]
    b = collate_packed(packs, seq_len=14)
    assert b["ids"].tolist() == [
        [B, 10, 11, S, 20, 21, 22, E, B, 12, S, 23, E, P],
        [B, 13, S, 24, 25, E, P, P, P, P, P, P, P, P],
    ]
    assert b["input_mask"].int().tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0],  # each target + its EOS; trailing padding not generated
        [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert b["doc_ids"].tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1],
        [0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1],
    ]
    assert PAD_DOC == -1 and not b["pad_mask"].any()  # no generated padding
    assert int(b["input_mask"].sum() - b["pad_mask"].sum()) == 4 + 2 + 3  # target tokens + EOS, as train.py counts
    with pytest.raises(ValueError, match="seq_len=12"):
        collate_packed(packs, seq_len=12)
    assert "doc_ids" not in collate([Row(np.array([10]), np.array([20]))])  # one example per row: no doc_ids


def test_best_fit_decreasing_by_hand():
    lengths = np.array([5, 7, 3, 2, 8, 1])
    # 8 → new row (room 2); 7 → new (3); 5 → new (5); 3 → the tightest room that fits: row 1 (3 → 0);
    # 2 → row 0 (2 → 0); 1 → row 2 (5 → 4).
    assert best_fit_decreasing(np.arange(6), lengths, 10) == [[4, 3], [1, 2], [0, 5]]
    with pytest.raises(UserError, match="does not fit"):
        best_fit_decreasing(np.arange(6), lengths, 7)


def test_packed_epochs_cover_every_example_once_deterministically():
    lengths = np.random.default_rng(0).integers(4, 200, size=777)
    batcher = PackedBatcher(lengths, seq_len=256, batch_size=5, seed=3, window=100)
    epoch0 = batcher.epoch(0)
    rows = [r for batch in epoch0 for r in batch]
    assert sorted(np.concatenate(rows).tolist()) == list(range(777))
    assert all(lengths[r].sum() <= 256 for r in rows) and all(len(b) == 5 for b in epoch0[:-1])
    again = PackedBatcher(lengths, 256, 5, seed=3, window=100).epoch(0)
    assert [[r.tolist() for r in b] for b in again] == [[r.tolist() for r in b] for b in epoch0]
    assert [r.tolist() for r in batcher.epoch(1)[0]] != [r.tolist() for r in epoch0[0]]
    for epoch in (1, 2):
        assert sorted(np.concatenate([r for b in batcher.epoch(epoch) for r in b]).tolist()) == list(range(777))
    # Dense rows: each window of 100 examples leaves about one part-filled row; one window over the whole split
    # reaches the lower bound of any packing that keeps examples whole.
    bound = packing_waste_bound(lengths, 256)
    assert bound < packed_padding_waste(lengths, 256, seed=3, window=100) < 0.05
    assert packed_padding_waste(lengths, 256, seed=3, window=1000) == pytest.approx(bound)


def test_packed_stream_is_resumable_and_refuses_the_other_layout(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.packing": "true"}))
    ensure_dataset(cfg.data, cfg.data_dir, progress=False)
    split = TokenizedSplit(cfg.data_dir, "train")
    stream = make_batch_stream(split, cfg.data, batch_size=3, seed=5)
    assert isinstance(stream, PackedBatchStream)
    per_epoch = len(stream.batcher.epoch(0))
    n = 2 * per_epoch + 3  # crosses two epoch boundaries
    full = [stream.next() for _ in range(n)]
    for batch in full:
        assert batch["ids"].shape[1] == 32 and batch["doc_ids"].shape == batch["ids"].shape
    for cut in (2, per_epoch, per_epoch + 1):
        first = make_batch_stream(split, cfg.data, batch_size=3, seed=5)
        for _ in range(cut):
            first.next()
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
        resumed = make_batch_stream(split, cfg.data, batch_size=3, seed=5)
        resumed.load_state_dict(state)
        for want in full[cut:]:
            got = resumed.next()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # Every training example once per epoch.
    fresh = make_batch_stream(split, cfg.data, batch_size=3, seed=5)
    seen = sum(int((b["input_mask"][:, 1:] & ~b["input_mask"][:, :-1]).sum()) for b in (fresh.next() for _ in range(per_epoch)))
    assert seen == len(split)
    # A checkpoint of one layout does not silently drive the other.
    with pytest.raises(UserError, match="data.packing=true"):
        BatchStream(split, 3, seed=5).load_state_dict(stream.state_dict())
    with pytest.raises(UserError, match="data.packing=false"):
        stream.load_state_dict(BatchStream(split, 3, seed=5).state_dict())


# ---------------------------------------------------------------------------------------------------------
# Packed examples never attend to one another


def _packed_batch(seed: int = 0, seq_len: int = 48):
    rng = np.random.default_rng(seed)
    packs = []
    for sizes in ([(3, 9), (2, 5), (4, 7), (1, 3)], [(5, 20), (2, 6)], [(2, 10), (3, 12), (2, 8)]):
        packs.append([Row(rng.integers(4, 60, s), rng.integers(4, 60, t)) for s, t in sizes])
    return collate_packed(packs, seq_len)


def test_attention_mask_never_crosses_packed_examples():
    batch = _packed_batch()
    doc = batch["doc_ids"]
    Bn, L = doc.shape
    same = doc[:, :, None] == doc[:, None, :]
    for first, every in ((4, 0), (2, 10)):
        is_global = patterns.global_positions(L, first, every)
        for w, d in ((3, 1), (2, 3), (100, 1)):
            mask = patterns.dense_mask(patterns.head_mask_mod(w, d, is_global, doc), L, Bn)
            assert not (mask & ~same).any()  # nothing outside one's own example (or the padding block)
            assert mask.diagonal(dim1=1, dim2=2).all()  # but every position sees itself
    # With an unbounded window the pattern is exactly the block-diagonal of the examples.
    full = patterns.dense_mask(patterns.head_mask_mod(L, 1, patterns.global_positions(L, 4), doc), L, Bn)
    assert torch.equal(full, same)


@pytest.mark.parametrize("attention, backend", [("dense", "auto"), ("sparse", "banded"), ("sparse", "dense")])
def test_perturbing_one_packed_example_leaves_the_others_exactly_unchanged(attention, backend):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_emb=8, dropout=0.0, attention=attention,
                      attention_backend=backend, window=3, dilations=[1, 2], global_first=4, global_every=16)
    torch.manual_seed(0)
    model = Denoiser(cfg, vocab_size=64).eval()
    batch = _packed_batch()
    doc = batch["doc_ids"]
    x = model.get_embeds(batch["ids"]).detach()
    t = torch.tensor([5, 50, 99])
    with torch.no_grad():
        base = model(x, t, doc)
        for b, k in ((0, 0), (0, 2), (1, 1), (2, PAD_DOC)):
            target = doc[b] == k
            x2 = x.clone()
            x2[b, target] += torch.randn(int(target.sum()), x.shape[-1])
            out = model(x2, t, doc)
            others = torch.ones_like(doc, dtype=torch.bool)
            others[b] = ~target
            assert torch.equal(out[others], base[others]), (b, k)  # bit-identical outside the perturbed example
            assert not torch.equal(out[b, target], base[b, target])  # and the perturbation did reach its own


# ---------------------------------------------------------------------------------------------------------
# Padding waste


def test_padding_waste_by_hand_for_both_layouts():
    lengths = np.array([6, 9, 16, 5])
    # Bucketing, 2 rows a batch: sorted [5, 6] padded to 8 each, [9, 16] padded to 16 each → 48 positions for 36.
    assert bucket_padding_waste(lengths, batch_size=2) == pytest.approx(12 / 48)
    # Packing into rows of 20: 16 → row A (room 4); 9 → row B (11); 6 → B (5); 5 → B, the tightest fit (0).
    assert best_fit_decreasing(np.arange(4), lengths, 20) == [[2], [1, 0, 3]]
    assert packed_padding_waste(lengths, seq_len=20) == pytest.approx(4 / 40)
    assert packing_waste_bound(lengths, 20) == pytest.approx(4 / 40)
    # The same fractions, counted on the collated batches themselves.
    rows = [Row(np.full(1, 7), np.full(n - 4, 8)) for n in lengths]  # 1 source + n-4 target tokens: rows of n
    bucketed = [collate([rows[i] for i in idx]) for idx in BucketBatcher(lengths, 2).epoch(0)]
    pads = sum(int((b["ids"] == P).sum()) for b in bucketed)
    assert pads / sum(b["ids"].numel() for b in bucketed) == pytest.approx(12 / 48)
    packed = [collate_packed([[rows[i] for i in r] for r in batch], 20) for batch in PackedBatcher(lengths, 20, 2).epoch(0)]
    pads = sum(int((b["doc_ids"] == PAD_DOC).sum()) for b in packed)
    assert pads / sum(b["ids"].numel() for b in packed) == pytest.approx(4 / 40)


# ---------------------------------------------------------------------------------------------------------
# Command line and training


def test_data_stats_command_writes_png_and_json(tmp_path, capsys):
    args = tiny_overrides(tmp_path, **{"data.overlong": "split", "data.packing": "true"})
    assert main(["data", "stats", *args]) == 2  # nothing built yet: a clear error
    assert "sadiffuseq data" in capsys.readouterr().err
    assert main(["data", *args]) == 0  # the default action is build
    assert main(["data", "stats", *args]) == 0
    out = capsys.readouterr().out
    assert "padding waste" in out and "packing" in out and "(configured; " in out
    data_dir = tmp_path / "run" / "data"
    stats = json.loads((data_dir / "stats.json").read_text())
    meta = json.loads((data_dir / "meta.json").read_text())
    assert (data_dir / "length_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["configured"] == "packing" and stats["seq_len"] == 32
    for split in ("train", "valid", "test"):
        e = stats["splits"][split]
        assert e["examples"] == meta["splits"][split]["examples"]
        assert e["fit"]["split_sources"] == meta["splits"][split]["split_sources"]
        assert set(e["row_len"]) == {"p50", "p90", "p99", "max"} and e["row_len"]["max"] <= 32
        assert 0 <= e["padding_waste"]["packing"] < 1 and 0 <= e["padding_waste"]["bucketing"] < 1
    lengths = TokenizedSplit(data_dir, "train").row_lengths
    assert stats["splits"]["train"]["padding_waste"]["bucketing"] == pytest.approx(bucket_padding_waste(lengths, 8))
    assert stats["splits"]["train"]["padding_waste"]["packing"] == pytest.approx(packed_padding_waste(lengths, 32))
    assert main(["data", "build", *args]) == 0  # the explicit action reuses the folder


def test_tiny_training_run_with_packing(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.packing": "true", "train.eval_every": 3}))
    run_dir = train(cfg, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in losses)
    assert any("val_loss" in r and np.isfinite(r["val_loss"]) for r in records)
