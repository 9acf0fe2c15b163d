"""Reading the candidates to rank: rows as `alignkit label` takes them (SPEC §9, §14).

A row is ``{"prompt", "responses": [2 to 4 candidates]}``, optionally with ``"label"`` (the index of the truly
better response) and ``"scores"`` (e.g. an AI judge's, from `alignkit label`'s ranked output), both used only
to report agreement. A pairwise row (``prompt``, ``chosen``, ``rejected``: what `label --n 2` writes) is taken as
the two candidates with scores (1, 0), the judge's verdict. Prompts and responses are strings or chat messages, checked by the data layer; a bad
row raises a DataError naming file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.formats import InvalidRecord, read_records
from alignkit.data.rows import parse_row
from alignkit.errors import DataError, UserError

MIN_RESPONSES, MAX_RESPONSES = 2, 4  # what the page shows side by side


@dataclass(frozen=True)
class Candidate:
    prompt: object                # a string or a list of chat messages
    responses: list               # 2 to 4, in the file's order
    label: int | None             # index of the truly better response, if known
    scores: list[float] | None    # the file's own scores, aligned with responses
    source: str                   # file:line


def read_candidates(paths: list[str]) -> list[Candidate]:
    candidates = []
    for path in paths:
        for where, record in read_records(path):
            candidates.append(_candidate(where, record))
    if not candidates:
        raise UserError("no candidates to annotate")
    return candidates


def _candidate(where: str, record: object) -> Candidate:
    if isinstance(record, InvalidRecord):
        raise DataError(where, record.message)
    if isinstance(record, dict) and record.get("responses") is None and record.get("chosen") is not None:
        pair = parse_row(record, "pairwise", where)
        return Candidate(pair.prompt, [pair.chosen, pair.rejected], None, [1.0, 0.0], where)
    if isinstance(record, dict) and record.get("responses") is None:
        raise DataError(where, 'field "responses" is missing (2 to 4 candidate responses to rank; '
                               '`alignkit label --policy M --n N` can generate them)')
    scored = parse_row(record, "ranked", where)  # checks everything, scores included (and sorts by them)
    row = parse_row({**record, "scores": None}, "ranked", where)  # the file's order
    k = len(row.responses)
    if k > MAX_RESPONSES:
        raise DataError(where, f'field "responses" holds {k} responses; the page ranks {MIN_RESPONSES} to '
                               f"{MAX_RESPONSES}")
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k):
        raise DataError(where, f'field "label" must be the index of a response (0 to {k - 1}), got {label!r}')
    scores = None if scored.scores is None else [float(s) for s in record["scores"]]
    return Candidate(row.prompt, list(row.responses), label, scores, where)
