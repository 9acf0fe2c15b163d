"""Every bad input the foundation issue lists: exit 2, one `file:line` message, no traceback, no final/."""

import json

import pytest

from alignkit.cli import main

GOOD_PAIR = json.dumps({"prompt": "describe the cat ->", "chosen": "kind", "rejected": "rude"})

CASES = {
    # name: (command, file name, file bytes, expected `file:line` and words in the message)
    "invalid json": ("reward", "p.jsonl", GOOD_PAIR + '\n{"prompt": "x", "chosen": \n', (":2:", "JSON")),
    "missing field": ("reward", "p.jsonl", GOOD_PAIR + '\n{"prompt": "x", "chosen": "a"}\n', (":2:", '"rejected"')),
    "wrong type": ("reward", "p.jsonl", '{"prompt": "x", "chosen": ["a"], "rejected": 5}\n', (":1:", '"')),
    "empty response": ("reward", "p.jsonl", GOOD_PAIR + '\n' + GOOD_PAIR + '\n{"prompt": "x", "chosen": " ", "rejected": "a"}\n',
                       (":3:", '"chosen"')),
    "not an object": ("reward", "p.jsonl", GOOD_PAIR + '\n[1, 2]\n', (":2:", "object")),
    "nan margin": ("reward", "p.jsonl", '{"prompt": "x", "chosen": "a", "rejected": "b", "margin": NaN}\n',
                   (":1:", '"margin"')),
    "invalid utf-8": ("reward", "p.jsonl", GOOD_PAIR.encode() + b'\n{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n',
                      (":2:", "UTF-8")),
    "empty file": ("sft", "s.jsonl", b"", (":1:", "empty")),
    "ranked with one response": ("reward", "r.jsonl", '{"prompt": "x", "responses": ["only one"]}\n',
                                 (":1:", '"responses"')),
    "non-boolean kto label": ("data check --kind unary", "u.jsonl",
                              '{"prompt": "x", "completion": "a", "label": true}\n{"prompt": "x", "completion": "a", "label": 1}\n',
                              (":2:", '"label"')),
    "json list element": ("sft", "s.json", '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a"}\n]\n',
                          (":3:", '"completion"')),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exit_2_with_file_line(name, tmp_path, tiny_model_dir, capsys):
    command, filename, content, (line, words) = CASES[name]
    path = tmp_path / filename
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    if command.startswith("data"):
        argv = command.split() + [str(path)]
    else:
        argv = [command, "--model", tiny_model_dir, "--data", str(path), "--output-dir", str(out), "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}{line}" in err, err
    assert words in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "final").exists() and not out.exists()


def test_skip_bad_rows_counts_them(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([GOOD_PAIR] * 6 + ['{"prompt": "x"}', "not json"]) + "\n")
    out = tmp_path / "run"
    assert main(["reward", "--model", tiny_model_dir, "--data", str(path), "--output-dir", str(out),
                 "--max-steps", "1", "--on-bad-row", "skip", "--eval-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad rows" in err
    assert (out / "final" / "model.safetensors").is_file()
