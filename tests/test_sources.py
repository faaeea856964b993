"""Corpus readers: jsonl pairs, the stdlib function/module tasks, document splits, the task registry."""

from __future__ import annotations

import gzip
import itertools
import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from sadiffuseq.data.sources import (
    TASKS,
    Example,
    ScanStats,
    get_task,
    iter_stdlib_files,
    read_jsonl_pairs,
    split_of,
    stdlib_functions,
    stdlib_modules,
    stdlib_root,
)
from sadiffuseq.errors import UserError

# ------------------------------------------------------------------------------------------------------
# a hand-written source tree

MOD_A = '''\
"""Module doc."""

import os


def plain(a, b):
    return a + b


def documented(x,
               y=2):
    """Add things.

    More text.
    """
    # a comment
    z = x + y

    return z


@decorator
@other(1)
def decorated(q):
    """Decorated."""
    return q * 2


def stub():
    """Only a stub."""
    ...


def long_one():
    """Long."""
    return [
        LONG_BODY
    ]


class Box(Base,
          metaclass=Meta):
    """A box."""

    def method(self, v):
        \'\'\'Store v.\'\'\'
        if v:
            self.v = v  # keep
        return self

    async def amethod(self):
        """Async."""
        pass

    def outer(self):
        """Outer."""
        def inner():
            """Inner doc."""
            return 1
        return inner()


def one(): return 1  # trailing
'''.replace("LONG_BODY", "x" * 2000)

MOD_B = '''\
# leading comment
"""Sub doc."""
import sys

if sys.platform == "win32":
    def cond(a) -> int:  # header comment
        """Conditional."""
        return a
else:
    async def cond(a):
        """Conditional too."""
        await a
'''

MOD_CONSTANTS = "X = 1\nY = 2\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stdlib")
    (root / "a.py").write_text(MOD_A, encoding="utf-8")
    (root / "pkg").mkdir()
    (root / "pkg" / "b.py").write_text(MOD_B, encoding="utf-8")
    (root / "pkg" / "consts.py").write_text(MOD_CONSTANTS, encoding="utf-8")
    (root / "pkg" / "notes.txt").write_text("def not_python():\n    '''x'''\n    return 1\n")
    (root / "broken.py").write_text("def f(:\n    pass\n", encoding="utf-8")
    (root / "latin.py").write_bytes(b"# -*- coding: utf-8 -*-\nx = '\xe9'\n")  # not valid UTF-8
    for skipped in ("test", "tests", "site-packages", "__pycache__", "idlelib", "lib2to3"):
        (root / skipped).mkdir()
        (root / skipped / "hidden.py").write_text('def h():\n    """Doc."""\n    return 1\n')
    return root


def test_file_listing_is_sorted_and_skips_excluded_dirs(tree):
    rel = [p.relative_to(tree).as_posix() for p in iter_stdlib_files(tree)]
    assert rel == ["a.py", "broken.py", "latin.py", "pkg/b.py", "pkg/consts.py"]


def test_stdlib_functions_exact_examples(tree):
    stats = ScanStats()
    got = list(stdlib_functions(tree, max_body_chars=1500, stats=stats))
    expected = [
        Example(
            src='def documented(x,\n               y=2):\n    """Add things.\n\n    More text.\n    """',
            trg="    # a comment\n    z = x + y\n\n    return z",
            doc_id="a.py",
        ),
        Example(src='def decorated(q):\n    """Decorated."""', trg="    return q * 2", doc_id="a.py"),
        Example(
            src="def method(self, v):\n    '''Store v.'''",
            trg="    if v:\n        self.v = v  # keep\n    return self",
            doc_id="a.py",
        ),
        Example(
            src='def outer(self):\n    """Outer."""',
            trg='    def inner():\n        """Inner doc."""\n        return 1\n    return inner()',
            doc_id="a.py",
        ),
        Example(src='def cond(a) -> int:  # header comment\n    """Conditional."""', trg="    return a", doc_id="pkg/b.py"),
        Example(src='async def cond(a):\n    """Conditional too."""', trg="    await a", doc_id="pkg/b.py"),
    ]
    assert got == expected
    assert stats.files == 5
    assert stats.failed_files == 2
    assert sorted(stats.failed_paths) == ["broken.py", "latin.py"]
    assert stats.examples == len(expected)


def test_stdlib_functions_max_body_chars(tree):
    names = [ex.src.split("(")[0] for ex in stdlib_functions(tree, max_body_chars=5000)]
    assert "def long_one" in names
    short = list(stdlib_functions(tree, max_body_chars=16))  # len("    return q * 2") == 16
    assert [ex.trg for ex in short] == ["    return q * 2", "    return a", "    await a"]


def test_stdlib_modules_exact(tree):
    got = {ex.doc_id: ex for ex in stdlib_modules(tree)}
    assert sorted(got) == ["a.py", "pkg/b.py"]  # consts.py has no def/class; broken files are skipped

    a = got["a.py"]
    assert a.src == "\n".join(
        [
            '"""Module doc."""',
            "",
            "def plain(a, b):",
            "def documented(x,",
            "               y=2):",
            "def decorated(q):",
            "def stub():",
            "def long_one():",
            "class Box(Base,",
            "          metaclass=Meta):",
            "    def method(self, v):",
            "    async def amethod(self):",
            "    def outer(self):",
            "def one():",
        ]
    )
    assert a.trg == MOD_A[len('"""Module doc."""\n\n') :]
    assert '"""Module doc."""' not in a.trg and "# keep" in a.trg

    b = got["pkg/b.py"]
    assert b.src == '"""Sub doc."""\n\ndef cond(a) -> int:\nasync def cond(a):'
    assert b.trg == MOD_B.replace('"""Sub doc."""\n', "")


def test_stdlib_modules_without_docstring(tmp_path):
    (tmp_path / "m.py").write_text("import x\n\n\nclass A:\n    x = 1\n\n    def f(self): return 2\n")
    (ex,) = stdlib_modules(tmp_path)
    assert ex == Example(
        src="class A:\n    def f(self):",
        trg="import x\n\n\nclass A:\n    x = 1\n\n    def f(self): return 2\n",
        doc_id="m.py",
    )


def test_missing_root_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        list(stdlib_functions(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------------
# the real standard library (parsed once)


@pytest.fixture(scope="module")
def real_functions() -> tuple[list[Example], ScanStats]:
    stats = ScanStats()
    return list(stdlib_functions(stats=stats)), stats


def test_stdlib_root_is_where_os_lives():
    import os

    root = stdlib_root()
    assert (root / "os.py").is_file()
    assert Path(os.__file__).resolve().parent == root


def test_real_stdlib_functions(real_functions):
    examples, stats = real_functions
    assert len(examples) > 2000
    assert all(ex.src.strip() and ex.trg.strip() for ex in examples)
    assert all(ex.src.lstrip().startswith(("def ", "async def ")) for ex in examples)
    assert all(len(ex.trg) <= 1500 for ex in examples)
    # bodies keep their indentation (rare exceptions: column-0 comments in top-level functions)
    assert sum(ex.trg.startswith((" ", "\t")) for ex in examples) >= 0.99 * len(examples)
    assert not any(part in {"test", "tests", "site-packages", "idlelib"} for ex in examples for part in ex.doc_id.split("/"))
    assert stats.files > 100 and stats.failed_files < stats.files // 10
    # deterministic order
    assert list(itertools.islice(stdlib_functions(), 50)) == examples[:50]


def test_real_stdlib_splits_are_disjoint_by_document(real_functions):
    examples, _ = real_functions
    by_split: dict[str, set[str]] = {"train": set(), "valid": set(), "test": set()}
    for ex in examples:
        by_split[split_of(ex.doc_id)].add(ex.doc_id)
    assert by_split["train"] and by_split["valid"] and by_split["test"]
    assert not (by_split["train"] & by_split["valid"])
    assert not (by_split["train"] & by_split["test"])
    assert not (by_split["valid"] & by_split["test"])


def test_real_stdlib_modules_first_few():
    mods = list(itertools.islice(stdlib_modules(), 5))
    assert len(mods) == 5
    for ex in mods:
        assert ex.doc_id.endswith(".py")
        assert ex.trg.strip()
        assert any(line.lstrip().startswith(("def ", "class ", "async def ")) for line in ex.src.splitlines())


# ------------------------------------------------------------------------------------------------------
# splits


def test_split_of_stable_and_fractions():
    ids = [f"doc{i}.py" for i in range(10000)]
    first = [split_of(d) for d in ids]
    assert first == [split_of(d) for d in ids]
    counts = Counter(first)
    assert set(counts) == {"train", "valid", "test"}
    assert 400 <= counts["valid"] <= 600
    assert 400 <= counts["test"] <= 600
    # custom fractions
    counts = Counter(split_of(d, valid_frac=0.2, test_frac=0.1) for d in ids)
    assert 1800 <= counts["valid"] <= 2200
    assert 850 <= counts["test"] <= 1150
    # a different seed reshuffles
    assert [split_of(d, seed=1) for d in ids] != first
    assert all(split_of(d, valid_frac=0.0, test_frac=0.0) == "train" for d in ids[:100])


def test_split_of_known_values():
    # Pinned so that any change to the hashing scheme (which would silently reshuffle datasets) is noticed.
    ids = [f"m{i}.py" for i in range(100)]
    assert {d: split_of(d) for d in ids if split_of(d) != "train"} == {
        "m4.py": "valid",
        "m5.py": "valid",
        "m75.py": "test",
        "m83.py": "valid",
        "m85.py": "test",
        "m93.py": "valid",
    }


@pytest.mark.parametrize("kwargs", [{"valid_frac": -0.1}, {"test_frac": 1.5}, {"valid_frac": 0.6, "test_frac": 0.6}])
def test_split_of_bad_fractions(kwargs):
    with pytest.raises(UserError):
        split_of("x", **kwargs)


# ------------------------------------------------------------------------------------------------------
# registry


def test_get_task():
    assert get_task("stdlib_functions") is stdlib_functions
    assert get_task("stdlib_modules") is stdlib_modules
    assert {"stdlib_functions", "stdlib_modules"} <= set(TASKS)
    with pytest.raises(UserError) as err:
        get_task("nope")
    assert "nope" in str(err.value)
    assert "stdlib_functions" in str(err.value) and "stdlib_modules" in str(err.value)


# ------------------------------------------------------------------------------------------------------
# jsonl


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_pairs(tmp_path):
    p = _write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"src": "a b", "trg": "c d"}),
            "",
            "   ",
            json.dumps({"src": "é", "trg": "日本", "id": 42}),
            json.dumps({"src": "x", "trg": "y", "id": "doc-7", "extra": [1]}),
        ],
    )
    assert list(read_jsonl_pairs(p)) == [
        Example("a b", "c d", "data.jsonl:1"),
        Example("é", "日本", "42"),
        Example("x", "y", "doc-7"),
    ]


def test_read_jsonl_pairs_custom_fields_and_gzip(tmp_path):
    p = tmp_path / "data.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"question": "q1", "answer": "a1"}) + "\n\n")
        fh.write(json.dumps({"question": "q2", "answer": "a2"}) + "\n")
    assert list(read_jsonl_pairs(p, src_field="question", trg_field="answer")) == [
        Example("q1", "a1", "data.jsonl.gz:1"),
        Example("q2", "a2", "data.jsonl.gz:3"),
    ]


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError) as err:
        read_jsonl_pairs(tmp_path / "absent.jsonl")  # raised at call time, not at first next()
    assert "absent.jsonl" in str(err.value)


GOOD = json.dumps({"src": "s", "trg": "t"})


@pytest.mark.parametrize(
    "bad_line, needle",
    [
        ('{"src": "s", "trg": ', "malformed JSON"),
        ('["s", "t"]', "object"),
        (json.dumps({"src": "s"}), "'trg'"),
        (json.dumps({"trg": "t"}), "'src'"),
        (json.dumps({"src": 3, "trg": "t"}), "'src'"),
        (json.dumps({"src": "s", "trg": None}), "'trg'"),
        (json.dumps({"src": "   \n", "trg": "t"}), "'src'"),
        (json.dumps({"src": "s", "trg": ""}), "'trg'"),
    ],
)
def test_read_jsonl_errors(tmp_path, bad_line, needle):
    p = _write_lines(tmp_path / "broken.jsonl", [GOOD, "", bad_line, GOOD])
    it = read_jsonl_pairs(p)
    assert next(it) == Example("s", "t", "broken.jsonl:1")
    with pytest.raises(UserError) as err:
        next(it)
    msg = str(err.value)
    assert "broken.jsonl" in msg
    assert "line 3" in msg
    assert needle in msg


def test_read_jsonl_bad_utf8(tmp_path):
    p = tmp_path / "enc.jsonl"
    p.write_bytes(GOOD.encode() + b"\n" + b'{"src": "\xff", "trg": "t"}\n')
    with pytest.raises(UserError, match=r"enc\.jsonl, line 2"):
        list(read_jsonl_pairs(p))


def test_read_jsonl_corrupt_gzip(tmp_path):
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(b"this is not gzip data")
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz"):
        list(read_jsonl_pairs(p))
