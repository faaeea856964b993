"""Named long-document tasks: science papers, dialogue transcripts, code trees, plain text, the registry.

Every corpus here is a small hand-made file in tmp_path that follows the field layout of the real one
(SumPubMed, QMSum, CRD3); the real files are only read by the optional smoke test at the end.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from sadiffuseq.data import sources
from sadiffuseq.data.sources import (
    TASKS,
    Example,
    ScanStats,
    code_module,
    code_prefix,
    crd3_next_turns,
    crd3_synopsis_to_transcript,
    describe_tasks,
    dialogue_next_turns,
    get_task,
    qmsum_next_turns,
    science_abstract_to_text,
    science_text_to_abstract,
    stdlib_modules,
    task_names,
    text_prefix,
)
from sadiffuseq.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl_gz(path: Path, records: list) -> Path:
    """Records (dicts, or raw strings written as they are) one per line, gzip-compressed."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for rec in records:
            fh.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        result = fn(*args, **kwargs)
        list(result)
    return str(err.value)


# ------------------------------------------------------------------------------------------------------
# science papers


def paper(pid: str, n: int) -> dict:
    return {
        "id": pid,
        "text": f"BACKGROUND\nbody of paper {n} <cit> with <dig> numbers .\n",
        "abstract": f"  abstract of paper {n} .",
        "shorter_abstract": f"short {n}",
    }


def test_science_both_directions(tmp_path):
    p = write_jsonl_gz(tmp_path / "papers.jsonl.gz", [paper("11", 1), "", paper("12", 2)])
    forward = list(science_abstract_to_text(p))
    assert forward == [
        Example("abstract of paper 1 .", "BACKGROUND\nbody of paper 1 <cit> with <dig> numbers .", "11"),
        Example("abstract of paper 2 .", "BACKGROUND\nbody of paper 2 <cit> with <dig> numbers .", "12"),
    ]
    backward = list(science_text_to_abstract(str(p)))
    assert backward == [Example(ex.trg, ex.src, ex.doc_id) for ex in forward]
    short = list(science_abstract_to_text(p, abstract_field="shorter_abstract"))
    assert [ex.src for ex in short] == ["short 1", "short 2"]


def test_science_errors_name_file_line_field(tmp_path):
    no_abstract = {k: v for k, v in paper("3", 3).items() if k != "abstract"}
    p = write_jsonl_gz(tmp_path / "bad.jsonl.gz", [paper("1", 1), no_abstract])
    msg = error_of(science_abstract_to_text, p)
    assert "bad.jsonl.gz" in msg and "line 2" in msg and "'abstract'" in msg

    p = write_jsonl_gz(tmp_path / "type.jsonl.gz", [{**paper("1", 1), "text": ["not", "a", "string"]}])
    msg = error_of(science_text_to_abstract, p)
    assert "type.jsonl.gz, line 1" in msg and "'text'" in msg and "string" in msg


def test_streaming_yields_records_before_a_bad_line(tmp_path):
    records = [paper("1", 1), paper("2", 2), '{"id": "3", "text": ', paper("4", 4)]
    p = write_jsonl_gz(tmp_path / "stream.jsonl.gz", records)
    it = science_abstract_to_text(p)
    assert [ex.doc_id for ex in itertools.islice(it, 2)] == ["1", "2"]
    with pytest.raises(UserError) as err:
        next(it)
    assert "stream.jsonl.gz, line 3" in str(err.value) and "malformed JSON" in str(err.value)


def test_missing_explicit_path(tmp_path):
    msg = error_of(science_abstract_to_text, tmp_path / "absent.jsonl.gz")
    assert "absent.jsonl.gz" in msg and "no such file" in msg
    msg = error_of(dialogue_next_turns, tmp_path / "nodir")
    assert "nodir" in msg and "no such file or directory" in msg


def test_missing_default_path_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_shared_data_dirs", lambda: [tmp_path / "nowhere"])
    msg = error_of(science_abstract_to_text)
    assert str(tmp_path / "nowhere" / "science" / "sumpubmed_3k.jsonl.gz") in msg
    assert "path" in msg and "SADIFFUSEQ_SHARED_DATA" in msg
    msg = error_of(dialogue_next_turns)
    assert str(tmp_path / "nowhere" / "dialogue") in msg


def test_default_path_from_environment(tmp_path, monkeypatch):
    (tmp_path / "science").mkdir()
    write_jsonl_gz(tmp_path / "science" / "sumpubmed_3k.jsonl.gz", [paper("7", 7)])
    monkeypatch.setenv("SADIFFUSEQ_SHARED_DATA", str(tmp_path))
    assert [ex.doc_id for ex in science_abstract_to_text()] == ["7"]


# ------------------------------------------------------------------------------------------------------
# dialogue transcripts

# "Speaker: words" lines of M1 have 4, 4, 4, 5 and 2 words (the speaker label counts: "Prof A:" is two).
M1_TURNS = [
    ("Prof A", "hello there"),
    ("B", "one   two three"),  # whitespace runs become one space
    ("Prof A", "four five"),
    ("C", "six seven eight nine"),
    ("B", "ten"),
]
M1 = [f"{s}: {' '.join(t.split())}" for s, t in M1_TURNS]


def meeting(mid: str, turns) -> dict:
    return {
        "meeting_id": mid,
        "domain": "Academic",
        "topic_list": [{"topic": "greetings", "relevant_text_span": [["0", "2"]]}],
        "general_query_list": [{"query": "Summarize the whole meeting", "answer": "They counted."}],
        "specific_query_list": [],
        "meeting_transcripts": [{"speaker": s, "content": t} for s, t in turns],
    }


def episode(ep: str, turns, synopsis: str = "Pre-Show\nThe party meets.", split: str = "train") -> dict:
    return {
        "episode": ep,
        "split": split,
        "wiki_blurb": "blurb",
        "synopsis": synopsis,
        "synopsis_struct": [],
        "turns": [{"names": names, "text": text, "number": k} for k, (names, text) in enumerate(turns)],
    }


def test_next_turns_exact_windows(tmp_path):
    p = write_jsonl_gz(tmp_path / "qmsum_val.jsonl.gz", [meeting("M1", M1_TURNS)])
    got = list(qmsum_next_turns(p, history_words=8, target_words=8))
    assert got == [
        # target from turn 1: 4 + 4 words (a third turn would make 13 > 8); history: turn 0
        Example("Prof A: hello there", "B: one two three\nProf A: four five", "qmsum:M1"),
        # next target starts where the last ended: 5 + 2 words; history: 4 + 4 words (turn 0 would make 12 > 8)
        Example("B: one two three\nProf A: four five", "C: six seven eight nine\nB: ten", "qmsum:M1"),
    ]


def test_next_turns_stride_and_minimums(tmp_path):
    p = write_jsonl_gz(tmp_path / "qmsum_val.jsonl.gz", [meeting("M1", M1_TURNS)])
    # stride 1: one window per turn boundary, targets overlap
    got = list(qmsum_next_turns(p, history_words=3, target_words=5, stride_turns=1))
    assert [(ex.src, ex.trg) for ex in got] == [
        (M1[0], M1[1]),
        (M1[1], M1[2]),  # history budget 3 < 4 words of turn 1, but at least one turn is kept
        (M1[2], M1[3]),
        (M1[3], M1[4]),  # turn 3 alone (5 words) exceeds the history budget: kept whole
    ]
    # the first target starts once 7 words of history exist (after turns 0 and 1: 8 words)
    got = list(qmsum_next_turns(p, history_words=100, target_words=100, min_history_words=7))
    assert got == [Example("\n".join(M1[:2]), "\n".join(M1[2:]), "qmsum:M1")]
    # short last targets can be left out
    got = list(qmsum_next_turns(p, history_words=100, target_words=8, min_target_words=7))
    assert [ex.trg for ex in got] == ["\n".join(M1[1:3]), "\n".join(M1[3:5])]  # 8 and 7 words
    got = list(qmsum_next_turns(p, history_words=100, target_words=8, min_target_words=8))
    assert [ex.trg for ex in got] == ["\n".join(M1[1:3])]
    got = list(qmsum_next_turns(p, history_words=100, target_words=4, min_target_words=5))
    assert [ex.trg for ex in got] == [M1[3]]  # an oversized single turn is kept whole as a target


def test_windows_cut_only_at_turn_boundaries(tmp_path):
    turns = [(f"Speaker {k % 3}", " ".join(f"w{k}_{m}" for m in range(1 + k % 7))) for k in range(60)]
    p = write_jsonl_gz(tmp_path / "qmsum_test.jsonl.gz", [meeting("Big", turns)])
    lines = [f"{s}: {t}" for s, t in turns]
    got = list(qmsum_next_turns(p, history_words=30, target_words=40))
    assert len(got) > 3
    covered = []
    for ex in got:
        src, trg = ex.src.split("\n"), ex.trg.split("\n")
        assert all(line in lines for line in src + trg)  # whole turns, speaker names kept
        start = lines.index(trg[0])
        assert lines[start - len(src) : start] == src  # history ends right before the target
        assert lines[start : start + len(trg)] == trg
        assert sum(len(line.split()) for line in trg) <= 40
        assert sum(len(line.split()) for line in src) <= 30
        covered.extend(trg)
    assert covered == lines[1:]  # default stride: targets tile the transcript after turn 0


def test_crd3_names_joined_and_empty_turns_dropped(tmp_path):
    turns = [
        (["MATT"], "Welcome  back."),
        (["LAURA", "TRAVIS"], "Hi!"),
        (["SAM"], "   "),
        (["MATT"], "Roll\ninitiative."),
    ]
    p = write_jsonl_gz(tmp_path / "crd3_cleaned.jsonl.gz", [episode("C1E001", turns)])
    got = list(crd3_next_turns(p, history_words=50, target_words=50))
    assert got == [Example("MATT: Welcome back.", "LAURA & TRAVIS: Hi!\nMATT: Roll initiative.", "crd3:C1E001")]


def test_dialogue_directory_reads_both_corpora(tmp_path):
    d = tmp_path / "dialogue"
    d.mkdir()
    write_jsonl_gz(d / "qmsum_train.jsonl.gz", [meeting("Tr1", M1_TURNS), meeting("Tr2", M1_TURNS[:3])])
    write_jsonl_gz(d / "qmsum_val.jsonl.gz", [meeting("Va1", M1_TURNS)])
    write_jsonl_gz(d / "crd3_cleaned.jsonl.gz", [episode("C1E002", [(["MATT"], "a b"), (["SAM"], "c d")])])
    (d / "notes.txt").write_text("ignored")
    got = list(dialogue_next_turns(d, history_words=100, target_words=100))
    assert [ex.doc_id for ex in got] == ["qmsum:Tr1", "qmsum:Tr2", "qmsum:Va1", "crd3:C1E002"]
    assert got[3] == Example("MATT: a b", "SAM: c d", "crd3:C1E002")
    assert [ex.doc_id for ex in dialogue_next_turns(d, corpus="crd3")] == ["crd3:C1E002"]
    assert [ex.doc_id for ex in crd3_next_turns(d)] == ["crd3:C1E002"]
    assert len(list(qmsum_next_turns(d))) == 3
    # a split assigns whole transcripts
    assert len({sources.split_of(ex.doc_id) for ex in got if ex.doc_id == "qmsum:Tr1"}) == 1


def test_crd3_synopsis_to_transcript(tmp_path):
    turns = [(["MATT"], "one two"), (["SAM"], "three four five"), (["MATT"], "six"), (["LIAM"], "seven eight")]
    ep = episode("C2E005", turns, synopsis=" Pre-Show\nThey fight.\n")
    p = write_jsonl_gz(tmp_path / "crd3_cleaned.jsonl.gz", [ep])
    lines = ["MATT: one two", "SAM: three four five", "MATT: six", "LIAM: seven eight"]
    assert list(crd3_synopsis_to_transcript(p, target_words=7)) == [
        Example("Pre-Show\nThey fight.", "\n".join(lines[:2]), "crd3:C2E005")
    ]
    got = list(crd3_synopsis_to_transcript(p, target_words=7, windows=3, history_words=4))
    assert got == [
        Example("Pre-Show\nThey fight.", "\n".join(lines[:2]), "crd3:C2E005"),
        Example("Pre-Show\nThey fight.\n\n" + lines[1], "\n".join(lines[2:]), "crd3:C2E005"),
    ]


@pytest.mark.parametrize(
    "record, field",
    [
        (
            {"meeting_id": "M", "meeting_transcripts": [{"speaker": "A", "content": "x"}, {"content": "y"}]},
            "meeting_transcripts[1].speaker",
        ),
        (
            {"meeting_id": "M", "meeting_transcripts": [{"speaker": "A", "content": 3}]},
            "meeting_transcripts[0].content",
        ),
        ({"meeting_id": "M", "meeting_transcripts": "A: hi"}, "'meeting_transcripts'"),
        ({"meeting_transcripts": []}, "'meeting_id'"),
        ({"episode": "E", "turns": [{"names": "MATT", "text": "x"}]}, "turns[0].names"),
        ({"episode": "E", "turns": [{"names": ["MATT", ""], "text": "x"}]}, "turns[0].names[1]"),
        ({"episode": "E", "turns": [{"names": ["MATT"]}]}, "turns[0].text"),
        ({"meeting_id": "M", "transcript": []}, "'meeting_transcripts' (QMSum) or 'turns' (CRD3)"),
    ],
)
def test_dialogue_errors_name_file_line_field(tmp_path, record, field):
    p = write_jsonl_gz(tmp_path / "dlg.jsonl.gz", [meeting("OK", M1_TURNS), record])
    it = dialogue_next_turns(p, history_words=5, target_words=5)
    first = next(it)  # the good first record streams before the bad one is read
    assert first.doc_id == "qmsum:OK"
    with pytest.raises(UserError) as err:
        list(it)
    msg = str(err.value)
    assert "dlg.jsonl.gz, line 2" in msg and field in msg


def test_dialogue_bad_options(tmp_path):
    p = write_jsonl_gz(tmp_path / "qmsum_val.jsonl.gz", [meeting("M1", M1_TURNS)])
    assert "history_words" in error_of(dialogue_next_turns, p, history_words=0)
    assert "corpus" in error_of(dialogue_next_turns, p, corpus="ami")
    assert "bogus" in error_of(qmsum_next_turns, p, bogus=1)
    msg = error_of(crd3_synopsis_to_transcript, p)  # a QMSum file given to a CRD3-only task
    assert "line 1" in msg and "'turns' (CRD3)" in msg
    msg = error_of(dialogue_next_turns, tmp_path, corpus="crd3")  # a directory without crd3 files
    assert "crd3*.jsonl(.gz)" in msg


# ------------------------------------------------------------------------------------------------------
# code trees and plain text

MOD = '''\
"""Tiny module."""

import os


def f(a):
    return a


class K:
    def m(self):
        return 1
'''


@pytest.fixture
def code_tree(tmp_path) -> Path:
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / ".venv").mkdir()
    (root / "pkg" / "mod.py").write_text(MOD)
    (root / "tests" / "test_x.py").write_text("def test_x():\n    assert True\n\n\n# end\n")
    (root / ".venv" / "hidden.py").write_text(MOD)
    (root / "pkg" / "eight.py").write_text("\n" + "".join(f"a = {i}\n" for i in range(8)) + "\n\n")
    (root / "pkg" / "short.py").write_text("x = 1\ny = 2\n")
    (root / "pkg" / "broken.py").write_text("def broken(:\n    pass\n    pass\n    pass\n")
    return root


def test_code_module_on_any_tree(code_tree):
    got = {ex.doc_id: ex for ex in code_module(code_tree)}
    assert sorted(got) == ["pkg/mod.py", "tests/test_x.py"]  # no dot-dirs, tests kept, no unparsable files
    headers = '"""Tiny module."""\n\ndef f(a):\nclass K:\n    def m(self):'
    assert got["pkg/mod.py"] == Example(headers, MOD[len('"""Tiny module."""\n\n') :], "pkg/mod.py")
    # the stdlib task is the special case of the same cut
    assert list(code_module(code_tree / "pkg")) == list(stdlib_modules(code_tree / "pkg"))
    assert [ex.doc_id for ex in code_module(code_tree, skip_dirs=["tests"])] == ["pkg/mod.py"]


def test_code_prefix_on_any_tree(code_tree):
    stats = ScanStats()
    got = {ex.doc_id: ex for ex in code_prefix(code_tree, stats=stats)}
    assert sorted(got) == ["pkg/broken.py", "pkg/eight.py", "pkg/mod.py", "tests/test_x.py"]
    assert stats.skipped == 1  # short.py: 2 lines < min_lines
    # 8 lines of 5 characters (47 with the newlines): 25% is 11.75 characters, nearest boundary at 12
    assert got["pkg/eight.py"] == Example("a = 0\na = 1", "\n".join(f"a = {i}" for i in range(2, 8)), "pkg/eight.py")
    for rel, ex in got.items():
        assert ex.src + "\n" + ex.trg == (code_tree / rel).read_text().strip("\n")
    half = {ex.doc_id: ex for ex in code_prefix(code_tree, prefix_fraction=0.5, min_lines=2)}
    assert half["pkg/short.py"] == Example("x = 1", "y = 2", "pkg/short.py")
    assert "prefix_fraction" in error_of(code_prefix, code_tree, prefix_fraction=1.5)
    assert "no such directory" in error_of(code_module, code_tree / "absent")


def test_text_prefix(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "a.txt").write_text("One two three\n\nfour  five six seven", encoding="utf-8")
    (d / "sub" / "b.MD").write_text("\ufeff# Title\r\nalpha beta gamma delta", encoding="utf-8")
    (d / "short.txt").write_text("only three words")
    (d / "c.rst").write_text("not read at all here")
    (d / ".git" / "x.txt").write_text("hidden one two three four five")
    stats = ScanStats()
    got = list(text_prefix(d, prefix_words=3, target_words=2, stats=stats))
    assert got == [
        Example("One two three", "four  five", "a.txt"),  # spacing inside each text is kept
        Example("# Title\nalpha", "beta gamma", "sub/b.MD"),
    ]
    assert stats.skipped == 1
    single = list(text_prefix(d / "a.txt", prefix_words=2))
    assert single == [Example("One two", "three\n\nfour  five six seven", "a.txt")]
    assert "path" in error_of(text_prefix)
    (d / "bad.txt").write_bytes(b"caf\xe9 au lait " * 3)
    msg = error_of(text_prefix, d, prefix_words=1)
    assert "bad.txt" in msg and "UTF-8" in msg


# ------------------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_descriptions():
    names = task_names()
    assert names == sorted(TASKS)
    expected = {
        "stdlib_functions",
        "stdlib_modules",
        "code_module",
        "code_prefix",
        "text_prefix",
        "science_abstract_to_text",
        "science_text_to_abstract",
        "dialogue_next_turns",
        "qmsum_next_turns",
        "crd3_next_turns",
        "crd3_synopsis_to_transcript",
    }
    assert expected <= set(names)
    desc = describe_tasks()
    assert list(desc) == names
    assert all(text and "\n" not in text for text in desc.values())
    assert all(get_task(name) is TASKS[name] for name in names)
    with pytest.raises(UserError, match="dialogue_next_turns"):
        get_task("dialogue")


# ------------------------------------------------------------------------------------------------------
# the real corpora (optional)


@pytest.mark.skipif(not (SHARED / "science").is_dir() or not (SHARED / "dialogue").is_dir(), reason="no ../shared/data")
def test_real_corpora_first_examples():
    science = list(itertools.islice(science_abstract_to_text(SHARED / "science" / "sumpubmed_3k.jsonl.gz"), 3))
    assert len(science) == 3 and len({ex.doc_id for ex in science}) == 3
    assert all(len(ex.trg.split()) > len(ex.src.split()) for ex in science)

    qmsum = list(itertools.islice(qmsum_next_turns(SHARED / "dialogue"), 3))
    assert len(qmsum) == 3 and all(ex.doc_id.startswith("qmsum:") for ex in qmsum)
    assert all(len(ex.trg.split()) <= 3000 and len(ex.src.split()) <= 1500 for ex in qmsum)
    assert all(": " in line for ex in qmsum for line in ex.trg.split("\n"))

    crd3 = list(itertools.islice(crd3_synopsis_to_transcript(SHARED / "dialogue" / "crd3_cleaned.jsonl.gz"), 1))
    assert crd3[0].doc_id.startswith("crd3:") and crd3[0].src and crd3[0].trg.startswith(("MATT", "LAURA", "SAM"))
