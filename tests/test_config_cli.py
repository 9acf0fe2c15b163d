"""Config resolution (defaults ← YAML ← options), unknown fields, --help, and user errors → exit 2."""

import json
import subprocess
import sys

import pytest

from alignkit.cli import main
from alignkit.config import SFTConfig, build_config, config_fields
from alignkit.errors import UserError


def test_layers_options_override_file():
    cfg = build_config(SFTConfig, {"model": "m", "data": ["a.jsonl"], "max_steps": 5, "lr": 0.1},
                       {"max_steps": "7", "data": ["b.jsonl", "c.jsonl"]}, "c.yaml")
    assert cfg.max_steps == 7 and cfg.lr == 0.1 and cfg.data == ("b.jsonl", "c.jsonl")


@pytest.mark.parametrize("values, message", [
    ({"max_stpes": 3}, 'unknown field "max_stpes"; did you mean max_steps'),
    ({"max_steps": "three"}, 'field "max_steps" must be an integer'),
    ({"lr": True}, 'field "lr" must be a number'),
    ({"lr_schedule": "exp"}, 'field "lr_schedule" must be one of constant, linear, cosine'),
    ({"batch_size": 0}, 'field "batch_size" must be at least 1'),
    ({"max_prompt_length": 600, "max_length": 512}, '"max_prompt_length" (600) must be less than'),
    ({"gradient_checkpointing": "maybe"}, "must be true or false"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(UserError, match=None) as e:
        build_config(SFTConfig, {"model": "m", "data": ["a"], **values}, {}, "cfg.yaml")
    assert message in str(e.value)


def test_yaml_unknown_field_names_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: [a.jsonl]\nwarmup_step: 3\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f'{cfg}: unknown field "warmup_step"; did you mean warmup_steps' in err
    assert "Traceback" not in err


def test_cli_unknown_option_suggests(capsys):
    assert main(["reward", "--model", "m", "--data", "x", "--ranked-los", "pairs"]) == 2
    assert 'unknown field "ranked_los"; did you mean ranked_loss' in capsys.readouterr().err


def test_help_lists_every_field_with_default_and_doc(capsys):
    from alignkit.cli import TRAIN_COMMANDS

    for command, (cls, _, _) in TRAIN_COMMANDS.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for f in config_fields(cls):
            assert "--" + f.name.replace("_", "-") in out
            assert f.metadata["doc"].split()[0] in out
        if "batch_size" in [f.name for f in config_fields(cls)]:  # not a ppo field: an iteration is a rollout
            assert "(default: 8)" in out


def test_bool_flag_alone_means_true():
    cfg = build_config(SFTConfig, {}, {"model": "m", "data": ["a"], "trust_remote_code": "true"})
    assert cfg.trust_remote_code is True


def test_missing_model_folder_is_a_user_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tmp_path / "nope"), "--data", str(data), "--output-dir", str(out)]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert not out.exists()


def test_real_entry_point_exit_status_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    proc = subprocess.run([sys.executable, "-m", "alignkit", "data", "check", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr and '"chosen"' in proc.stderr
    assert "Traceback" not in proc.stderr
