"""Tests for sadiffuseq.evaluate: metric values checked against hand-computed numbers, and input errors."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from sadiffuseq.errors import UserError
from sadiffuseq.evaluate import (
    compute_metrics,
    evaluate_file,
    format_comparison,
    format_table,
    read_generations,
)

HYP = "the cat sat on a mat"  # 6 tokens
REF = "the cat sat on the mat today"  # 7 tokens


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record(generated, reference, **extra):
    return json.dumps({"source": "src", "reference": reference, "generated": generated, **extra})


# --------------------------------------------------------------------------------------------- metrics


def test_identical_pair_scores_perfectly():
    text = "the quick brown fox jumps over the lazy dog"
    m = compute_metrics([text], [text])
    assert m["bleu"] == pytest.approx(100.0)
    assert m["sentence_bleu"] == pytest.approx(100.0)
    assert m["rouge1"] == pytest.approx(100.0)
    assert m["rouge2"] == pytest.approx(100.0)
    assert m["rougeL"] == pytest.approx(100.0)
    assert m["n"] == 1


def test_corpus_bleu_single_pair_by_hand():
    # hyp: the cat sat on a mat            (6 tokens)
    # ref: the cat sat on the mat today    (7 tokens)
    # clipped matches / hyp n-grams:
    #   1-grams: the cat sat on mat match, "a" does not          -> 5/6
    #   2-grams: the cat, cat sat, sat on match; on a, a mat not -> 3/5
    #   3-grams: the cat sat, cat sat on match                   -> 2/4
    #   4-grams: the cat sat on matches                          -> 1/3
    # geometric mean = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25
    # brevity penalty: hyp 6 < ref 7 -> exp(1 - 7/6)
    expected = 100 * math.exp(1 - 7 / 6) * (1 / 12) ** 0.25
    assert expected == pytest.approx(45.48, abs=0.01)
    assert compute_metrics([HYP], [REF])["bleu"] == pytest.approx(expected, abs=1e-6)


def test_corpus_bleu_sums_counts_over_corpus_by_hand():
    # Adding the identical pair "a b c d" / "a b c d" adds 4/4, 3/3, 2/2, 1/1 matches and 4 tokens to each side.
    # Corpus counts (summed, not averaged per sentence):
    #   1-grams 9/10, 2-grams 6/8, 3-grams 4/6, 4-grams 2/4
    #   hyp length 10, ref length 11 -> brevity penalty exp(1 - 11/10)
    precisions = [9 / 10, 6 / 8, 4 / 6, 2 / 4]
    expected = 100 * math.exp(1 - 11 / 10) * math.prod(precisions) ** 0.25
    assert expected == pytest.approx(62.32, abs=0.01)
    m = compute_metrics([HYP, "a b c d"], [REF, "a b c d"])
    assert m["bleu"] == pytest.approx(expected, abs=1e-6)


def test_rouge_by_hand():
    # unigram overlap (clipped): the, cat, sat, on, mat = 5; hyp has 6 unigrams, ref has 7
    #   P = 5/6, R = 5/7, F1 = 2PR/(P+R) = 2*5/(6+7) = 10/13
    # bigram overlap: the cat, cat sat, sat on = 3; hyp has 5 bigrams, ref has 6 -> F1 = 2*3/(5+6) = 6/11
    # longest common subsequence: the cat sat on mat = 5 -> same as ROUGE-1 here, 10/13
    m = compute_metrics([HYP], [REF])
    assert m["rouge1"] == pytest.approx(100 * 10 / 13)
    assert m["rouge2"] == pytest.approx(100 * 6 / 11)
    assert m["rougeL"] == pytest.approx(100 * 10 / 13)


def test_rouge_is_averaged_over_pairs():
    # pair 1 as above (10/13), pair 2 identical (1) -> mean
    m = compute_metrics([HYP, "x y"], [REF, "x y"])
    assert m["rouge1"] == pytest.approx(100 * (10 / 13 + 1) / 2)


def test_sentence_bleu_disjoint_pair_is_small():
    m = compute_metrics(["alpha beta gamma delta epsilon"], ["one two three four five"])
    assert 0.0 <= m["sentence_bleu"] < 5.0
    assert m["bleu"] < 5.0


def test_sentence_bleu_is_mean_of_pairs():
    # identical pair -> 100, empty hypothesis -> 0; the mean is 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no nltk warning may escape
        m = compute_metrics(["a b c d e", ""], ["a b c d e", "some reference text"])
    assert m["sentence_bleu"] == pytest.approx(50.0)


def test_empty_and_one_token_hypotheses_do_not_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(["", "word", "two words"], ["a reference", "word", "no overlap here"])
    for key in ("bleu", "sentence_bleu", "rouge1", "rouge2", "rougeL"):
        assert 0.0 <= m[key] <= 100.0
        assert math.isfinite(m[key])


def test_distinct_and_lengths_by_hand():
    generated = ["a a a b", "a b c", "x"]
    references = ["r1 r2", "r1", "r1 r2 r3"]
    m = compute_metrics(generated, references)
    # corpus unigrams: a a a b | a b c | x -> 8 total, unique {a, b, c, x} = 4 -> 4/8
    assert m["distinct1"] == pytest.approx(4 / 8)
    # corpus bigrams: (a a)(a a)(a b) | (a b)(b c) | none -> 5 total, unique {aa, ab, bc} = 3 -> 3/5
    assert m["distinct2"] == pytest.approx(3 / 5)
    # per generation unigrams: 2/4, 3/3, 1/1 -> mean (0.5 + 1 + 1) / 3
    assert m["intra_distinct1"] == pytest.approx((0.5 + 1 + 1) / 3)
    # per generation bigrams: 2/3, 2/2; "x" has no bigram and is left out -> mean (2/3 + 1) / 2
    assert m["intra_distinct2"] == pytest.approx((2 / 3 + 1) / 2)
    # lengths: (4 + 3 + 1) / 3 and (2 + 1 + 3) / 3
    assert m["mean_len"] == pytest.approx(8 / 3)
    assert m["mean_ref_len"] == pytest.approx(2.0)
    assert m["n"] == 3


def test_distinct_without_ngrams_is_zero():
    m = compute_metrics(["", ""], ["a", "b"])
    assert m["distinct1"] == 0.0
    assert m["distinct2"] == 0.0
    assert m["intra_distinct1"] == 0.0
    assert m["mean_len"] == 0.0


def test_compute_metrics_rejects_bad_lists():
    with pytest.raises(UserError, match="differ"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(UserError):
        compute_metrics([], [])


# --------------------------------------------------------------------------------------------- reading


def test_read_generations_skips_blank_lines_and_ignores_extra_keys(tmp_path):
    path = write_jsonl(
        tmp_path / "gen.jsonl",
        [record("g1", "r1", candidates=["x", "y"]), "", "   ", record("g2", "r2")],
    )
    assert read_generations(path) == (["g1", "g2"], ["r1", "r2"])
    assert read_generations(str(path)) == (["g1", "g2"], ["r1", "r2"])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="nope.jsonl") as info:
        read_generations(path)
    assert "not found" in str(info.value)


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match="empty.jsonl") as info:
        read_generations(path)
    assert "no records" in str(info.value)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"generated": "g", "reference": ', "malformed JSON"),
        ('["g", "r"]', "JSON object"),
        ('"just a string"', "JSON object"),
        ('{"reference": "r"}', '"generated"'),
        ('{"generated": "g"}', '"reference"'),
        ('{"generated": 3, "reference": "r"}', '"generated"'),
        ('{"generated": "g", "reference": null}', '"reference"'),
        ('{"generated": ["g"], "reference": "r"}', "string"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad_line, expected):
    # the bad record is on line 3 (line 2 is blank and still counts)
    path = write_jsonl(tmp_path / "bad.jsonl", [record("g", "r"), "", bad_line, record("g", "r")])
    with pytest.raises(UserError) as info:
        read_generations(path)
    message = str(info.value)
    assert "bad.jsonl" in message
    assert "line 3" in message
    assert expected in message


# --------------------------------------------------------------------------------------------- output


def test_evaluate_file_writes_json(tmp_path):
    path = write_jsonl(tmp_path / "gen.jsonl", [record(HYP, REF), record("a b c d", "a b c d")])
    out = tmp_path / "out" / "metrics.json"
    metrics = evaluate_file(path, out_json=str(out))
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == pytest.approx(metrics)
    assert saved["n"] == 2
    assert saved["bleu"] == pytest.approx(62.32, abs=0.01)  # the hand-computed corpus value above
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_evaluate_file_without_out_json(tmp_path):
    path = write_jsonl(tmp_path / "gen.jsonl", [record("same words", "same words")])
    assert evaluate_file(path)["rouge1"] == pytest.approx(100.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl"]


def test_evaluate_file_error_propagates(tmp_path):
    with pytest.raises(UserError, match="missing.jsonl"):
        evaluate_file(tmp_path / "missing.jsonl", out_json=str(tmp_path / "m.json"))
    assert not (tmp_path / "m.json").exists()


def test_format_table_decimals_and_alignment():
    metrics = {
        "bleu": 12.3456,
        "rouge1": 50.0,
        "distinct1": 0.12345,
        "intra_distinct2": 1.0,
        "mean_len": 7.0,
        "n": 4,
    }
    table = format_table(metrics)
    lines = table.splitlines()
    assert "12.35" in table and "12.346" not in table
    assert "50.00" in table
    assert "0.123" in table and "0.1235" not in table
    assert "1.000" in table
    rows = {line.split()[0]: line.split()[1] for line in lines[2:]}
    assert rows == {
        "bleu": "12.35",
        "rouge1": "50.00",
        "distinct1": "0.123",
        "intra_distinct2": "1.000",
        "mean_len": "7.00",
        "n": "4",
    }
    # values are right-aligned: every data row ends at the same column
    assert len({len(line) for line in lines[2:]}) == 1


def test_format_comparison_has_a_column_per_run():
    untrained = {"bleu": 1.0, "distinct1": 0.5, "n": 10}
    trained = {"bleu": 25.5, "distinct1": 0.75, "n": 10}
    table = format_comparison({"untrained": untrained, "trained": trained})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "untrained", "trained"]
    body = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert body["bleu"] == ["1.00", "25.50"]
    assert body["distinct1"] == ["0.500", "0.750"]
    assert body["n"] == ["10", "10"]


def test_format_comparison_marks_missing_metrics():
    table = format_comparison({"a": {"bleu": 3.0}, "b": {"bleu": 4.0, "rouge1": 5.0}})
    body = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert body["rouge1"] == ["-", "5.00"]
