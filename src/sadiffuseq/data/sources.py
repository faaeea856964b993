"""Corpus readers: where the (source, target) pairs come from.

Every reader yields :class:`Example` records ``(src, trg, doc_id)``. ``doc_id`` names the document an
example was cut from; :func:`split_of` assigns whole documents to train/valid/test from a stable hash, so
no document contributes examples to two splits and the assignment is identical on every run and machine.

Two sources exist:

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

Both tasks slice the raw source lines using ``ast`` line numbers (never ``ast.unparse``), so comments and
formatting are kept exactly as written.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import logging
import os
import sysconfig
import tokenize
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sadiffuseq.errors import UserError

__all__ = [
    "Example",
    "ScanStats",
    "read_jsonl_pairs",
    "stdlib_root",
    "iter_stdlib_files",
    "stdlib_functions",
    "stdlib_modules",
    "split_of",
    "TASKS",
    "get_task",
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


def _iter_jsonl(p: Path, src_field: str, trg_field: str) -> Iterator[Example]:
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
                yield _parse_record(line, p, line_no, src_field, trg_field)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated archive raises EOFError.
        raise UserError(f"{p}, line {line_no + 1}: cannot read file: {exc}") from None


def _parse_record(line: str, p: Path, line_no: int, src_field: str, trg_field: str) -> Example:
    where = f"{p}, line {line_no}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    values = []
    for name in (src_field, trg_field):
        if name not in rec:
            raise UserError(f"{where}: missing field {name!r}")
        value = rec[name]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise UserError(f"{where}: field {name!r} is empty")
        values.append(value)
    doc_id = rec.get("id")
    if doc_id is None:
        doc_id = f"{p.name}:{line_no}"
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise UserError(f"{where}: field 'id' must be a string or an integer, got {type(doc_id).__name__}")
    return Example(src=values[0], trg=values[1], doc_id=str(doc_id))


# --------------------------------------------------------------------------------------------------------
# standard library scanning


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library (where ``os.py`` lives)."""
    root = Path(os.__file__).resolve().parent if getattr(os, "__file__", None) else None
    if root is None or not root.is_dir():
        root = Path(sysconfig.get_path("stdlib"))
    return root


def iter_stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """All ``*.py`` files under ``root`` (default :func:`stdlib_root`), skipping :data:`SKIP_DIRS`, sorted."""
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise UserError(f"{base}: not a directory (expected a tree of Python source files)")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    found.sort(key=lambda q: q.relative_to(base).as_posix())
    return found


@dataclass
class _Module:
    rel: str
    text: str
    lines: list[str]  # without line terminators; lines[i] is source line i + 1
    tree: ast.Module


def _load_modules(root: str | os.PathLike | None, stats: ScanStats | None) -> Iterator[_Module]:
    base = Path(root) if root is not None else stdlib_root()
    for path in iter_stdlib_files(base):
        rel = path.relative_to(base).as_posix()
        if stats is not None:
            stats.files += 1
        try:
            raw = path.read_bytes()
            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
            # Universal newlines, as the interpreter sees the file; ast line numbers refer to this text.
            text = raw.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")
            if text.startswith("\ufeff"):
                text = text[1:]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for invalid escapes in old modules
                tree = ast.parse(text, filename=str(path))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError, LookupError) as exc:
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
}


def get_task(name: str) -> Callable[..., Iterator[Example]]:
    """The reader registered as ``name`` in :data:`TASKS`."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None
