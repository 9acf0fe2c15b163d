"""Reading data files into validated rows.

Formats: JSON Lines (``.jsonl``), JSON (``.json``: a list of rows; a ``.json`` file that does not start
with ``[`` is read as JSON Lines, which is what ``Dataset.to_json`` writes), Parquet (``.parquet``) and a
folder written by ``datasets``' ``save_to_disk``. Each record carries ``where``, the ``file:line`` (JSON) or
``file:row`` (Parquet, datasets; 1-based) that error messages start with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.data.rows import KINDS, Row, detect_kind, parse_row
from alignkit.errors import DataError, UserError

MAX_SKIPPED_EXAMPLES = 5
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class InvalidRecord:
    """A line that could not be decoded (bad UTF-8 or JSON); the caller raises or skips it."""

    message: str


@dataclass(frozen=True)
class LoadResult:
    """The rows of one load, their kind, and how many bad rows ``on_bad_row="skip"`` left out."""

    rows: list[Row]
    kind: str
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # the first few error messages


def load_rows(paths: str | os.PathLike | list, kind: str, on_bad_row: str = "error") -> LoadResult:
    """Read and validate every row of ``paths``. ``kind`` is one of sft, pairwise, ranked, unary, prompts,
    or auto (each row's fields decide; all rows must agree). ``on_bad_row``: "error" raises on the first
    bad row, "skip" counts it and goes on; problems with a whole file are always raised."""
    _check_choice("kind", kind, (*KINDS, "auto"))
    _check_choice("on_bad_row", on_bad_row, ("error", "skip"))
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise UserError("no data files given")

    rows, problems = [], []
    loaded_kind, first_where = (None, None) if kind == "auto" else (kind, None)
    for path in paths:
        for where, record in read_records(path):
            try:
                # auto: the first good row fixes the kind; later rows are checked as that kind
                row_kind, row = _parse(record, loaded_kind or "auto", where, first_where)
            except DataError as error:
                if on_bad_row == "error":
                    raise
                problems.append(str(error))
                continue
            if loaded_kind is None:
                loaded_kind, first_where = row_kind, where
            rows.append(row)

    if not rows:
        raise DataError(", ".join(map(str, paths)), f"no usable rows: all {len(problems)} rows are bad")
    return LoadResult(rows, loaded_kind, len(problems), problems[:MAX_SKIPPED_EXAMPLES])


def _parse(record: object, kind: str, where: str, first_where: str | None = None) -> tuple[str, Row]:
    if isinstance(record, InvalidRecord):
        raise DataError(where, record.message)
    row_kind = detect_kind(record, where) if kind == "auto" else kind
    try:
        return row_kind, parse_row(record, row_kind, where)
    except DataError as error:
        looks = _looks_like(record)
        if first_where is not None and looks not in (None, row_kind):
            raise DataError(where, f"{error.detail} (rows from {first_where} on are {row_kind}; "
                                   f"this one looks {looks})") from None
        raise


def _looks_like(record: object) -> str | None:
    try:
        return detect_kind(record, "")
    except DataError:
        return None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# ------------------------------------------------------------------------------------------------ files


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)`` for every record of one file or ``save_to_disk`` folder. A JSON Lines
    line that cannot be decoded is yielded as an InvalidRecord; a file-level problem raises DataError."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(path, "no such file")
    count = 0
    for where, record in _reader_for(path)(path):
        count += 1
        yield where, record
    if count == 0:
        raise DataError(f"{path}:1", "the file is empty")


def _reader_for(path: str):
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, name)) for name in _DATASET_MARKERS):
            raise DataError(path, "is a folder, but not one written by datasets' save_to_disk")
        return _read_saved_dataset
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    extension = os.path.splitext(path)[1].lower()
    if extension not in readers:
        raise DataError(
            path, f'unsupported file type "{extension}"; use .jsonl, .json, .parquet or a save_to_disk folder'
        )
    return readers[extension]


def _read_jsonl(path: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if raw.strip():
                yield f"{path}:{number}", _decode_line(raw)


def _decode_line(raw: bytes) -> object:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return InvalidRecord(f"invalid UTF-8 at byte {error.start + 1} of the line")
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return InvalidRecord(f"invalid JSON: {error.msg} (column {error.colno})")


def _read_json(path: str) -> Iterator[tuple[str, object]]:
    """A list of rows, each given the line where it starts. The whole file must parse."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}", "invalid UTF-8; the JSON file cannot be read") from None
    start = _skip_space(text, 0)
    if start == len(text):
        return
    if text[start] != "[":
        yield from _read_jsonl(path)
        return
    yield from _json_list_items(path, text, start)


def _json_list_items(path: str, text: str, start: int) -> Iterator[tuple[str, object]]:
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0  # the line number at position counted_to, advanced as we go
    pos = _skip_space(text, start + 1)
    if text.startswith("]", pos):
        _expect_end(path, text, pos + 1)
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            message = f"invalid JSON: {error.msg} (column {error.colno})"
            raise DataError(f"{path}:{error.lineno}", message) from None
        line, counted_to = line + text.count("\n", counted_to, pos), pos
        yield f"{path}:{line}", record
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            _expect_end(path, text, pos + 1)
            return
        else:
            raise _json_error(path, text, pos, "expected ',' or ']' after a row")


def _expect_end(path: str, text: str, pos: int) -> None:
    pos = _skip_space(text, pos)
    if pos != len(text):
        raise _json_error(path, text, pos, "extra data after the list")


def _json_error(path: str, text: str, pos: int, message: str) -> DataError:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return DataError(f"{path}:{line}", f"invalid JSON: {message} (column {column})")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(path, f"cannot read the Parquet file: {error}") from None
    number = 0
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            number += 1
            yield f"{path}:{number}", record


def _read_saved_dataset(path: str) -> Iterator[tuple[str, object]]:
    import datasets

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = _pick_split(path, dataset)
    for number, record in enumerate(dataset, 1):
        yield f"{path}:{number}", record


def _pick_split(path: str, splits) -> object:
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    names = ", ".join(splits)
    raise DataError(path, f'has splits {names}; expected a "train" split or a single split')
