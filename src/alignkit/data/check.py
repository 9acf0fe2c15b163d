"""`alignkit data check`: what a loaded dataset looks like before training on it (§4).

Lengths are counted in tokens when a ``count_tokens(text) -> int`` is given, else in characters; a
conversation counts as its contents joined by newlines (chat-template markup is not counted).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from alignkit.data.formats import LoadResult
from alignkit.data.rows import PairRow, PromptRow, RankedRow, Row, SFTRow, UnaryRow, plain_text

PERCENTILES = (50, 90, 99)


def check_rows(
    result: LoadResult, count_tokens: Callable[[str], int] | None = None, max_length: int | None = None
) -> dict:
    """A report (plain dict) on ``result``: row count and kind, per-field length percentiles, duplicate
    rows, ``chosen == rejected`` pairs (pairwise), empty fields, and, given ``count_tokens`` and
    ``max_length``, how many rows' prompt + longest response exceed ``max_length``."""
    measure = count_tokens or len
    fields = [_fields(row) for row in result.rows]
    lengths = [{name: [measure(text) for text in texts] for name, texts in row.items()} for row in fields]
    check_length = count_tokens is not None and max_length is not None
    pairwise = result.kind == "pairwise"
    return {
        "kind": result.kind,
        "rows": len(result.rows),
        "skipped": result.skipped,
        "unit": "characters" if count_tokens is None else "tokens",
        "lengths": _length_table(lengths),
        "duplicates": len(fields) - len({_content_key(row) for row in fields}),
        "chosen_equals_rejected": _count_chosen_equals_rejected(result.rows) if pairwise else None,
        "empty_fields": sum(_count_empty(row) for row in result.rows),
        "max_length": max_length,
        "too_long": sum(_total_length(row) > max_length for row in lengths) if check_length else None,
    }


def format_report(report: dict) -> str:
    """The report as a few aligned lines of text."""
    count = report["skipped"]
    skipped = f" ({count} bad row{'s' if count != 1 else ''} skipped)" if count else ""
    lines = [f"{report['rows']} {report['kind']} rows{skipped}", ""]
    header = f"length ({report['unit']})"
    names = [f"p{p}" for p in PERCENTILES] + ["max"]
    lines.append(f"{header:<22}" + "".join(f"{name:>8}" for name in names))
    for name, stats in report["lengths"].items():
        lines.append(f"  {name:<20}" + "".join(f"{value:>8}" for value in stats.values()))
    lines.append("")
    lines.append(f"duplicate rows:       {report['duplicates']}")
    if report["chosen_equals_rejected"] is not None:
        lines.append(f"chosen == rejected:   {report['chosen_equals_rejected']}")
    lines.append(f"empty fields:         {report['empty_fields']}")
    if report["too_long"] is not None:
        lines.append(f"over max_length:      {report['too_long']} (max_length {report['max_length']})")
    return "\n".join(lines)


def _fields(row: Row) -> dict[str, list[str]]:
    """The texts of a row by field name; a ranked row's responses all go under "responses"."""
    if isinstance(row, SFTRow) and row.messages is not None:
        return {"messages": [plain_text(row.messages)]}
    if isinstance(row, (SFTRow, UnaryRow)):
        return {"prompt": [plain_text(row.prompt)], "completion": [plain_text(row.completion)]}
    if isinstance(row, PairRow):
        return {name: [plain_text(getattr(row, name))] for name in ("prompt", "chosen", "rejected")}
    if isinstance(row, RankedRow):
        return {"prompt": [plain_text(row.prompt)], "responses": [plain_text(text) for text in row.responses]}
    if isinstance(row, PromptRow):
        return {"prompt": [plain_text(row.prompt)]}
    raise TypeError(f"not a row: {type(row).__name__}")


def _length_table(lengths: list[dict[str, list[int]]]) -> dict[str, dict[str, int]]:
    by_field: dict[str, list[int]] = {}
    for row in lengths:
        for name, values in row.items():
            by_field.setdefault(name, []).extend(values)
    return {name: _percentiles(values) for name, values in by_field.items()}


def _percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    table = {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES}
    return {**table, "max": ordered[-1]}


def _total_length(row: dict[str, list[int]]) -> int:
    """Prompt plus the longest response: what must fit in one sequence."""
    prompt = sum(row.get("prompt", []))
    responses = [value for name, values in row.items() if name != "prompt" for value in values]
    return prompt + max(responses, default=0)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _content_key(fields: dict[str, list[str]]) -> tuple:
    return tuple((name, tuple(_normalise(text) for text in texts)) for name, texts in sorted(fields.items()))


def _count_chosen_equals_rejected(rows: list[PairRow]) -> int:
    return sum(_normalise(plain_text(row.chosen)) == _normalise(plain_text(row.rejected)) for row in rows)


def _count_empty(row: Row) -> int:
    """Blank texts; an sft row's prompt is left out, as it is "" by design for ``text`` rows."""
    fields = _fields(row)
    if isinstance(row, SFTRow):
        fields.pop("prompt", None)
    return sum(not text.strip() for texts in fields.values() for text in texts)
