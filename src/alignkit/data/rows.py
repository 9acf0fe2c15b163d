"""Normalised data rows, and the checks that turn one raw record (a dict) into one of them.

Every problem raises a DataError that names the row and the field, e.g.
``prefs.jsonl:17: field "chosen" is missing``. No tokenization here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from alignkit.errors import DataError

Text = str | list[dict]  # a string, or a conversation: a list of {"role", "content"} messages

KINDS = ("sft", "pairwise", "ranked", "unary", "prompts")
ROLES = ("system", "user", "assistant", "tool")
HH_MARKER = "\n\nAssistant:"  # HH-RLHF transcripts: the prompt ends with this, the response follows


@dataclass(frozen=True)
class SFTRow:
    """``prompt`` + ``completion`` (loss on the completion); a ``text`` row is prompt "" + completion text;
    or ``messages`` (loss on assistant turns), with prompt and completion None."""

    prompt: Text | None
    completion: Text | None
    messages: list[dict] | None
    source: str


@dataclass(frozen=True)
class PairRow:
    """One prompt, a preferred and a dispreferred response; ``margin`` (finite) says by how much."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None
    source: str


@dataclass(frozen=True)
class RankedRow:
    """Responses best first; ``scores`` (higher is better, ties allowed) aligned with them, or None."""

    prompt: Text
    responses: list[Text]
    scores: list[float] | None
    source: str

    def tie_groups(self) -> list[int]:
        return tie_groups(self)


@dataclass(frozen=True)
class UnaryRow:
    """One response with a thumbs-up (``label`` True = desirable) or thumbs-down."""

    prompt: Text
    completion: Text
    label: bool
    source: str


@dataclass(frozen=True)
class PromptRow:
    """A prompt alone (for ppo, bon, label)."""

    prompt: Text
    source: str


Row = SFTRow | PairRow | RankedRow | UnaryRow | PromptRow


def tie_groups(row: RankedRow) -> list[int]:
    """Non-decreasing group ids over ``row.responses``: equal scores share an id; no scores gives 0, 1, 2, …"""
    if row.scores is None:
        return list(range(len(row.responses)))
    groups = [0]
    for previous, score in zip(row.scores, row.scores[1:]):
        groups.append(groups[-1] + (score != previous))
    return groups


def plain_text(text: Text | None) -> str:
    """The words of a Text, for counting and comparing: a conversation's contents joined by newlines."""
    if text is None:
        return ""
    if isinstance(text, str):
        return text
    return "\n".join(message["content"] for message in text)


# ---------------------------------------------------------------------------------------------- detection

# The first field present decides the kind (a unary row also has "completion", so "label" comes first).
_KIND_BY_FIELD = (
    ("responses", "ranked"),
    ("chosen", "pairwise"),
    ("rejected", "pairwise"),
    ("label", "unary"),
    ("messages", "sft"),
    ("completion", "sft"),
    ("text", "sft"),
    ("prompt", "prompts"),
)


def detect_kind(record: object, where: str) -> str:
    """The row kind a record's fields point to (a null field counts as absent)."""
    _check_object(record, where)
    for field, kind in _KIND_BY_FIELD:
        if record.get(field) is not None:
            return kind
    names = ", ".join(f'"{field}"' for field, _ in _KIND_BY_FIELD)
    raise DataError(where, f"cannot tell the row kind: none of the fields {names} is present")


def parse_row(record: object, kind: str, where: str) -> Row:
    """Validate one raw record as a row of ``kind`` and normalise it."""
    _check_object(record, where)
    return _PARSERS[kind](record, where)


# ------------------------------------------------------------------------------------------------ parsers


def _parse_sft(record: dict, where: str) -> SFTRow:
    if record.get("messages") is not None:
        messages = _messages(record["messages"], "messages", where)
        if not any(message["role"] == "assistant" for message in messages):
            raise _field_error(where, "messages", "has no assistant message")
        return SFTRow(None, None, messages, where)
    if record.get("completion") is None and record.get("text") is not None:
        text = record["text"]
        if not isinstance(text, str):
            raise _field_error(where, "text", f"must be a string, got {_type_name(text)}")
        return SFTRow("", _response(text, "text", where), None, where)
    completion = _text(_required(record, "completion", where), "completion", where)
    prompt = _text(_required(record, "prompt", where), "prompt", where)
    _same_shape(where, "prompt", prompt, "completion", completion)
    return SFTRow(prompt, _response(completion, "completion", where), None, where)


def _parse_pairwise(record: dict, where: str) -> PairRow:
    chosen = _text(_required(record, "chosen", where), "chosen", where)
    rejected = _text(_required(record, "rejected", where), "rejected", where)
    _same_shape(where, "chosen", chosen, "rejected", rejected)
    prompt = record.get("prompt")
    # No prompt, or a string prompt beside full conversations (as in UltraFeedback): the prompt is the
    # shared beginning of chosen and rejected.
    if prompt is None or (isinstance(prompt, str) and isinstance(chosen, list)):
        split = _split_conversations if isinstance(chosen, list) else _split_transcripts
        prompt, chosen, rejected = split(chosen, rejected)
    else:
        prompt = _text(prompt, "prompt", where)
        _same_shape(where, "prompt", prompt, "chosen", chosen)
    margin = record.get("margin")
    return PairRow(
        prompt=prompt,
        chosen=_response(chosen, "chosen", where),
        rejected=_response(rejected, "rejected", where),
        margin=None if margin is None else _number(margin, "margin", where),
        source=where,
    )


def _parse_ranked(record: dict, where: str) -> RankedRow:
    prompt = _text(_required(record, "prompt", where), "prompt", where)
    raw = _required(record, "responses", where)
    if not isinstance(raw, list):
        raise _field_error(where, "responses", f"must be a list of responses, got {_type_name(raw)}")
    if len(raw) < 2:
        raise _field_error(where, "responses", f"must hold at least 2 responses, got {len(raw)}")
    responses = []
    for i, value in enumerate(raw):
        field = f"responses[{i}]"
        response = _text(value, field, where)
        _same_shape(where, "prompt", prompt, field, response)
        responses.append(_response(response, field, where))
    scores = _scores(record.get("scores"), len(responses), where)
    if scores is not None:
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep their order
        responses = [responses[i] for i in order]
        scores = [scores[i] for i in order]
    return RankedRow(prompt, responses, scores, where)


def _parse_unary(record: dict, where: str) -> UnaryRow:
    prompt = _text(_required(record, "prompt", where), "prompt", where)
    completion = _text(_required(record, "completion", where), "completion", where)
    _same_shape(where, "prompt", prompt, "completion", completion)
    label = _required(record, "label", where)
    if not isinstance(label, bool):
        raise _field_error(where, "label", f"must be true or false, got {_show(label)}")
    return UnaryRow(prompt, _response(completion, "completion", where), label, where)


def _parse_prompt(record: dict, where: str) -> PromptRow:
    prompt = _text(_required(record, "prompt", where), "prompt", where)
    if not plain_text(prompt).strip():
        raise _field_error(where, "prompt", "is empty")
    return PromptRow(prompt, where)


_PARSERS = {
    "sft": _parse_sft,
    "pairwise": _parse_pairwise,
    "ranked": _parse_ranked,
    "unary": _parse_unary,
    "prompts": _parse_prompt,
}


# --------------------------------------------------------------------------------------- shared prompts


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF: cut both transcripts after the last "\\n\\nAssistant:" of their shared prefix (the
    responses keep the space after it); without one, at the shared prefix's last whitespace."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_MARKER)
    if cut >= 0:
        cut += len(HH_MARKER)
    else:
        cut = max((i for i, char in enumerate(common) if char.isspace()), default=0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """The prompt is the shared leading messages; each response keeps at least its last message."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


# --------------------------------------------------------------------------------------- field checks


def _check_object(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(where, f"row must be an object, got {_type_name(record)}")


def _required(record: dict, field: str, where: str) -> object:
    value = record.get(field)
    if value is None:
        raise _field_error(where, field, "is missing")
    return value


def _text(value: object, field: str, where: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, field, where)
    raise _field_error(where, field, f"must be a string or a list of messages, got {_type_name(value)}")


def _messages(value: object, field: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise _field_error(where, field, f"must be a list of messages, got {_type_name(value)}")
    return [_message(message, f"{field}[{i}]", where) for i, message in enumerate(value)]


def _message(message: object, field: str, where: str) -> dict:
    """A {"role", "content"} message, normalised to those two keys; assistant turns must say something."""
    if not isinstance(message, dict):
        raise _field_error(where, field, f"must be a message object, got {_type_name(message)}")
    role = message.get("role")
    if role is None:
        raise _field_error(where, f"{field}.role", "is missing")
    if role not in ROLES:
        raise _field_error(where, f"{field}.role", f"must be one of {', '.join(ROLES)}, got {_show(role)}")
    content = message.get("content")
    if content is None:
        raise _field_error(where, f"{field}.content", "is missing")
    if not isinstance(content, str):
        raise _field_error(where, f"{field}.content", f"must be a string, got {_type_name(content)}")
    if role == "assistant" and not content.strip():
        raise _field_error(where, f"{field}.content", "is empty")
    return {"role": role, "content": content}


def _response(text: Text, field: str, where: str) -> Text:
    """A response must say something: non-blank text, or messages holding an assistant turn."""
    if not plain_text(text).strip():
        raise _field_error(where, field, "is empty")
    if isinstance(text, list) and not any(message["role"] == "assistant" for message in text):
        raise _field_error(where, field, "has no assistant message")
    return text


def _same_shape(where: str, name: str, text: Text, other_name: str, other: Text) -> None:
    """Strings go with strings and conversations with conversations."""
    if isinstance(text, list) != isinstance(other, list):
        shape = "a list of messages" if isinstance(text, list) else "a string"
        raise _field_error(where, other_name, f'must be {shape} like "{name}"')


def _number(value: object, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(where, field, f"must be a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise _field_error(where, field, f"must be a finite number, got {_show(value)}")
    return float(value)


def _scores(value: object, count: int, where: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _field_error(where, "scores", f"must be a list of numbers, got {_type_name(value)}")
    if len(value) != count:
        raise _field_error(where, "scores", f"has {len(value)} scores for {count} responses")
    return [_number(score, f"scores[{i}]", where) for i, score in enumerate(value)]


def _field_error(where: str, field: str, message: str) -> DataError:
    return DataError(where, f'field "{field}" {message}')


def _type_name(value: object) -> str:
    """The JSON name of a value's type, as a user would see it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: object, limit: int = 40) -> str:
    """A value as it appears in JSON (``1``, ``"yes"``, ``NaN``), cut short if long."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
