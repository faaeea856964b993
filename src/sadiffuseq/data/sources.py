"""Corpus readers: where the (source, target) pairs come from.

Every reader yields :class:`Example` records ``(src, trg, doc_id)``. ``doc_id`` names the document an
example was cut from; :func:`split_of` assigns whole documents to train/valid/test from a stable hash, so
no document contributes examples to two splits and the assignment is identical on every run and machine.

Sources:

* :func:`read_jsonl_pairs` reads a user corpus, one JSON object per line (optionally gzip-compressed).
* The embedded default corpus is the Python standard library of the running interpreter. It is present
  on every machine that can run this package, it is real text with long-range structure (a function
  body has to agree with its signature and docstring, a module with its imports and definitions), and
  it needs no download. Two tasks are cut from it:

  ``stdlib_functions``
      src = a function's ``def`` line(s) plus its docstring, trg = the rest of the body. Examples are a
      few hundred tokens long, so a model can be trained and evaluated on a CPU in minutes; this is the
      demo / smoke-test task.
  ``stdlib_modules``
      src = the module docstring plus the list of top-level ``def``/``class`` headers (with method
      headers), trg = the whole module source without its docstring. Targets run to thousands of
      tokens; this is the long-document task that sparse attention is meant for.

  Both tasks slice the raw source lines using ``ast`` line numbers (never ``ast.unparse``), so comments
  and formatting are kept exactly as written. ``code_module`` and ``code_prefix`` apply the same cuts to
  any directory of ``.py`` files.
* Named long-document tasks over real corpora (see ``../shared/data/README.md``), each a function
  ``task(path=None, **options)`` that streams one record at a time:

  ``science_abstract_to_text`` / ``science_text_to_abstract``
      SumPubMed papers: abstract -> full text, and the reverse. ``doc_id`` = the paper id.
  ``dialogue_next_turns`` (``qmsum_next_turns``, ``crd3_next_turns``)
      meeting (QMSum) and game-session (CRD3) transcripts as ``Speaker: utterance`` lines: src = the
      dialogue before a turn boundary, trg = the turns that follow. ``doc_id`` = the meeting / episode.
  ``crd3_synopsis_to_transcript``
      CRD3 episode synopsis -> the opening window(s) of the transcript.
  ``code_module`` / ``code_prefix``
      any tree of ``.py`` files: docstring + headers -> module; first part of a file -> the rest.
  ``text_prefix``
      plain-text files: the first words -> their continuation.

  With ``path=None`` the corpus tasks look for the shared data folder (``$SADIFFUSEQ_SHARED_DATA``, then
  ``../shared/data`` from the working directory, then ``../shared/data`` next to the source checkout).

Every task is registered by name in :data:`TASKS`; :func:`describe_tasks` gives one line for each.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import itertools
import logging
import os
import re
import sysconfig
import tokenize
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sadiffuseq.errors import UserError

__all__ = [
    "Example",
    "ScanStats",
    "read_jsonl_pairs",
    "stdlib_root",
    "iter_stdlib_files",
    "iter_python_files",
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
    "split_of",
    "TASKS",
    "get_task",
    "task_names",
    "describe_tasks",
]

log = logging.getLogger(__name__)

#: Directory names never descended into when scanning the standard library.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "__pycache__",
        "turtledemo",
        "ensurepip",
    }
)

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """One (source, target) pair; ``doc_id`` names the document it was cut from (splits are by document)."""

    src: str
    trg: str
    doc_id: str


@dataclass
class ScanStats:
    """Counters filled in by the stdlib readers when passed as ``stats=``."""

    files: int = 0
    failed_files: int = 0
    examples: int = 0
    skipped: int = 0
    failed_paths: list[str] = field(default_factory=list)

    def count(self, ex: "Example | None") -> None:
        if ex is None:
            self.skipped += 1
        else:
            self.examples += 1


# --------------------------------------------------------------------------------------------------------
# jsonl


def read_jsonl_pairs(path: str | os.PathLike, src_field: str = "src", trg_field: str = "trg") -> Iterator[Example]:
    """Stream the (src, trg) pairs of a jsonl file (``.gz`` suffix: gzip-compressed).

    Each non-blank line must be a JSON object with non-empty string fields ``src_field`` and ``trg_field``.
    ``doc_id`` is the record's ``"id"`` field when present, otherwise ``"<file name>:<line number>"``.
    A missing file raises :class:`UserError` at once; bad records raise it when reached, naming the file,
    the 1-based line number and the field.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file (expected a jsonl file of {src_field!r}/{trg_field!r} records)")
    if not p.is_file():
        raise UserError(f"{p}: not a file (expected a jsonl file of {src_field!r}/{trg_field!r} records)")
    return _iter_jsonl(p, src_field, trg_field)


class _Record(NamedTuple):
    """One JSON object of a jsonl file and where it was read."""

    path: Path
    line: int  # 1-based
    data: dict

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


def _iter_records(p: Path) -> Iterator[_Record]:
    """The JSON objects of a jsonl file (``.gz``: gzip), read one line at a time; blank lines are skipped.

    A line that is not UTF-8, not JSON or not an object raises :class:`UserError` naming the file and line.
    """
    opener = gzip.open if p.name.endswith(".gz") else open
    line_no = 0
    try:
        with opener(p, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{p}, line {line_no}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{p}, line {line_no}: malformed JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{p}, line {line_no}: expected a JSON object, got {type(rec).__name__}")
                yield _Record(p, line_no, rec)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated archive raises EOFError.
        raise UserError(f"{p}, line {line_no + 1}: cannot read file: {exc}") from None


def _iter_jsonl(p: Path, src_field: str, trg_field: str) -> Iterator[Example]:
    for rec in _iter_records(p):
        src = _field(rec.data, src_field, rec.where, str)
        trg = _field(rec.data, trg_field, rec.where, str)
        yield Example(src=src, trg=trg, doc_id=_record_id(rec))


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _field(obj: dict, key: str, where: str, kind: type, label: str | None = None, *, allow_empty: bool = False):
    """``obj[key]``, which must be of JSON type ``kind`` (str, list or dict) and, unless ``allow_empty``, not
    empty or whitespace; otherwise :class:`UserError` ``"<where>: field '<label>' ..."`` (label: ``key``)."""
    name = label or key
    if key not in obj:
        raise UserError(f"{where}: missing field {name!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise UserError(f"{where}: field {name!r} must be a JSON {_JSON_TYPE_NAMES[kind]}, got {_json_type(value)}")
    if not allow_empty and not (value.strip() if isinstance(value, str) else value):
        raise UserError(f"{where}: field {name!r} is empty")
    return value


def _record_id(rec: _Record) -> str:
    """The record's ``"id"`` field (string or integer), else ``"<file name>:<line number>"``."""
    doc_id = rec.data.get("id")
    if doc_id is None:
        return f"{rec.path.name}:{rec.line}"
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise UserError(f"{rec.where}: field 'id' must be a string or an integer, got {_json_type(doc_id)}")
    return str(doc_id)


# --------------------------------------------------------------------------------------------------------
# standard library scanning


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library (where ``os.py`` lives)."""
    root = Path(os.__file__).resolve().parent if getattr(os, "__file__", None) else None
    if root is None or not root.is_dir():
        root = Path(sysconfig.get_path("stdlib"))
    return root


def iter_python_files(
    root: str | os.PathLike, skip_dirs: frozenset[str] = SKIP_DIRS, *, skip_hidden: bool = False
) -> list[Path]:
    """All ``*.py`` files under ``root``, not descending into ``skip_dirs`` (nor, with ``skip_hidden``, into
    directories whose name starts with a dot), sorted by relative path."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{base}: not a directory (expected a tree of Python source files)")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not (skip_hidden and d.startswith("."))]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    found.sort(key=lambda q: q.relative_to(base).as_posix())
    return found


def iter_stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """All ``*.py`` files under ``root`` (default :func:`stdlib_root`), skipping :data:`SKIP_DIRS`, sorted."""
    return iter_python_files(Path(root) if root is not None else stdlib_root(), SKIP_DIRS)


@dataclass
class _Module:
    rel: str
    text: str
    lines: list[str]  # without line terminators; lines[i] is source line i + 1
    tree: ast.Module


def _read_python_source(path: Path) -> str:
    """A source file's text as the interpreter sees it (declared encoding, universal newlines, no BOM)."""
    raw = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    text = raw.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")
    return text[1:] if text.startswith("\ufeff") else text


_SOURCE_ERRORS = (OSError, SyntaxError, ValueError, UnicodeDecodeError, LookupError)


def _load_sources(
    base: Path, stats: ScanStats | None, skip_dirs: frozenset[str] = SKIP_DIRS, skip_hidden: bool = False
) -> Iterator[tuple[str, str]]:
    """(path relative to ``base``, text) of every ``.py`` file; unreadable files are counted and skipped."""
    for path in iter_python_files(base, skip_dirs, skip_hidden=skip_hidden):
        rel = path.relative_to(base).as_posix()
        if stats is not None:
            stats.files += 1
        try:
            text = _read_python_source(path)
        except _SOURCE_ERRORS as exc:
            if stats is not None:
                stats.failed_files += 1
                stats.failed_paths.append(rel)
            log.debug("skipping %s: %s", path, exc)
            continue
        yield rel, text


def _load_modules(
    root: str | os.PathLike | None,
    stats: ScanStats | None,
    skip_dirs: frozenset[str] = SKIP_DIRS,
    skip_hidden: bool = False,
) -> Iterator[_Module]:
    base = Path(root) if root is not None else stdlib_root()
    for path in iter_python_files(base, skip_dirs, skip_hidden=skip_hidden):
        rel = path.relative_to(base).as_posix()
        if stats is not None:
            stats.files += 1
        try:
            # ast line numbers refer to this text (universal newlines).
            text = _read_python_source(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for invalid escapes in old modules
                tree = ast.parse(text, filename=str(path))
        except _SOURCE_ERRORS as exc:
            if stats is not None:
                stats.failed_files += 1
                stats.failed_paths.append(rel)
            log.debug("skipping %s: %s", path, exc)
            continue
        yield _Module(rel=rel, text=text, lines=text.split("\n"), tree=tree)


_BLOCKS = (ast.If, ast.Try, ast.With) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


def _block_bodies(stmt: ast.stmt) -> list[list[ast.stmt]]:
    bodies = [getattr(stmt, "body", [])]
    if isinstance(stmt, ast.If):
        bodies.append(stmt.orelse)
    elif isinstance(stmt, ast.Try) or (hasattr(ast, "TryStar") and isinstance(stmt, ast.TryStar)):
        bodies.extend(h.body for h in stmt.handlers)
        bodies.extend([stmt.orelse, stmt.finalbody])
    return bodies


def _definitions(body: list[ast.stmt], *, into_classes: bool) -> Iterator[ast.stmt]:
    """Function and class definitions of a module or class body, looking through if/try/with blocks.

    Function bodies are never entered (nested functions are not yielded). With ``into_classes`` the
    methods of classes (recursively, nested classes too) are yielded after their class.
    """
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield stmt
        elif isinstance(stmt, ast.ClassDef):
            yield stmt
            if into_classes:
                yield from _definitions(stmt.body, into_classes=True)
        elif isinstance(stmt, _BLOCKS):
            for sub in _block_bodies(stmt):
                yield from _definitions(sub, into_classes=into_classes)


def _docstring_stmt(body: list[ast.stmt]) -> ast.Expr | None:
    if body and isinstance(body[0], ast.Expr):
        value = body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return body[0]
    return None


def _is_trivial(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t\f"))]


def _dedent(lines: list[str], prefix: str, *, strict: bool = True) -> list[str] | None:
    """Remove ``prefix`` from every line; whitespace-only lines become empty.

    A non-blank line that does not start with ``prefix`` makes the result None (``strict``) or loses only
    the leading whitespace it has (not ``strict``).
    """
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif line.startswith(prefix):
            out.append(line[len(prefix) :])
        elif strict:
            return None
        else:
            out.append(line.lstrip(" \t\f"))
    return out


def _only_whitespace_before(line: str, col_offset: int) -> bool:
    # ast column offsets count UTF-8 bytes.
    return not line.encode("utf-8")[:col_offset].strip()


def _strip_blank_edges(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _function_example(mod: _Module, fn: ast.FunctionDef | ast.AsyncFunctionDef, max_body_chars: int) -> Example | None:
    doc = _docstring_stmt(fn.body)
    if doc is None:
        return None
    rest = fn.body[1:]
    if not rest or all(_is_trivial(s) for s in rest):
        return None
    lines = mod.lines
    # The docstring must start on a line of its own and nothing else may follow it on its last line.
    if doc.lineno <= fn.lineno or not _only_whitespace_before(lines[doc.lineno - 1], doc.col_offset):
        return None
    if rest[0].lineno <= doc.end_lineno:
        return None
    prefix = _indent_of(lines[fn.lineno - 1])
    src_lines = _dedent(lines[fn.lineno - 1 : doc.end_lineno], prefix)
    trg_lines = _dedent(lines[doc.end_lineno : fn.end_lineno], prefix)
    if src_lines is None or trg_lines is None:
        return None
    trg = "\n".join(_strip_blank_edges(trg_lines))
    if not trg.strip() or len(trg) > max_body_chars:
        return None
    return Example(src="\n".join(src_lines), trg=trg, doc_id=mod.rel)


def stdlib_functions(
    root: str | os.PathLike | None = None,
    max_body_chars: int = 1500,
    *,
    stats: ScanStats | None = None,
) -> Iterator[Example]:
    """Function-level task: src = ``def`` line(s) + docstring, trg = the rest of the body.

    Every function and method (not functions nested in functions) that has a docstring becomes one
    example, unless its remaining body is empty, only ``pass``/``...``, or longer than ``max_body_chars``
    characters. Decorators are left out. Both texts are dedented by the ``def`` line's indentation, so
    the body keeps its indentation relative to the ``def``. ``doc_id`` is the module path relative to
    ``root`` (default: the running interpreter's standard library). Files that fail to decode or parse
    are skipped and counted in ``stats.failed_files``.
    """
    for mod in _load_modules(root, stats):
        for node in _definitions(mod.tree.body, into_classes=True):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            ex = _function_example(mod, node, max_body_chars)
            if stats is not None:
                stats.count(ex)
            if ex is not None:
                yield ex
    if stats is not None and stats.failed_files:
        log.info("stdlib_functions: %d of %d files failed to decode or parse", stats.failed_files, stats.files)


def _header_lines(lines: list[str], node: ast.stmt) -> list[str]:
    """The ``def ...:`` / ``class ...:`` header of ``node`` as written (decorators excluded).

    The header runs from the keyword line to the first ``:`` outside brackets; anything after that colon on
    its line (a comment, a one-line body) is cut off.
    """
    start = node.lineno - 1
    feed = iter(lines[start:])

    def readline() -> str:
        try:
            return next(feed) + "\n"
        except StopIteration:
            return ""

    depth = 0
    try:
        for tok in tokenize.generate_tokens(readline):
            if tok.type != tokenize.OP:
                continue
            if tok.string in ("(", "[", "{"):
                depth += 1
            elif tok.string in (")", "]", "}"):
                depth -= 1
            elif tok.string == ":" and depth == 0:
                row, col = tok.end
                header = lines[start : start + row]
                header[-1] = header[-1][:col]
                return header
    except (tokenize.TokenError, SyntaxError):
        pass
    return [lines[start].rstrip()]


def _module_example(mod: _Module) -> Example | None:
    top = list(_definitions(mod.tree.body, into_classes=False))
    if not top:
        return None
    lines = mod.lines
    headers: list[str] = []
    for node in top:
        prefix = _indent_of(lines[node.lineno - 1])
        headers.extend(_dedent(_header_lines(lines, node), prefix, strict=False))
        if isinstance(node, ast.ClassDef):
            for meth in _definitions(node.body, into_classes=False):
                if isinstance(meth, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    headers.extend(_dedent(_header_lines(lines, meth), prefix, strict=False))
    signatures = "\n".join(headers)

    doc = _docstring_stmt(mod.tree.body)
    if doc is None:
        src, body = signatures, mod.text
    else:
        # Cut the docstring's exact span (ast columns are UTF-8 byte offsets) out of the source text.
        first = lines[doc.lineno - 1].encode("utf-8")
        last = lines[doc.end_lineno - 1].encode("utf-8")
        if doc.end_lineno == doc.lineno:
            doc_text = first[doc.col_offset : doc.end_col_offset].decode("utf-8")
        else:
            middle = lines[doc.lineno : doc.end_lineno - 1]
            doc_text = "\n".join(
                [first[doc.col_offset :].decode("utf-8"), *middle, last[: doc.end_col_offset].decode("utf-8")]
            )
        before = first[: doc.col_offset].decode("utf-8")
        after = last[doc.end_col_offset :].decode("utf-8").lstrip(" \t;")
        kept = lines[: doc.lineno - 1]
        if before.strip():
            kept.append(before.rstrip())
        if after.strip():
            kept.append(after)
        kept.extend(lines[doc.end_lineno :])
        body = "\n".join(kept).lstrip("\n")
        src = doc_text + "\n\n" + signatures
    return Example(src=src, trg=body, doc_id=mod.rel)


def stdlib_modules(
    root: str | os.PathLike | None = None,
    *,
    stats: ScanStats | None = None,
) -> Iterator[Example]:
    """Module-level (long-document) task: src = docstring + top-level headers, trg = the module source.

    src is the module docstring as written (quotes included), a blank line, then the header line(s) of
    every top-level ``def``/``class`` (also those inside top-level if/try/with blocks), each class
    followed by its method headers with their indentation relative to the class. trg is the full source
    text with the module docstring removed. Modules without any function or class are skipped.
    ``doc_id`` is the module path relative to ``root``.
    """
    for mod in _load_modules(root, stats):
        ex = _module_example(mod)
        if stats is not None:
            stats.count(ex)
        if ex is not None:
            yield ex
    if stats is not None and stats.failed_files:
        log.info("stdlib_modules: %d of %d files failed to decode or parse", stats.failed_files, stats.files)


# --------------------------------------------------------------------------------------------------------
# corpus tasks: shared pieces

#: Environment variable naming the shared data folder (the one holding ``science/`` and ``dialogue/``).
SHARED_DATA_ENV = "SADIFFUSEQ_SHARED_DATA"

SCIENCE_DEFAULT = "science/sumpubmed_3k.jsonl.gz"
DIALOGUE_DEFAULT = "dialogue"

#: Directories never descended into when scanning a user-given code tree (dot-directories are skipped too).
CODE_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})


def _shared_data_dirs() -> list[Path]:
    """Where the shared data folder is looked for, in order (see the module docstring)."""
    dirs = []
    if os.environ.get(SHARED_DATA_ENV):
        dirs.append(Path(os.environ[SHARED_DATA_ENV]))
    dirs.append(Path("..", "shared", "data"))
    here = Path(__file__).resolve()
    if here.parents[2].name == "src":  # a source checkout: <repo>/src/sadiffuseq/data/sources.py
        dirs.append(here.parents[3].parent / "shared" / "data")
    unique: dict[Path, Path] = {}
    for d in dirs:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def _default_corpus(task: str, rel: str, what: str) -> Path:
    looked = [d / rel for d in _shared_data_dirs()]
    for candidate in looked:
        if candidate.exists():
            return candidate
    places = ", ".join(str(c) for c in looked)
    raise UserError(
        f"{task}: no path given and the default corpus is not there (looked for {places}); "
        f"pass the task's path option ({what}) or set {SHARED_DATA_ENV} to the shared data folder"
    )


def _check_int(task: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{task}: option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_str(task: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{task}: option {name} must be a non-empty string, got {value!r}")
    return value


def _existing_file(task: str, path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file ({task} expects {what})")
    if not p.is_file():
        raise UserError(f"{p}: not a file ({task} expects {what})")
    return p


# --------------------------------------------------------------------------------------------------------
# science papers (SumPubMed: {id, text, abstract, shorter_abstract})


def _science(task: str, path, abstract_field: str, text_field: str, reverse: bool) -> Iterator[Example]:
    what = "a jsonl(.gz) file of papers with 'id', abstract and text fields"
    _check_str(task, "abstract_field", abstract_field)
    _check_str(task, "text_field", text_field)
    p = _existing_file(task, path if path is not None else _default_corpus(task, SCIENCE_DEFAULT, what), what)

    def examples() -> Iterator[Example]:
        for rec in _iter_records(p):
            abstract = _field(rec.data, abstract_field, rec.where, str).strip()
            text = _field(rec.data, text_field, rec.where, str).strip()
            src, trg = (text, abstract) if reverse else (abstract, text)
            yield Example(src=src, trg=trg, doc_id=_record_id(rec))

    return examples()


def science_abstract_to_text(
    path: str | os.PathLike | None = None, *, abstract_field: str = "abstract", text_field: str = "text"
) -> Iterator[Example]:
    """Scientific papers: src = the abstract, trg = the full text (SumPubMed: ~300 -> ~4,000 words).

    ``path``: a jsonl(.gz) file of ``{id, abstract, text}`` records (default
    ``<shared data>/science/sumpubmed_3k.jsonl.gz``). ``abstract_field`` may name another summary field
    (SumPubMed also has ``shorter_abstract``). Both texts are stripped of surrounding whitespace and kept
    otherwise as written. ``doc_id`` = the record's ``id`` (else ``<file>:<line>``).
    """
    return _science("science_abstract_to_text", path, abstract_field, text_field, reverse=False)


def science_text_to_abstract(
    path: str | os.PathLike | None = None, *, abstract_field: str = "abstract", text_field: str = "text"
) -> Iterator[Example]:
    """Scientific papers: src = the full text, trg = the abstract (the reverse of ``science_abstract_to_text``)."""
    return _science("science_text_to_abstract", path, abstract_field, text_field, reverse=True)


# --------------------------------------------------------------------------------------------------------
# dialogue transcripts (QMSum meetings, CRD3 game sessions)


def _turn_line(speaker: str, text: str) -> str | None:
    """``"Speaker: utterance"`` on one line (runs of whitespace become one space); None for an empty turn."""
    words = text.split()
    return f"{' '.join(speaker.split())}: {' '.join(words)}" if words else None


def _turns(rec: _Record, key: str) -> Iterator[tuple[str, dict]]:
    """``(label, turn)`` for each object of the record's list field ``key``; anything else is a UserError."""
    for k, turn in enumerate(_field(rec.data, key, rec.where, list, allow_empty=True)):
        label = f"{key}[{k}]"
        if not isinstance(turn, dict):
            raise UserError(f"{rec.where}: field {label!r} must be a JSON object, got {_json_type(turn)}")
        yield label, turn


def _qmsum_transcript(rec: _Record) -> tuple[str, list[str]]:
    where = rec.where
    meeting = _field(rec.data, "meeting_id", where, str).strip()
    lines = []
    for label, turn in _turns(rec, "meeting_transcripts"):
        speaker = _field(turn, "speaker", where, str, f"{label}.speaker")
        line = _turn_line(speaker, _field(turn, "content", where, str, f"{label}.content", allow_empty=True))
        if line is not None:
            lines.append(line)
    return f"qmsum:{meeting}", lines


def _crd3_transcript(rec: _Record) -> tuple[str, list[str]]:
    where = rec.where
    episode = _field(rec.data, "episode", where, str).strip()
    lines = []
    for label, turn in _turns(rec, "turns"):
        names = _field(turn, "names", where, list, f"{label}.names")
        for m, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise UserError(f"{where}: field '{label}.names[{m}]' must be a non-empty string, got {name!r}")
        text = _field(turn, "text", where, str, f"{label}.text", allow_empty=True)
        line = _turn_line(" & ".join(n.strip() for n in names), text)
        if line is not None:
            lines.append(line)
    return f"crd3:{episode}", lines


class _DialogueCorpus(NamedTuple):
    name: str  # file-name prefix and doc_id prefix
    label: str
    key: str  # the transcript field, which identifies a record of this corpus
    read: Callable[[_Record], tuple[str, list[str]]]


_DIALOGUE_CORPORA = {
    "qmsum": _DialogueCorpus("qmsum", "QMSum", "meeting_transcripts", _qmsum_transcript),
    "crd3": _DialogueCorpus("crd3", "CRD3", "turns", _crd3_transcript),
}
_DIALOGUE_FILES_WHAT = "a QMSum/CRD3 jsonl(.gz) file, or a directory of qmsum*.jsonl(.gz) / crd3*.jsonl(.gz) files"


def _dialogue_corpora(task: str, corpus: str) -> list[_DialogueCorpus]:
    if corpus == "both":
        return list(_DIALOGUE_CORPORA.values())
    if corpus not in _DIALOGUE_CORPORA:
        raise UserError(f"{task}: option corpus must be 'both', 'qmsum' or 'crd3', got {corpus!r}")
    return [_DIALOGUE_CORPORA[corpus]]


def _dialogue_files(task: str, path, corpora: list[_DialogueCorpus]) -> list[Path]:
    """The files to read: ``path`` itself, or the matching files of a directory (QMSum first, by name)."""
    p = Path(path) if path is not None else _default_corpus(task, DIALOGUE_DEFAULT, _DIALOGUE_FILES_WHAT)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory ({task} expects {_DIALOGUE_FILES_WHAT})")
    if p.is_file():
        return [p]
    files = []
    for c in corpora:
        files.extend(
            sorted(
                f
                for f in p.iterdir()
                if f.is_file() and f.name.startswith(c.name) and f.name.endswith((".jsonl", ".jsonl.gz"))
            )
        )
    if not files:
        wanted = " or ".join(f"{c.name}*.jsonl(.gz)" for c in corpora)
        raise UserError(f"{p}: no {wanted} files in this directory ({task} expects {_DIALOGUE_FILES_WHAT})")
    return files


def _transcript(rec: _Record, corpora: list[_DialogueCorpus]) -> tuple[str, list[str]]:
    """(doc_id, ``Speaker: utterance`` lines) of a record of one of ``corpora`` (told apart by their fields)."""
    for c in corpora:
        if c.key in rec.data:
            return c.read(rec)
    wanted = " or ".join(f"{c.key!r} ({c.label})" for c in corpora)
    raise UserError(f"{rec.where}: missing field {wanted}")


def _turn_windows(
    counts: list[int],
    start: int,
    *,
    history_words: int,
    target_words: int,
    stride_turns: int | None,
    min_target_words: int,
    max_windows: int | None = None,
) -> Iterator[tuple[int, int, int]]:
    """Windows ``(h, i, j)`` over turns with ``counts[t]`` words each: history = turns h..i-1, target = i..j-1.

    The target takes turns from ``i`` while their words stay within ``target_words``; the history takes
    turns backwards from ``i - 1`` while within ``history_words`` (none when ``history_words`` is 0). Each
    takes at least one turn, so a single turn longer than its budget is kept whole. The next window starts
    at ``j`` (``stride_turns`` None: targets tile the transcript) or ``i + stride_turns``. Windows whose
    target has fewer than ``min_target_words`` words are left out; at most ``max_windows`` are yielded.
    """
    n, i, made = len(counts), start, 0
    while i < n and (max_windows is None or made < max_windows):
        j, size = i, 0
        while j < n and (j == i or size + counts[j] <= target_words):
            size += counts[j]
            j += 1
        h, hist = i, 0
        while history_words and h > 0 and (h == i or hist + counts[h - 1] <= history_words):
            hist += counts[h - 1]
            h -= 1
        if size >= min_target_words:
            yield h, i, j
            made += 1
        i = j if stride_turns is None else i + stride_turns


def _next_turns(
    task: str,
    path,
    corpus: str,
    history_words: int,
    target_words: int,
    stride_turns: int | None,
    min_history_words: int,
    min_target_words: int,
) -> Iterator[Example]:
    corpora = _dialogue_corpora(task, corpus)
    _check_int(task, "history_words", history_words)
    _check_int(task, "target_words", target_words)
    if stride_turns is not None:
        _check_int(task, "stride_turns", stride_turns)
    _check_int(task, "min_history_words", min_history_words, 0)
    _check_int(task, "min_target_words", min_target_words, 0)
    files = _dialogue_files(task, path, corpora)

    def examples() -> Iterator[Example]:
        for f in files:
            for rec in _iter_records(f):
                doc_id, lines = _transcript(rec, corpora)
                counts = [len(line.split()) for line in lines]
                # The first target starts after at least one turn and at least min_history_words words.
                start, before = 1, counts[0] if counts else 0
                while start < len(counts) and before < min_history_words:
                    before += counts[start]
                    start += 1
                windows = _turn_windows(
                    counts,
                    start,
                    history_words=history_words,
                    target_words=target_words,
                    stride_turns=stride_turns,
                    min_target_words=min_target_words,
                )
                for h, i, j in windows:
                    yield Example(src="\n".join(lines[h:i]), trg="\n".join(lines[i:j]), doc_id=doc_id)

    return examples()


def dialogue_next_turns(
    path: str | os.PathLike | None = None,
    *,
    corpus: str = "both",
    history_words: int = 1500,
    target_words: int = 3000,
    stride_turns: int | None = None,
    min_history_words: int = 0,
    min_target_words: int = 1,
) -> Iterator[Example]:
    """Dialogue continuation: src = the last turns of a transcript, trg = the turns that follow.

    Each turn is one line ``Speaker: utterance`` (CRD3 turns spoken together: ``A & B: ...``; whitespace
    runs become one space; empty turns are dropped). Word budgets count the whitespace-separated words of
    these lines, speaker label included, and windows are cut only at turn boundaries:

    * trg = the turns from turn ``i`` on while within ``target_words`` (at least one turn);
    * src = the turns before ``i``, going back while within ``history_words`` (at least one turn);
    * the first ``i`` is the first turn boundary after at least one turn and ``min_history_words`` words;
      the next ``i`` is where the previous target ended (``stride_turns`` None: targets tile the rest of
      the transcript without overlap) or ``stride_turns`` turns further on;
    * windows whose target has fewer than ``min_target_words`` words are left out.

    ``path``: a QMSum or CRD3 jsonl(.gz) file (records told apart by their ``meeting_transcripts`` /
    ``turns`` field) or a directory, of which the ``qmsum*.jsonl(.gz)`` and ``crd3*.jsonl(.gz)`` files are
    read (QMSum first). Default: ``<shared data>/dialogue``. ``corpus``: ``"both"``, ``"qmsum"`` or
    ``"crd3"``. ``doc_id`` = ``"qmsum:<meeting_id>"`` or ``"crd3:<episode>"``, so all windows of a
    transcript share a split (CRD3's own ``split`` field is not used).
    """
    return _next_turns(
        "dialogue_next_turns",
        path,
        corpus,
        history_words,
        target_words,
        stride_turns,
        min_history_words,
        min_target_words,
    )


def qmsum_next_turns(path: str | os.PathLike | None = None, **options) -> Iterator[Example]:
    """:func:`dialogue_next_turns` on the QMSum meeting transcripts only (same options but ``corpus``)."""
    return _next_turns("qmsum_next_turns", path, "qmsum", **_next_turn_options("qmsum_next_turns", options))


def crd3_next_turns(path: str | os.PathLike | None = None, **options) -> Iterator[Example]:
    """:func:`dialogue_next_turns` on the CRD3 episode transcripts only (same options but ``corpus``)."""
    return _next_turns("crd3_next_turns", path, "crd3", **_next_turn_options("crd3_next_turns", options))


_NEXT_TURN_DEFAULTS = {
    "history_words": 1500,
    "target_words": 3000,
    "stride_turns": None,
    "min_history_words": 0,
    "min_target_words": 1,
}


def _next_turn_options(task: str, options: dict) -> dict:
    unknown = sorted(set(options) - set(_NEXT_TURN_DEFAULTS))
    if unknown:
        raise UserError(f"{task}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(_NEXT_TURN_DEFAULTS)}")
    return {**_NEXT_TURN_DEFAULTS, **options}


def crd3_synopsis_to_transcript(
    path: str | os.PathLike | None = None,
    *,
    target_words: int = 3000,
    windows: int = 1,
    history_words: int = 0,
    min_target_words: int = 1,
) -> Iterator[Example]:
    """Episode synopsis -> transcript: src = a CRD3 episode's ``synopsis``, trg = its transcript's opening.

    The transcript is formatted as in :func:`dialogue_next_turns`. trg = the first turns within
    ``target_words`` words; with ``windows`` > 1 the next windows follow without overlap (at most
    ``windows`` per episode). As every window of an episode would otherwise get the same src, later
    windows should be given ``history_words`` > 0: src is then the synopsis, a blank line, and the last
    turns before the window within ``history_words`` words. ``path``: a CRD3 jsonl(.gz) file or a
    directory holding ``crd3*.jsonl(.gz)`` (default ``<shared data>/dialogue``). ``doc_id`` =
    ``"crd3:<episode>"``.
    """
    task = "crd3_synopsis_to_transcript"
    corpora = _dialogue_corpora(task, "crd3")
    _check_int(task, "target_words", target_words)
    _check_int(task, "windows", windows)
    _check_int(task, "history_words", history_words, 0)
    _check_int(task, "min_target_words", min_target_words, 0)
    files = _dialogue_files(task, path, corpora)

    def examples() -> Iterator[Example]:
        for f in files:
            for rec in _iter_records(f):
                doc_id, lines = _transcript(rec, corpora)
                synopsis = _field(rec.data, "synopsis", rec.where, str).strip()
                counts = [len(line.split()) for line in lines]
                cuts = _turn_windows(
                    counts,
                    0,
                    history_words=history_words,
                    target_words=target_words,
                    stride_turns=None,
                    min_target_words=min_target_words,
                    max_windows=windows,
                )
                for h, i, j in cuts:
                    src = synopsis if h == i else synopsis + "\n\n" + "\n".join(lines[h:i])
                    yield Example(src=src, trg="\n".join(lines[i:j]), doc_id=doc_id)

    return examples()


# --------------------------------------------------------------------------------------------------------
# any tree of Python files


def _code_tree(task: str, path, skip_dirs) -> tuple[Path, frozenset[str], bool]:
    """(root, directories to skip, skip dot-directories) for a code task."""
    if path is None:
        root, skip, hidden = stdlib_root(), SKIP_DIRS, False
    else:
        root, skip, hidden = Path(path), CODE_SKIP_DIRS, True
        if not root.is_dir():
            problem = "not a directory" if root.exists() else "no such directory"
            raise UserError(f"{root}: {problem} ({task} expects a directory of .py files)")
    if skip_dirs is not None:
        skip = frozenset([skip_dirs] if isinstance(skip_dirs, str) else skip_dirs)
    return root, skip, hidden


def code_module(
    path: str | os.PathLike | None = None,
    *,
    skip_dirs: frozenset[str] | list[str] | None = None,
    stats: ScanStats | None = None,
) -> Iterator[Example]:
    """:func:`stdlib_modules` for any directory of ``.py`` files: docstring + headers -> module source.

    ``path``: the root directory (default: the running interpreter's standard library, which gives exactly
    the ``stdlib_modules`` examples). ``skip_dirs``: directory names not descended into (default
    :data:`SKIP_DIRS` for the standard library; for a given ``path`` :data:`CODE_SKIP_DIRS` plus every
    dot-directory). ``doc_id`` = the file's path relative to the root.
    """
    root, skip, hidden = _code_tree("code_module", path, skip_dirs)

    def examples() -> Iterator[Example]:
        for mod in _load_modules(root, stats, skip, hidden):
            ex = _module_example(mod)
            if stats is not None:
                stats.count(ex)
            if ex is not None:
                yield ex

    return examples()


def _prefix_split(text: str, fraction: float, min_lines: int) -> tuple[str, str] | None:
    """Cut ``text`` (blank edge lines removed) at the line boundary nearest ``fraction`` of its characters.

    The prefix keeps at least one line and the rest at least one; ``prefix + "\\n" + rest`` is the text.
    Texts of fewer than ``min_lines`` lines (at least 2) give None.
    """
    lines = _strip_blank_edges(text.split("\n"))
    if len(lines) < max(2, min_lines):
        return None
    goal = fraction * (sum(len(line) + 1 for line in lines) - 1)
    best, best_gap, offset = 1, None, 0
    for k in range(1, len(lines)):
        offset += len(lines[k - 1]) + 1  # characters before line k
        gap = abs(offset - goal)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
        if offset > goal:
            break
    return "\n".join(lines[:best]), "\n".join(lines[best:])


def code_prefix(
    path: str | os.PathLike | None = None,
    *,
    prefix_fraction: float = 0.25,
    min_lines: int = 4,
    skip_dirs: frozenset[str] | list[str] | None = None,
    stats: ScanStats | None = None,
) -> Iterator[Example]:
    """File continuation for any directory of ``.py`` files: src = the first lines of a file, trg = the rest.

    Leading and trailing blank lines are dropped; the file is cut at the line boundary whose character
    offset is nearest ``prefix_fraction`` of its length (the prefix has at least one line, the rest too),
    so ``src + "\\n" + trg`` is the file. Files with fewer than ``min_lines`` lines are skipped (counted in
    ``stats.skipped``). The file need not parse. ``path``, ``skip_dirs`` and ``doc_id`` as in
    :func:`code_module`.
    """
    task = "code_prefix"
    fraction_ok = isinstance(prefix_fraction, (int, float)) and not isinstance(prefix_fraction, bool)
    if not fraction_ok or not 0 < prefix_fraction < 1:
        raise UserError(f"{task}: option prefix_fraction must be strictly between 0 and 1, got {prefix_fraction!r}")
    _check_int(task, "min_lines", min_lines)
    root, skip, hidden = _code_tree(task, path, skip_dirs)

    def examples() -> Iterator[Example]:
        for rel, text in _load_sources(root, stats, skip, hidden):
            cut = _prefix_split(text, prefix_fraction, min_lines)
            ex = None if cut is None else Example(src=cut[0], trg=cut[1], doc_id=rel)
            if stats is not None:
                stats.count(ex)
            if ex is not None:
                yield ex

    return examples()


# --------------------------------------------------------------------------------------------------------
# plain text files

_WORD = re.compile(r"\S+")


def text_prefix(
    path: str | os.PathLike | None = None,
    *,
    prefix_words: int = 256,
    target_words: int = 3000,
    min_target_words: int = 1,
    suffixes: tuple[str, ...] | list[str] = (".txt", ".md"),
    stats: ScanStats | None = None,
) -> Iterator[Example]:
    """Text continuation: src = the first ``prefix_words`` words of a file, trg = the next ``target_words``.

    ``path`` (required): a text file, or a directory whose files ending in one of ``suffixes``
    (case-insensitive) are read, recursively, in sorted order, skipping dot-directories. Files must be
    UTF-8. Words are runs of non-whitespace; both texts keep the file's own spacing and line breaks
    between their words (the whitespace between src and trg is dropped). Files with fewer than
    ``prefix_words + min_target_words`` words are skipped (counted in ``stats.skipped``). ``doc_id`` = the
    file's path relative to the directory (its name for a single file).
    """
    task = "text_prefix"
    _check_int(task, "prefix_words", prefix_words)
    _check_int(task, "target_words", target_words)
    _check_int(task, "min_target_words", min_target_words)
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    ends = tuple(s.lower() for s in suffixes)
    if path is None:
        raise UserError(f"{task}: pass the task's path option (a text file, or a directory of {'/'.join(ends)} files)")
    root = Path(path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = [], root
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(Path(dirpath, f) for f in filenames if f.lower().endswith(ends))
        files.sort(key=lambda q: q.relative_to(root).as_posix())
        if not files:
            raise UserError(f"{root}: no {'/'.join(ends)} files in this directory ({task} expects plain-text files)")
    else:
        raise UserError(f"{root}: no such file or directory ({task} expects a text file or a directory of them)")

    def examples() -> Iterator[Example]:
        for f in files:
            if stats is not None:
                stats.files += 1
            try:
                text = f.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{f}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            except OSError as exc:
                raise UserError(f"{f}: cannot read file: {exc}") from None
            text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
            words = list(itertools.islice(_WORD.finditer(text), prefix_words + target_words))
            ex = None
            if len(words) >= prefix_words + min_target_words:
                src = text[: words[prefix_words - 1].end()]
                trg = text[words[prefix_words].start() : words[-1].end()]
                ex = Example(src=src, trg=trg, doc_id=f.relative_to(base).as_posix())
            if stats is not None:
                stats.count(ex)
            if ex is not None:
                yield ex

    return examples()


# --------------------------------------------------------------------------------------------------------
# splits and registry


def split_of(doc_id: str, seed: int = 0, valid_frac: float = 0.05, test_frac: float = 0.05) -> str:
    """``"train"``, ``"valid"`` or ``"test"`` for a document, from a stable hash of ``seed`` and ``doc_id``.

    The answer depends only on the arguments (BLAKE2b, not Python's salted ``hash``), so it is the same
    on every run and machine, and all examples of one document share a split.
    """
    for name, frac in (("valid_frac", valid_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, got {frac}")
    if valid_frac + test_frac > 1.0:
        raise UserError(f"valid_frac + test_frac must be at most 1, got {valid_frac} + {test_frac}")
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


TASKS: dict[str, Callable[..., Iterator[Example]]] = {
    "stdlib_functions": stdlib_functions,
    "stdlib_modules": stdlib_modules,
    "code_module": code_module,
    "code_prefix": code_prefix,
    "text_prefix": text_prefix,
    "science_abstract_to_text": science_abstract_to_text,
    "science_text_to_abstract": science_text_to_abstract,
    "dialogue_next_turns": dialogue_next_turns,
    "qmsum_next_turns": qmsum_next_turns,
    "crd3_next_turns": crd3_next_turns,
    "crd3_synopsis_to_transcript": crd3_synopsis_to_transcript,
}

_DESCRIPTIONS = {
    "stdlib_functions": "Python stdlib functions: def line(s) + docstring -> body (short; the CPU demo task)",
    "stdlib_modules": "Python stdlib modules: docstring + def/class headers -> module source (long)",
    "code_module": "any .py tree (path=dir, default: stdlib): docstring + def/class headers -> module source",
    "code_prefix": "any .py tree (path=dir, default: stdlib): first ~25% of a file's lines -> the rest",
    "text_prefix": "plain-text files (path=.txt/.md file or dir, required): first 256 words -> next <=3000 words",
    "science_abstract_to_text": "SumPubMed papers (path=jsonl.gz): abstract (~300 words) -> full text (~4,000 words)",
    "science_text_to_abstract": "SumPubMed papers (path=jsonl.gz): full text (~4,000 words) -> abstract (~300 words)",
    "dialogue_next_turns": "QMSum meetings + CRD3 episodes (path=file or dir): last <=1500 words -> next <=3000 words",
    "qmsum_next_turns": "QMSum meeting transcripts: last <=1500 words -> next <=3000 words of turns",
    "crd3_next_turns": "CRD3 game-session transcripts: last <=1500 words -> next <=3000 words of turns",
    "crd3_synopsis_to_transcript": "CRD3 episodes: synopsis (~1,600 words) -> first <=3000 words of the transcript",
}


def get_task(name: str) -> Callable[..., Iterator[Example]]:
    """The reader registered as ``name`` in :data:`TASKS`."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(TASKS)


def describe_tasks() -> dict[str, str]:
    """Task name -> a one-line description (for ``--help``), in sorted order."""
    return {name: _DESCRIPTIONS.get(name, "") for name in task_names()}
