"""Config resolution (defaults ← YAML ← options), unknown fields, --help, and user errors → exit 2."""

import json

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
    ({"max_prompt_length": 512, "max_length": 512}, '"max_prompt_length" (512) must be less than'),
    ({"max_prompt_length": -1}, 'field "max_prompt_length" must be 0 or more'),
    ({"max_length": 1}, 'field "max_length" must be at least 2'),
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


def test_real_entry_point_exit_status_and_no_traceback(tmp_path, harness):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    proc = harness.alignkit(["data", "check", bad], check=False)
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr and '"chosen"' in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "kto", "ppo"])
def test_max_length_alone_derives_the_prompt_limit(command):
    """`--max-length 512` (or 300) alone is valid for every command: max_prompt_length defaults to 0, which the
    encoder reads as half of max_length; the field itself stays as given (configs are not written back)."""
    from alignkit.cli import TRAIN_COMMANDS
    from alignkit.data.tokenize import prompt_length_limit

    extra = {"reward_fn": "python:alignkit.examples:good_word_share"} if command == "ppo" else {}
    for max_length in ("512", "300", "2"):
        cfg = build_config(TRAIN_COMMANDS[command][0], {}, {"model": "m", "data": ["a"], "max_length": max_length,
                                                             **extra})
        assert cfg.max_prompt_length == 0
        assert prompt_length_limit(cfg.max_length, cfg.max_prompt_length) == int(max_length) // 2
    cfg = build_config(TRAIN_COMMANDS[command][0], {}, {"model": "m", "data": ["a"], "max_length": "64",
                                                         "max_prompt_length": "50", **extra})
    assert prompt_length_limit(cfg.max_length, cfg.max_prompt_length) == 50


def test_dpo_with_only_max_length_runs(tmp_path, tiny_model_dir, capsys):
    """The issue's command: `alignkit dpo … --max-length 512` used to stop with "max_prompt_length (512) must be
    less than max_length"."""
    from alignkit.examples import pairwise_rows, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", pairwise_rows(8, seed=1))
    out = tmp_path / "run"
    assert main(["dpo", "--model", tiny_model_dir, "--data", str(data), "--output-dir", str(out),
                 "--max-length", "512", "--max-steps", "1", "--batch-size", "4"]) == 0, capsys.readouterr().err
    assert (out / "final").is_dir()


def test_samples_per_prompt_defaults_by_algorithm():
    """0 (the default) = 1 for ppo, 4 for rloo and grpo; the field keeps what was given. An explicit 1 with a
    critic-free algorithm is still an error (its baseline needs a group)."""
    from alignkit.config import PPOConfig

    base = {"model": "m", "data": ["a"], "reward_fn": "python:alignkit.examples:good_word_share"}
    for algo, group in (("ppo", 1), ("rloo", 4), ("grpo", 4)):
        cfg = build_config(PPOConfig, {}, {**base, "algo": algo})
        assert (cfg.samples_per_prompt, cfg.group_size) == (0, group)
        assert build_config(PPOConfig, {}, {**base, "algo": algo, "samples_per_prompt": "3"}).group_size == 3
    for algo in ("rloo", "grpo"):
        with pytest.raises(UserError, match=f'algo "{algo}" needs samples_per_prompt of at least 2'):
            build_config(PPOConfig, {}, {**base, "algo": algo, "samples_per_prompt": "1"})
    with pytest.raises(UserError, match='"samples_per_prompt" must be 0'):
        build_config(PPOConfig, {}, {**base, "samples_per_prompt": "-1"})
    with pytest.raises(UserError, match=r"must divide rollout_batch_size × samples_per_prompt \(3 × 4\)"):
        build_config(PPOConfig, {}, {**base, "algo": "grpo", "rollout_batch_size": "3", "num_minibatches": "8"})


@pytest.mark.parametrize("algo, group", [("rloo", 4), ("grpo", 4), ("ppo", 1)])
def test_ppo_command_runs_each_algorithm_without_samples_per_prompt(tmp_path, tiny_model_dir, capsys, algo, group):
    """`alignkit ppo --algo rloo` (or grpo) used to stop with "needs samples_per_prompt of at least 2". The first
    iteration's samples (samples.jsonl) show the group: 2 prompts × `group` samples each."""
    from alignkit.examples import pairwise_rows, write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pairwise_rows(8, seed=2)])
    out = tmp_path / "run"
    assert main(["ppo", "--algo", algo, "--model", tiny_model_dir, "--data", str(prompts), "--output-dir", str(out),
                 "--reward-fn", "python:alignkit.examples:good_word_share", "--rollout-batch-size", "2",
                 "--max-steps", "1", "--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    first = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    sampled = [s["prompt"] for s in first["samples"]]
    assert len(sampled) == 2 * group
    assert sampled[:group] == [sampled[0]] * group and sampled[group:] == [sampled[-1]] * group


def test_ppo_help_says_how_samples_per_prompt_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0 = by algo: 1 for ppo, 4 for rloo and grpo. (default: 0)" in out
