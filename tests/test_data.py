"""The data layer: formats, row kinds and shapes, validation messages, conversions, data check."""

import json

import pytest

from alignkit.data.check import check_rows, format_report
from alignkit.data.convert import (
    comparisons_as,
    pairwise_to_ranked,
    pairwise_to_unary,
    ranked_to_pairwise,
    ranked_to_unary,
)
from alignkit.data.formats import LoadResult, load_rows, read_records
from alignkit.data.rows import PairRow, PromptRow, RankedRow, SFTRow, UnaryRow, tie_groups
from alignkit.errors import DataError, UserError

GOOD = {
    "sft": {"prompt": "Hi", "completion": "Hello!"},
    "pairwise": {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    "ranked": {"prompt": "Hi", "responses": ["Hello!", "Hey.", "Go away."]},
    "unary": {"prompt": "Hi", "completion": "Hello!", "label": True},
    "prompts": {"prompt": "Hi"},
}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def load_one(tmp_path, record, kind="auto"):
    """Load a file holding one record; return the row."""
    result = load_rows(str(write_jsonl(tmp_path / "data.jsonl", [record])), kind)
    assert len(result.rows) == 1
    return result.rows[0]


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD["pairwise"]) + "\n\n   \n" + json.dumps(GOOD["pairwise"]) + "\n")
    result = load_rows(str(path), "pairwise")
    assert [row.source for row in result.rows] == [f"{path}:1", f"{path}:4"]
    assert result.kind == "pairwise" and result.skipped == 0


def test_json_list_gives_each_row_the_line_where_it_starts(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(
        '[\n  {"prompt": "a",\n   "completion": "b"},\n\n  {"prompt": "c", "completion": "d"}, {"text": "e"}\n]\n'
    )
    result = load_rows(str(path), "sft")
    assert [row.source for row in result.rows] == [f"{path}:2", f"{path}:5", f"{path}:5"]
    assert result.rows[2] == SFTRow("", "e", None, f"{path}:5")


def test_json_list_error_names_the_line_of_the_bad_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c"}\n]')
    with pytest.raises(DataError) as error:
        load_rows(str(path), "sft")
    assert str(error.value) == f'{path}:3: field "completion" is missing'


def test_json_list_syntax_error_is_a_file_error_even_when_skipping(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"}\n  {"prompt": "c", "completion": "d"}\n]')
    with pytest.raises(DataError) as error:
        load_rows(str(path), "sft", on_bad_row="skip")
    assert str(error.value) == f"{path}:3: invalid JSON: expected ',' or ']' after a row (column 3)"


def test_json_list_with_extra_data_after_it(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"prompt": "a"}]\n{}')
    with pytest.raises(DataError, match=r"rows\.json:2: invalid JSON: extra data after the list"):
        load_rows(str(path), "prompts")


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    """`Dataset.to_json` writes JSON Lines into a .json file."""
    path = write_jsonl(tmp_path / "rows.json", [GOOD["prompts"], GOOD["prompts"]])
    result = load_rows(str(path), "prompts")
    assert [row.source for row in result.rows] == [f"{path}:1", f"{path}:2"]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "prefs.parquet"
    table = pyarrow.Table.from_pylist([GOOD["pairwise"], {**GOOD["pairwise"], "chosen": ""}])
    pyarrow.parquet.write_table(table, path)
    with pytest.raises(DataError) as error:
        load_rows(str(path), "pairwise")
    assert str(error.value) == f'{path}:2: field "chosen" is empty'
    result = load_rows(str(path), "pairwise", on_bad_row="skip")
    assert [row.source for row in result.rows] == [f"{path}:1"] and result.skipped == 1


def test_parquet_with_conversations(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "chat.parquet"
    record = {"messages": [user("Hi"), assistant("Hello!")]}
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([record]), path)
    assert load_rows(str(path), "auto").rows == [SFTRow(None, None, record["messages"], f"{path}:1")]


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read the Parquet file"):
        load_rows(str(path), "auto")


def test_save_to_disk_dataset(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([GOOD["unary"], {**GOOD["unary"], "label": False}]).save_to_disk(str(folder))
    result = load_rows(str(folder), "auto")
    assert result.kind == "unary"
    assert result.rows == [
        UnaryRow("Hi", "Hello!", True, f"{folder}:1"),
        UnaryRow("Hi", "Hello!", False, f"{folder}:2"),
    ]


def test_save_to_disk_dataset_dict_uses_train_or_the_only_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([GOOD["prompts"]] * 3)
    test = datasets.Dataset.from_list([GOOD["prompts"]])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "only"))
    datasets.DatasetDict({"a": test, "b": test}).save_to_disk(str(tmp_path / "neither"))
    assert len(load_rows(str(tmp_path / "both"), "prompts").rows) == 3
    assert len(load_rows(str(tmp_path / "only"), "prompts").rows) == 1
    with pytest.raises(DataError, match='neither: has splits a, b; expected a "train" split'):
        load_rows(str(tmp_path / "neither"), "prompts")


def test_a_plain_folder_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="is a folder, but not one written by datasets' save_to_disk"):
        load_rows(str(tmp_path), "auto")


def test_several_files_at_once(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [GOOD["pairwise"]])
    second = tmp_path / "b.json"
    second.write_text(json.dumps([GOOD["pairwise"], GOOD["pairwise"]]))
    result = load_rows([first, str(second)], "auto")
    assert [row.source for row in result.rows] == [f"{first}:1", f"{second}:1", f"{second}:1"]


def test_read_records_yields_where_and_object(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, [2]])
    assert list(read_records(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:2", [2])]


# --------------------------------------------------------------------------------------- sft shapes


def test_sft_prompt_completion(tmp_path):
    row = load_one(tmp_path, {"prompt": "Hi", "completion": "Hello!", "extra": 1}, "sft")
    assert (row.prompt, row.completion, row.messages) == ("Hi", "Hello!", None)


def test_sft_text(tmp_path):
    row = load_one(tmp_path, {"text": "Once upon a time"})
    assert (row.prompt, row.completion, row.messages) == ("", "Once upon a time", None)


def test_sft_messages_are_normalised_to_role_and_content(tmp_path):
    messages = [{"role": "system", "content": "Be kind.", "name": "x"}, user("Hi"), assistant("Hello!")]
    row = load_one(tmp_path, {"messages": messages})
    assert isinstance(row, SFTRow) and row.prompt is None and row.completion is None
    assert row.messages == [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello!")]


def test_sft_conversational_prompt_completion(tmp_path):
    row = load_one(tmp_path, {"prompt": [user("Hi")], "completion": [assistant("Hello!")]}, "sft")
    assert row.prompt == [user("Hi")] and row.completion == [assistant("Hello!")]


# ---------------------------------------------------------------------------------- pairwise shapes


def test_pairwise_strings_with_margin(tmp_path):
    row = load_one(tmp_path, {**GOOD["pairwise"], "margin": 2})
    assert row == PairRow("Hi", "Hello!", "Go away.", 2.0, f"{tmp_path / 'data.jsonl'}:1")
    assert isinstance(row.margin, float)


def test_pairwise_conversational_with_prompt(tmp_path):
    record = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("No.")]}
    row = load_one(tmp_path, record)
    assert (row.prompt, row.chosen, row.rejected, row.margin) == (
        [user("Hi")],
        [assistant("Hello!")],
        [assistant("No.")],
        None,
    )


def test_pairwise_conversations_without_prompt_share_their_prefix(tmp_path):
    history = [user("Hi"), assistant("Hello!"), user("Tell me a joke")]
    record = {"chosen": [*history, assistant("A pun.")], "rejected": [*history, assistant("No.")]}
    row = load_one(tmp_path, record, "pairwise")
    assert row.prompt == history
    assert row.chosen == [assistant("A pun.")] and row.rejected == [assistant("No.")]


def test_pairwise_string_prompt_beside_full_conversations_uses_the_shared_prefix(tmp_path):
    """UltraFeedback-binarized style: "prompt" is a string, chosen/rejected repeat it as a user turn."""
    record = {
        "prompt": "Hi",
        "chosen": [user("Hi"), assistant("Hello!")],
        "rejected": [user("Hi"), assistant("No.")],
    }
    row = load_one(tmp_path, record)
    assert (row.prompt, row.chosen, row.rejected) == ([user("Hi")], [assistant("Hello!")], [assistant("No.")])


def test_pairwise_identical_conversations_keep_the_last_message_as_response(tmp_path):
    conversation = [user("Hi"), assistant("Hello!")]
    row = load_one(tmp_path, {"chosen": conversation, "rejected": conversation})
    assert (row.prompt, row.chosen, row.rejected) == (
        [user("Hi")],
        [assistant("Hello!")],
        [assistant("Hello!")],
    )


def test_hh_rlhf_transcripts_split_after_the_last_shared_assistant_marker(tmp_path):
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    record = {"chosen": prompt + " A pun about cats.", "rejected": prompt + " A punch."}
    row = load_one(tmp_path, record)
    assert row.prompt == prompt
    assert (row.chosen, row.rejected) == (" A pun about cats.", " A punch.")


def test_hh_rlhf_identical_transcripts(tmp_path):
    text = "\n\nHuman: Hi\n\nAssistant: Hello!"
    row = load_one(tmp_path, {"chosen": text, "rejected": text})
    assert (row.prompt, row.chosen, row.rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Hello!")


def test_transcripts_without_marker_split_at_the_last_shared_whitespace(tmp_path):
    row = load_one(tmp_path, {"chosen": "I like cats a lot", "rejected": "I like catsup"})
    assert (row.prompt, row.chosen, row.rejected) == ("I like", " cats a lot", " catsup")


def test_transcripts_without_shared_whitespace_have_an_empty_prompt(tmp_path):
    row = load_one(tmp_path, {"chosen": "Yes", "rejected": "No"})
    assert (row.prompt, row.chosen, row.rejected) == ("", "Yes", "No")


# ----------------------------------------------------------------------------------- ranked shapes


def test_ranked_without_scores_is_best_first_with_no_ties(tmp_path):
    row = load_one(tmp_path, GOOD["ranked"])
    assert row.responses == ["Hello!", "Hey.", "Go away."] and row.scores is None
    assert tie_groups(row) == [0, 1, 2] == row.tie_groups()


def test_ranked_scores_sort_best_first_stably_and_keep_ties(tmp_path):
    record = {"prompt": "Hi", "responses": ["a", "b", "c", "d", "e"], "scores": [1, 3, 2, 3, 1.0]}
    row = load_one(tmp_path, record, "ranked")
    assert row.responses == ["b", "d", "c", "a", "e"]
    assert row.scores == [3.0, 3.0, 2.0, 1.0, 1.0]
    assert tie_groups(row) == [0, 0, 1, 2, 2]


def test_ranked_conversational(tmp_path):
    record = {"prompt": [user("Hi")], "responses": [[assistant("Hello!")], [assistant("No.")]]}
    row = load_one(tmp_path, record)
    assert isinstance(row, RankedRow) and row.responses[1] == [assistant("No.")]


def test_unary_and_prompts(tmp_path):
    assert isinstance(load_one(tmp_path, GOOD["unary"]), UnaryRow)
    assert load_one(tmp_path, {"prompt": [user("Hi")]}) == PromptRow(
        [user("Hi")], f"{tmp_path / 'data.jsonl'}:1"
    )


@pytest.mark.parametrize("kind", list(GOOD))
def test_auto_detects_every_kind(tmp_path, kind):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[kind], GOOD[kind]])
    assert load_rows(str(path), "auto").kind == kind


def test_auto_cannot_tell_the_kind_of_an_unknown_first_row(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "Hi"}])
    with pytest.raises(DataError) as error:
        load_rows(str(path), "auto")
    assert str(error.value) == (
        f'{path}:1: cannot tell the row kind: none of the fields "responses", "chosen", '
        '"rejected", "label", "messages", "completion", "text", "prompt" is present'
    )


def test_auto_checks_later_rows_as_the_first_rows_kind(tmp_path):
    """The first good row fixes the kind; a later row of another kind is a bad row of that kind."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD["pairwise"], GOOD["unary"], GOOD["pairwise"]])
    with pytest.raises(DataError) as error:
        load_rows(str(path), "auto")
    assert str(error.value).startswith(f'{path}:2: field "chosen" is missing')
    assert f"(rows from {path}:1 on are pairwise; this one looks unary)" in str(error.value)
    result = load_rows(str(path), "auto", on_bad_row="skip")
    assert result.kind == "pairwise" and len(result.rows) == 2 and result.skipped == 1


def test_explicit_kind_reads_rows_with_extra_fields(tmp_path):
    """A pairwise file read as prompts keeps only the prompts."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD["pairwise"]])
    assert load_rows(str(path), "prompts").rows == [PromptRow("Hi", f"{path}:1")]


def test_unknown_kind_or_on_bad_row_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD["sft"]])
    with pytest.raises(UserError, match="kind must be one of"):
        load_rows(str(path), "preference")
    with pytest.raises(UserError, match="on_bad_row must be one of"):
        load_rows(str(path), "sft", on_bad_row="ignore")


# ------------------------------------------------------------------------------------------ row errors

ROW_ERRORS = [
    # (kind, the raw second line of the file, the message after "file:2: ")
    ("pairwise", '{"prompt": "Hi", "chosen": }', "invalid JSON: Expecting value (column 28)"),
    ("pairwise", '{"prompt": "Hi", "rejected": "No."}', 'field "chosen" is missing'),
    ("pairwise", '{"prompt": "Hi", "chosen": null, "rejected": "No."}', 'field "chosen" is missing'),
    ("sft", '{"prompt": "Hi"}', 'field "completion" is missing'),
    ("ranked", '{"responses": ["a", "b"]}', 'field "prompt" is missing'),
    ("unary", '{"prompt": "Hi", "completion": "Yo"}', 'field "label" is missing'),
    (
        "pairwise",
        '{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": "big"}',
        'field "margin" must be a number, got string',
    ),
    (
        "pairwise",
        '{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": true}',
        'field "margin" must be a number, got boolean',
    ),
    (
        "pairwise",
        '{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": NaN}',
        'field "margin" must be a finite number, got NaN',
    ),
    (
        "pairwise",
        '{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": -Infinity}',
        'field "margin" must be a finite number, got -Infinity',
    ),
    (
        "pairwise",
        '{"prompt": 3, "chosen": "a", "rejected": "b"}',
        'field "prompt" must be a string or a list of messages, got number',
    ),
    ("pairwise", '{"prompt": "Hi", "chosen": "", "rejected": "b"}', 'field "chosen" is empty'),
    ("pairwise", '{"prompt": "Hi", "chosen": "a", "rejected": " \\n "}', 'field "rejected" is empty'),
    (
        "pairwise",
        json.dumps({"prompt": [user("Hi")], "chosen": [assistant("  ")], "rejected": [assistant("No")]}),
        'field "chosen[0].content" is empty',
    ),
    (
        "pairwise",
        json.dumps({"prompt": [user("Hi")], "chosen": [], "rejected": [assistant("No")]}),
        'field "chosen" is empty',
    ),
    (
        "pairwise",
        '{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Yes", "rejected": "No"}',
        'field "chosen" must be a list of messages like "prompt"',
    ),
    (
        "pairwise",
        '{"chosen": "Yes", "rejected": [{"role": "assistant", "content": "No"}]}',
        'field "rejected" must be a string like "chosen"',
    ),
    (
        "pairwise",
        '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant:", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: No"}',
        'field "chosen" is empty',
    ),
    ("sft", '{"prompt": "Hi", "completion": ""}', 'field "completion" is empty'),
    ("sft", '{"text": "   "}', 'field "text" is empty'),
    ("sft", '{"text": ["a"]}', 'field "text" must be a string, got list'),
    ("ranked", '{"prompt": "Hi", "responses": ["a", ""]}', 'field "responses[1]" is empty'),
    (
        "ranked",
        '{"prompt": "Hi", "responses": ["a"]}',
        'field "responses" must hold at least 2 responses, got 1',
    ),
    (
        "ranked",
        '{"prompt": "Hi", "responses": "a"}',
        'field "responses" must be a list of responses, got string',
    ),
    (
        "ranked",
        '{"prompt": "Hi", "responses": ["a", "b"], "scores": [1]}',
        'field "scores" has 1 scores for 2 responses',
    ),
    (
        "ranked",
        '{"prompt": "Hi", "responses": ["a", "b"], "scores": [1, NaN]}',
        'field "scores[1]" must be a finite number, got NaN',
    ),
    (
        "ranked",
        '{"prompt": "Hi", "responses": ["a", "b"], "scores": [1, "2"]}',
        'field "scores[1]" must be a number, got string',
    ),
    (
        "unary",
        '{"prompt": "Hi", "completion": "Yo", "label": 1}',
        'field "label" must be true or false, got 1',
    ),
    (
        "unary",
        '{"prompt": "Hi", "completion": "Yo", "label": 0}',
        'field "label" must be true or false, got 0',
    ),
    (
        "unary",
        '{"prompt": "Hi", "completion": "Yo", "label": "true"}',
        'field "label" must be true or false, got "true"',
    ),
    ("prompts", '{"prompt": "  "}', 'field "prompt" is empty'),
    ("sft", "[1, 2]", "row must be an object, got list"),
    ("auto", '"just a string"', "row must be an object, got string"),
    ("auto", '{"question": "Hi"}', 'field "chosen" is missing'),  # checked as the first row's kind
    (
        "sft",
        '{"messages": [{"role": "bot", "content": "Hi"}]}',
        'field "messages[0].role" must be one of system, user, assistant, tool, got "bot"',
    ),
    ("sft", '{"messages": [{"content": "Hi"}]}', 'field "messages[0].role" is missing'),
    (
        "sft",
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}',
        'field "messages[1].content" is missing',
    ),
    (
        "sft",
        '{"messages": [{"role": "user", "content": ["Hi"]}]}',
        'field "messages[0].content" must be a string, got list',
    ),
    ("sft", '{"messages": ["Hi"]}', 'field "messages[0]" must be a message object, got string'),
    (
        "sft",
        '{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]}',
        'field "messages" has no assistant message',
    ),
    ("sft", '{"messages": "Hi"}', 'field "messages" must be a list of messages, got string'),
]


@pytest.mark.parametrize(("kind", "line", "message"), ROW_ERRORS)
def test_row_errors_name_file_line_and_field(tmp_path, kind, line, message):
    path = tmp_path / "prefs.jsonl"
    good = GOOD["pairwise" if kind == "auto" else kind]
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError) as error:
        load_rows(str(path), kind)
    assert str(error.value) == f"{path}:2: {message}"


@pytest.mark.parametrize(("kind", "line", "message"), ROW_ERRORS)
def test_row_errors_are_counted_when_skipping(tmp_path, kind, line, message):
    path = tmp_path / "prefs.jsonl"
    good = GOOD["pairwise" if kind == "auto" else kind]
    path.write_text(json.dumps(good) + "\n" + line + "\n" + json.dumps(good) + "\n")
    result = load_rows(str(path), kind, on_bad_row="skip")
    assert [row.source for row in result.rows] == [f"{path}:1", f"{path}:3"]
    assert (result.skipped, result.skipped_examples) == (1, [f"{path}:2: {message}"])


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(json.dumps(GOOD["prompts"]).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as error:
        load_rows(str(path), "prompts")
    assert str(error.value) == f"{path}:2: invalid UTF-8 at byte 16 of the line"
    assert load_rows(str(path), "prompts", on_bad_row="skip").skipped == 1


def test_invalid_utf8_in_a_json_list_is_a_file_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataError) as error:
        load_rows(str(path), "prompts", on_bad_row="skip")
    assert str(error.value) == f"{path}:3: invalid UTF-8; the JSON file cannot be read"


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD["prompts"]).encode())
    assert len(load_rows(str(path), "prompts").rows) == 1


@pytest.mark.parametrize(
    ("name", "content"), [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", " "), ("e.json", "[]")]
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_rows(str(path), "auto", on_bad_row="skip")
    assert str(error.value) == f"{path}:1: the file is empty"


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(DataError) as error:
        load_rows(str(tmp_path / "nope.jsonl"), "auto", on_bad_row="skip")
    assert str(error.value) == f"{tmp_path / 'nope.jsonl'}: no such file"
    path = tmp_path / "data.csv"
    path.write_text("prompt\nHi\n")
    with pytest.raises(DataError) as error:
        load_rows(str(path), "auto")
    assert str(error.value).startswith(f'{path}: unsupported file type ".csv"')


def test_skip_counts_bad_rows_and_keeps_the_first_messages(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(GOOD["pairwise"])] + ['{"prompt": "x"}'] * 7 + ["not json"]
    path.write_text("\n".join(lines))
    result = load_rows(str(path), "pairwise", on_bad_row="skip")
    assert len(result.rows) == 1 and result.skipped == 8
    assert result.skipped_examples == [f'{path}:{n}: field "chosen" is missing' for n in range(2, 7)]


def test_skipping_every_row_is_an_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(DataError) as error:
        load_rows(str(path), "pairwise", on_bad_row="skip")
    assert str(error.value) == f"{path}: no usable rows: all 2 rows are bad"


# ------------------------------------------------------------------------------------------- conversions


def ranked(scores, source="r.jsonl:1"):
    responses = [f"r{i}" for i in range(len(scores))]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return RankedRow("Hi", [responses[i] for i in order], [float(scores[i]) for i in order], source)


def test_ranked_to_pairwise_modes_skip_ties():
    row = ranked([3, 1, 3, 2])  # best first: r0, r2 (tied at 3), r3, r1
    assert row.responses == ["r0", "r2", "r3", "r1"] and tie_groups(row) == [0, 0, 1, 2]

    def pairs(mode):
        return [(pair.chosen, pair.rejected) for pair in ranked_to_pairwise([row], mode)]

    assert pairs("all") == [("r0", "r3"), ("r0", "r1"), ("r2", "r3"), ("r2", "r1"), ("r3", "r1")]
    assert pairs("adjacent") == [("r0", "r3"), ("r2", "r3"), ("r3", "r1")]
    assert pairs("best_worst") == [("r0", "r1")]
    pair = ranked_to_pairwise([row], "best_worst")[0]
    assert (pair.prompt, pair.margin, pair.source) == ("Hi", None, "r.jsonl:1")


def test_ranked_to_pairwise_without_scores_and_all_tied():
    row = RankedRow("Hi", ["a", "b", "c"], None, "s:1")
    assert len(ranked_to_pairwise([row])) == 3
    assert [(p.chosen, p.rejected) for p in ranked_to_pairwise([row], "adjacent")] == [("a", "b"), ("b", "c")]
    assert ranked_to_pairwise([ranked([2, 2, 2])], "all") == []
    assert ranked_to_pairwise([ranked([2, 2])], "best_worst") == []
    with pytest.raises(UserError, match="mode must be one of"):
        ranked_to_pairwise([row], "random")


def test_pairwise_to_ranked_and_comparisons_as_either_kind():
    """A pair is a ranking of two (best first, no scores, the margin dropped); a ranking becomes every pair it
    orders. Either way round the ordered pairs are the same, and rows already of the kind pass through."""
    pair = PairRow("Hi", "Hello!", "Go away.", 2.0, "p:3")
    chat = PairRow([user("Hi")], [assistant("Hello!")], [assistant("No.")], None, "p:4")
    assert pairwise_to_ranked([pair, chat]) == [
        RankedRow("Hi", ["Hello!", "Go away."], None, "p:3"),
        RankedRow([user("Hi")], [[assistant("Hello!")], [assistant("No.")]], None, "p:4"),
    ]
    row = ranked([3, 1, 3, 2], "r:9")  # best first: r0, r2 (tied), r3, r1
    assert comparisons_as([pair, row], "ranked") == [RankedRow("Hi", ["Hello!", "Go away."], None, "p:3"), row]
    as_pairs = comparisons_as([row, pair], "pairwise")
    assert as_pairs == ranked_to_pairwise([row], "all") + [pair]
    assert [(p.chosen, p.rejected) for p in as_pairs[:5]] == [("r0", "r3"), ("r0", "r1"), ("r2", "r3"),
                                                               ("r2", "r1"), ("r3", "r1")]
    assert comparisons_as(comparisons_as([pair], "ranked"), "pairwise") == [PairRow("Hi", "Hello!", "Go away.", None,
                                                                                    "p:3")]
    with pytest.raises(TypeError, match="u:1: not a comparison row"):
        comparisons_as([UnaryRow("Hi", "Yo", True, "u:1")], "pairwise")


def test_pairwise_to_unary():
    rows = [PairRow("Hi", "Hello!", "Go away.", 1.0, "p:3")]
    assert pairwise_to_unary(rows) == [
        UnaryRow("Hi", "Hello!", True, "p:3"),
        UnaryRow("Hi", "Go away.", False, "p:3"),
    ]


def test_ranked_to_unary_skips_rows_whose_best_and_worst_tie():
    rows = [ranked([1, 3, 2], "r:1"), ranked([5, 5], "r:2"), RankedRow("Q", ["a", "b"], None, "r:3")]
    assert ranked_to_unary(rows) == [
        UnaryRow("Hi", "r1", True, "r:1"),
        UnaryRow("Hi", "r0", False, "r:1"),
        UnaryRow("Q", "a", True, "r:3"),
        UnaryRow("Q", "b", False, "r:3"),
    ]


def test_pairwise_to_unary_from_a_file_of_every_pair_shape(tmp_path):
    """Strings with a margin, a conversation with a prompt, full conversations, an HH-RLHF transcript: each
    pair gives (chosen, desirable) then (rejected, undesirable) with the pair's own prompt and source line; the
    margin has no place in a unary row."""
    hh = "\n\nHuman: Hi\n\nAssistant:"
    records = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 2.0},
        {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("No.")]},
        {"chosen": [user("Yo"), assistant("Hey!")], "rejected": [user("Yo"), assistant("Bye.")]},
        {"chosen": hh + " Hello!", "rejected": hh + " Go away."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    unary = pairwise_to_unary(load_rows(str(path), "auto").rows)
    assert unary == [
        UnaryRow("Hi", "Hello!", True, f"{path}:1"), UnaryRow("Hi", "Go away.", False, f"{path}:1"),
        UnaryRow([user("Hi")], [assistant("Hello!")], True, f"{path}:2"),
        UnaryRow([user("Hi")], [assistant("No.")], False, f"{path}:2"),
        UnaryRow([user("Yo")], [assistant("Hey!")], True, f"{path}:3"),
        UnaryRow([user("Yo")], [assistant("Bye.")], False, f"{path}:3"),
        UnaryRow(hh, " Hello!", True, f"{path}:4"), UnaryRow(hh, " Go away.", False, f"{path}:4"),
    ]
    assert pairwise_to_unary([]) == []


def test_ranked_to_unary_from_scores_with_ties_at_both_ends(tmp_path):
    """Scores sort best first (stable, ties keep their order): the first of the best tie group is desirable,
    the last of the worst undesirable, nothing in between is used; an all-tied row gives nothing; a row
    without scores is ordered as written."""
    records = [
        {"prompt": "Q1", "responses": ["a", "b", "c", "d", "e"], "scores": [1, 3, 3, 0, 0]},  # b c a d e
        {"prompt": "Q2", "responses": ["x", "y"], "scores": [2, 2]},
        {"prompt": [user("Q3")], "responses": [[assistant("best")], [assistant("mid")], [assistant("worst")]]},
    ]
    path = write_jsonl(tmp_path / "ranked.jsonl", records)
    assert ranked_to_unary(load_rows(str(path), "auto").rows) == [
        UnaryRow("Q1", "b", True, f"{path}:1"),
        UnaryRow("Q1", "e", False, f"{path}:1"),
        UnaryRow([user("Q3")], [assistant("best")], True, f"{path}:3"),
        UnaryRow([user("Q3")], [assistant("worst")], False, f"{path}:3"),
    ]


# -------------------------------------------------------------------------------------------- data check


def pairwise_result():
    rows = [
        PairRow("ab", "xyz", "x", None, "f:1"),
        PairRow("ab", "xyz", " x ", None, "f:2"),  # a duplicate of row 1 once whitespace is normalised
        PairRow("", "same", "same ", None, "f:3"),  # chosen == rejected, empty prompt
        PairRow("abcdefghij", "x", "yy", None, "f:4"),
    ]
    return LoadResult(rows, "pairwise")


def test_check_counts_characters_by_default():
    report = check_rows(pairwise_result())
    assert (report["rows"], report["kind"], report["unit"]) == (4, "pairwise", "characters")
    # prompt lengths sorted [0, 2, 2, 10]: nearest rank p50 = 2nd, p90 = p99 = 4th value
    assert report["lengths"]["prompt"] == {"p50": 2, "p90": 10, "p99": 10, "max": 10}
    assert report["lengths"]["chosen"] == {"p50": 3, "p90": 4, "p99": 4, "max": 4}
    assert report["lengths"]["rejected"] == {"p50": 2, "p90": 5, "p99": 5, "max": 5}
    assert (report["duplicates"], report["chosen_equals_rejected"], report["empty_fields"]) == (1, 1, 1)
    assert report["too_long"] is None


def test_check_counts_tokens_and_rows_over_max_length():
    """Totals (prompt + longest response) with one token per character: 5, 5, 5, 12."""
    report = check_rows(pairwise_result(), count_tokens=len, max_length=11)
    assert report["unit"] == "tokens" and report["too_long"] == 1
    assert check_rows(pairwise_result(), count_tokens=len, max_length=12)["too_long"] == 0


def test_check_ranked_sft_and_conversations():
    ranked_rows = LoadResult([RankedRow("Q", ["aaaa", "b", "cc"], None, "r:1")], "ranked")
    report = check_rows(ranked_rows, count_tokens=len, max_length=4)
    assert report["lengths"]["responses"] == {"p50": 2, "p90": 4, "p99": 4, "max": 4}
    assert report["too_long"] == 1 and report["chosen_equals_rejected"] is None
    sft = LoadResult(
        [SFTRow("", "text", None, "s:1"), SFTRow(None, None, [user("Hi"), assistant("Yo")], "s:2")], "sft"
    )
    report = check_rows(sft)
    assert report["lengths"]["messages"]["max"] == len("Hi\nYo")
    assert report["empty_fields"] == 0 and report["duplicates"] == 0


def test_format_report_mentions_every_number():
    text = format_report(check_rows(pairwise_result(), count_tokens=len, max_length=11))
    assert "4 pairwise rows" in text
    assert "length (tokens)" in text and "p50" in text
    assert "duplicate rows:       1" in text
    assert "chosen == rejected:   1" in text
    assert "empty fields:         1" in text
    assert "over max_length:      1 (max_length 11)" in text
