"""Scoring generated text against references.

``sadiffuseq sample`` writes a JSON-lines file with one record per line::

    {"source": "...", "reference": "...", "generated": "..."}

(extra keys such as ``"candidates"`` are allowed and ignored). ``sadiffuseq eval FILE`` reads it with
:func:`read_generations`, scores it with :func:`compute_metrics` and prints :func:`format_table`.

The metrics follow the evaluation protocol of DiffuSeq (Gong et al., "DiffuSeq: Sequence to Sequence
Text Generation with Diffusion Models", ICLR 2023), which reports sentence-level BLEU, ROUGE-L and
diversity; standard corpus BLEU is added so numbers are comparable with the wider literature.

``bleu``
    Corpus BLEU from sacrebleu with its defaults (13a tokenisation, exponential smoothing): clipped
    n-gram counts for n = 1..4 are summed over the whole corpus, the geometric mean of the four
    precisions is multiplied by the brevity penalty ``exp(1 - ref_len / hyp_len)`` (1 when the
    hypotheses are at least as long as the references). Scale 0-100.
``sentence_bleu``
    DiffuSeq's BLEU: for every pair, ``nltk.translate.bleu_score.sentence_bleu([ref.split()],
    hyp.split(), smoothing_function=SmoothingFunction().method4)``, i.e. whitespace tokens, smoothing
    method 4 of Chen & Cherry (2014); the per-sentence scores are averaged. An empty hypothesis scores 0.
    Reported x100 (0-100) so it reads on the same scale as ``bleu``.
``rouge1``, ``rouge2``, ``rougeL``
    F-measures from Google's ``rouge_score`` package (no stemming; its tokenizer lowercases and keeps
    alphanumeric tokens only): unigram overlap, bigram overlap and longest common subsequence.
    Averaged over pairs, x100.
``distinct1``, ``distinct2``
    Corpus-level distinct-n (Li et al., 2016), DiffuSeq's diversity measure: the number of unique
    whitespace n-grams across all generations divided by the total number of n-grams (n-grams never
    span two generations). 0-1; 0 when there are no n-grams at all.
``intra_distinct1``, ``intra_distinct2``
    Distinct-n computed within each generation and averaged over the generations that contain at least
    one n-gram; low values mean a generation repeats itself. 0-1.
``mean_len``, ``mean_ref_len``
    Mean number of whitespace tokens in the generations and in the references.
``n``
    Number of scored pairs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from sadiffuseq.errors import UserError

# Display order and number format of the known metrics; unknown keys are shown after these, with 3 decimals.
_PERCENT_METRICS = ("bleu", "sentence_bleu", "rouge1", "rouge2", "rougeL")
_UNIT_METRICS = ("distinct1", "distinct2", "intra_distinct1", "intra_distinct2")
_LENGTH_METRICS = ("mean_len", "mean_ref_len")
METRIC_ORDER = (*_PERCENT_METRICS, *_UNIT_METRICS, *_LENGTH_METRICS, "n")


# --------------------------------------------------------------------------------------------- reading


def read_generations(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Read a ``sadiffuseq sample`` JSON-lines file and return ``(generated, references)``.

    Blank lines are skipped. Raises :class:`UserError` naming the file (and the 1-based line number)
    for a missing or unreadable file, malformed JSON, a record that is not an object, a missing or
    non-string ``"generated"`` / ``"reference"`` field, or a file without records.
    """
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a JSON-lines file of generations") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read file ({exc.strerror or exc})") from None

    generated: list[str] = []
    references: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {_json_type(record)}")
        for key in ("generated", "reference"):
            if key not in record:
                raise UserError(f'{where}: record has no "{key}" field')
            if not isinstance(record[key], str):
                raise UserError(f'{where}: field "{key}" must be a string, got {_json_type(record[key])}')
        generated.append(record["generated"])
        references.append(record["reference"])

    if not generated:
        raise UserError(f"{path}: file contains no records")
    return generated, references


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --------------------------------------------------------------------------------------------- metrics


def compute_metrics(generated: list[str], references: list[str]) -> dict[str, float]:
    """Score ``generated[i]`` against ``references[i]``; see the module docstring for each metric."""
    if len(generated) != len(references):
        raise UserError(
            f"cannot score {len(generated)} generations against {len(references)} references: counts differ"
        )
    if not generated:
        raise UserError("nothing to score: no generations were given")

    hyp_tokens = [text.split() for text in generated]
    ref_tokens = [text.split() for text in references]
    rouge = _rouge(generated, references)
    return {
        "bleu": _corpus_bleu(generated, references),
        "sentence_bleu": mean_sentence_bleu(hyp_tokens, ref_tokens),
        "rouge1": rouge["rouge1"],
        "rouge2": rouge["rouge2"],
        "rougeL": rouge["rougeL"],
        "distinct1": _distinct(hyp_tokens, 1),
        "distinct2": _distinct(hyp_tokens, 2),
        "intra_distinct1": _intra_distinct(hyp_tokens, 1),
        "intra_distinct2": _intra_distinct(hyp_tokens, 2),
        "mean_len": _mean(len(tokens) for tokens in hyp_tokens),
        "mean_ref_len": _mean(len(tokens) for tokens in ref_tokens),
        "n": len(generated),
    }


def _corpus_bleu(generated: list[str], references: list[str]) -> float:
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(generated, [references]).score)


def mean_sentence_bleu(hyp_tokens: list[list[str]], ref_tokens: list[list[str]]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method4
    scores = []
    with warnings.catch_warnings():
        # nltk warns about zero n-gram overlaps on every such sentence; the score is still defined.
        warnings.simplefilter("ignore")
        for hyp, ref in zip(hyp_tokens, ref_tokens):
            if not hyp:
                scores.append(0.0)
                continue
            scores.append(float(sentence_bleu([ref], hyp, smoothing_function=smoothing)))
    return 100.0 * _mean(scores)


def _rouge(generated: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score.rouge_scorer import RougeScorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(kinds), use_stemmer=False)
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, ref in zip(generated, references):
        scores = scorer.score(ref, hyp)  # rouge_score takes (target, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(generated) for kind, total in totals.items()}


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _distinct(token_lists: list[list[str]], n: int) -> float:
    """Unique n-grams over total n-grams across the corpus; 0 when there are none."""
    all_ngrams = [gram for tokens in token_lists for gram in _ngrams(tokens, n)]
    return len(set(all_ngrams)) / len(all_ngrams) if all_ngrams else 0.0


def _intra_distinct(token_lists: list[list[str]], n: int) -> float:
    """Per-generation distinct-n, averaged over generations with at least one n-gram; 0 when none has any."""
    ratios = []
    for tokens in token_lists:
        grams = _ngrams(tokens, n)
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return _mean(ratios)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


# --------------------------------------------------------------------------------------------- output


def _format_value(name: str, value: object) -> str:
    if value is None:
        return "-"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if name == "n":
        return f"{int(value)}" if float(value).is_integer() else f"{value:.2f}"
    if name in _PERCENT_METRICS or name in _LENGTH_METRICS:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ordered_names(metric_dicts: Iterable[Mapping[str, object]]) -> list[str]:
    """Known metrics in canonical order, then any other keys in first-seen order."""
    seen: list[str] = []
    for metrics in metric_dicts:
        for name in metrics:
            if name not in seen:
                seen.append(name)
    known = [name for name in METRIC_ORDER if name in seen]
    return known + [name for name in seen if name not in METRIC_ORDER]


def format_table(metrics: Mapping[str, object]) -> str:
    """Two aligned columns, metric name and value: 2 decimals for 0-100 scores and lengths, 3 for 0-1 ones."""
    return format_comparison({"value": metrics})


def format_comparison(rows: Mapping[str, Mapping[str, object]]) -> str:
    """One column per named run (``{"untrained": m1, "trained": m2}``), one row per metric.

    A metric missing from a run is shown as ``-``.
    """
    runs = list(rows)
    names = _ordered_names(rows.values())
    header = ["metric", *runs]
    body = [[name, *(_format_value(name, rows[run].get(name)) for run in runs)] for name in names]
    widths = [max(len(row[col]) for row in [header, *body]) for col in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(row) for row in body)])


def evaluate_file(path: str | os.PathLike[str], out_json: str | os.PathLike[str] | None = None) -> dict:
    """Read a generations file, compute its metrics and, if ``out_json`` is given, save them there as JSON.

    The JSON file is written to a temporary file in the same directory and moved into place with
    :func:`os.replace`, so a reader never sees a half-written file.
    """
    generated, references = read_generations(path)
    metrics = compute_metrics(generated, references)
    if out_json is not None:
        _write_json_atomic(Path(out_json), metrics)
    return metrics


def _write_json_atomic(path: Path, data: Mapping[str, object]) -> None:
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UserError(f"{path}: cannot write metrics ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(dict(data), handle, indent=2)
            handle.write("\n")
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise UserError(f"{path}: cannot write metrics ({exc.strerror or exc})") from None
        raise
