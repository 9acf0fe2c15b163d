"""SPEC §13: `kill -9` at a random moment of a real `alignkit sft|reward|dpo|kto|ppo` process, then the same
command again, ends with the same final weights as a run never interrupted (CPU; max abs difference ≤ 1e-6).
The harness (`harness.kill_9_and_rerun`) is in conftest.py."""

import pytest

from alignkit.examples import pairwise_rows, sft_rows, write_jsonl


def _argv(command, model, data, out):
    common = [command, "--model", model, "--data", data, "--output-dir", out, "--lr", "2e-3", "--lr-schedule",
              "cosine", "--warmup-steps", "5", "--save-every", "3", "--seed", "7", "--max-length", "64",
              "--max-prompt-length", "32"]
    if command == "ppo":
        return common + ["--max-steps", "24", "--reward-fn", "python:alignkit.examples:good_word_share",
                         "--rollout-batch-size", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8"]
    return common + ["--max-steps", "60", "--batch-size", "8", "--grad-accum", "2", "--eval-fraction", "0.1",
                     "--eval-every", "10"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "kto", "ppo"])
def test_kill_9_then_rerun_gives_identical_final_weights(tmp_path, harness, command):
    from alignkit.examples import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model", attention_dropout=0.1))
    rows = sft_rows(200, seed=2) if command == "sft" else pairwise_rows(200, seed=2)
    if command == "ppo":
        rows = [{"prompt": r["prompt"]} for r in rows]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    harness.alignkit(_argv(command, model, data, straight))
    seed = harness.kill_9_and_rerun(_argv(command, model, data, killed), killed,
                                    last_checkpoint=36 if command != "ppo" else 18)
    harness.assert_same_final_weights(straight, killed, atol=1e-6, note=f"(kill seed {seed})")
    assert not any(p.name.startswith(".") for p in (killed / "checkpoints").iterdir())
    a, b = harness.final_weights(straight), harness.final_weights(killed)
    head = "score.weight" if command == "reward" else "lm_head.weight"
    assert a[head].equal(b[head])
