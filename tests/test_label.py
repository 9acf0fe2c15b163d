"""`alignkit label` (SPEC §9): pairwise and ranked output, generation with --policy, agreement with known truth,
resume after a crash and after kill -9, and output that trains dpo, kto and reward as it is."""

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

import alignkit.judges.label as label_module
from alignkit.config import DPOConfig, KTOConfig, LabelConfig, RewardConfig
from alignkit.examples import pairwise_rows, ranked_rows, sft_rows, write_jsonl
from alignkit.judges.label import done_rows, run_label, sidecars

RULE = "python:alignkit.examples:good_word_share"


def shuffled_pairs(n: int, seed: int) -> list[dict]:
    """Held-out pairs with the better response at a random position, `label` its index."""
    rng = random.Random(seed)
    rows = []
    for row in pairwise_rows(n, seed=seed):
        swap = rng.random() < 0.5
        responses = [row["rejected"], row["chosen"]] if swap else [row["chosen"], row["rejected"]]
        rows.append({"prompt": row["prompt"], "responses": responses, "label": int(swap)})
    return rows


def all_rows(out) -> list[dict]:
    skipped, _ = sidecars(out)
    return done_rows(Path(out)) + done_rows(skipped)


def test_rule_judge_agrees_with_the_truth_and_its_pairs_train_dpo_and_kto(tmp_path, tiny_model_dir):
    from alignkit.train.dpo import train_dpo
    from alignkit.train.kto import train_kto

    data = write_jsonl(tmp_path / "in.jsonl", shuffled_pairs(40, seed=11))
    out = tmp_path / "pairs.jsonl"
    report = run_label(LabelConfig(judge=RULE, data=(str(data),), output=str(out), batch_size=16))
    assert report["rows"] == 40 and report["labelled"] == 40
    assert report["agreement"] >= 0.9
    assert report["written"] + report["skipped_ties"] == 40 and report["position_bias"] is None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) >= {"prompt", "chosen", "rejected"} for r in rows)
    assert json.loads(sidecars(out)[1].read_text()) == report
    train_dpo(DPOConfig(model=tiny_model_dir, data=(str(out),), output_dir=str(tmp_path / "dpo"), max_steps=1,
                        batch_size=4))
    assert (tmp_path / "dpo" / "final" / "model.safetensors").exists()
    train_kto(KTOConfig(model=tiny_model_dir, data=(str(out),), output_dir=str(tmp_path / "kto"), max_steps=1,
                        batch_size=4))
    assert (tmp_path / "kto" / "final" / "model.safetensors").exists()


def test_a_reward_model_judge_trained_on_similar_data_agrees_with_the_truth(tmp_path, tiny_model_dir):
    """The issue's bar: an rm: judge trained on similar pairs (160 pairs, 10 steps) labels shuffled held-out pairs
    with ≥ 90% agreement (measured: 100% of 60)."""
    from alignkit.train.reward import train_reward

    train = write_jsonl(tmp_path / "train.jsonl", pairwise_rows(160, seed=5))
    train_reward(RewardConfig(model=tiny_model_dir, data=(str(train),), output_dir=str(tmp_path / "rm"), epochs=1,
                              batch_size=16, lr=1e-3, lr_schedule="cosine", eval_fraction=0.0))
    held = write_jsonl(tmp_path / "held.jsonl", shuffled_pairs(60, seed=123))
    report = run_label(LabelConfig(judge=f"rm:{tmp_path / 'rm' / 'final'}", data=(str(held),),
                                   output=str(tmp_path / "out.jsonl")))
    assert report["labelled"] == 60 and report["agreement"] >= 0.9


def test_ranked_output_from_scores_and_from_a_round_robin(tmp_path, tiny_model_dir):
    from alignkit.examples import WORDS
    from alignkit.models.tiny import save_tiny_model
    from alignkit.train.reward import train_reward

    rng = random.Random(0)
    rows = []
    for row in ranked_rows(6, k=4, seed=2):
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"prompt": row["prompt"], "responses": [row["responses"][k] for k in order],
                     "label": order.index(0)})
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "ranked.jsonl"
    report = run_label(LabelConfig(judge=RULE, data=(str(data),), output=str(out)))
    assert report["agreement"] == 1.0 and report["comparisons"] == 0  # scored, not compared
    ranked = [json.loads(line) for line in out.read_text().splitlines()]
    for got, row in zip(ranked, ranked_rows(6, k=4, seed=2)):
        assert got["responses"] == row["responses"]  # best first, as the truth orders them
        assert got["scores"] == sorted(got["scores"], reverse=True)
    train_reward(RewardConfig(model=tiny_model_dir, data=(str(out),), output_dir=str(tmp_path / "rm"), max_steps=1,
                              batch_size=2, eval_fraction=0.0))
    assert (tmp_path / "rm" / "final" / "model.safetensors").exists()

    # a pairwise judge ranks by a round robin: 6 comparisons of 4 candidates, each asked in both orders
    lm = save_tiny_model(tmp_path / "lm", WORDS + ["A", "B", "C", "[["], seed=5)
    out2 = tmp_path / "rr.jsonl"
    report = run_label(LabelConfig(judge=f"lm:{lm}", data=(str(data),), output=str(out2)))
    assert report["comparisons"] == 36 and report["both_orders"] == 36
    assert report["position_bias"] == report["flips"] / 36
    for line in out2.read_text().splitlines():
        assert sum(json.loads(line)["scores"]) == 6.0  # a point per comparison, split on ties


def test_policy_generates_candidates(tmp_path, tiny_model_dir):
    prompts = [{"prompt": r["prompt"]} for r in sft_rows(5, seed=1)] + [
        {"prompt": [{"role": "user", "content": "describe the red cat ->"}]}]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    common = dict(judge=RULE, data=(str(data),), policy=tiny_model_dir, max_new_tokens=6, batch_size=4)
    run_label(LabelConfig(output=str(tmp_path / "ranked.jsonl"), n=3, **common))
    ranked = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert sorted(r["_row"] for r in ranked) == list(range(6))
    assert all(len(r["responses"]) == 3 and len(r["scores"]) == 3 for r in ranked)
    conversational = [r for r in ranked if isinstance(r["prompt"], list)][0]
    assert conversational["responses"][0][0]["role"] == "assistant"
    run_label(LabelConfig(output=str(tmp_path / "pairs.jsonl"), n=2, **common))
    assert len(all_rows(tmp_path / "pairs.jsonl")) == 6


def test_a_crashed_run_resumes_with_every_row_once(tmp_path, harness):
    data = write_jsonl(tmp_path / "in.jsonl", shuffled_pairs(20, seed=3))
    out = tmp_path / "out.jsonl"
    cfg = LabelConfig(judge=RULE, data=(str(data),), output=str(out), batch_size=4)
    harness.crash_and_resume(label_module, "judge_tasks", at=3, run=lambda: run_label(cfg))
    rows = Counter(r["_row"] for r in all_rows(out))
    assert sorted(rows) == list(range(20)) and set(rows.values()) == {1}

    # a torn last line (a write cut by kill -9) is dropped on resume and its row judged again
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:10])
    report = run_label(cfg)
    rows = Counter(r["_row"] for r in all_rows(out))
    assert sorted(rows) == list(range(20)) and set(rows.values()) == {1} and report["rows"] == 20


def test_kill_9_of_the_command_and_rerun_gives_every_row_once(tmp_path, tiny_model_dir, harness):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_rows(24, seed=4)])
    out = tmp_path / "out.jsonl"
    argv = ["label", "--judge", RULE, "--data", data, "--output", out, "--policy", tiny_model_dir, "--n", "2",
            "--batch-size", "2", "--max-new-tokens", "24", "--temperature", "1.5"]
    proc = subprocess.Popen(harness.command(argv), env=harness.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(all_rows(out)) < 3:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run ended before the kill"
    assert len(all_rows(out)) < 24
    result = harness.alignkit(argv)
    assert "agreement" in result.stdout
    rows = Counter(r["_row"] for r in all_rows(out))
    assert sorted(rows) == list(range(24)) and set(rows.values()) == {1}


def test_bad_input_is_one_message(tmp_path, harness):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "responses": ["a", "b"], "label": 5}])
    result = harness.alignkit(["label", "--judge", RULE, "--data", data, "--output", tmp_path / "o.jsonl"],
                              check=False)
    assert result.returncode == 2 and 'field "label"' in result.stderr and "Traceback" not in result.stderr
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    result = harness.alignkit(["label", "--judge", RULE, "--data", prompts, "--output", tmp_path / "o.jsonl"],
                              check=False)
    assert result.returncode == 2 and "--policy" in result.stderr
    with pytest.raises(Exception, match="at least 2"):
        LabelConfig(judge=RULE, data=("x",), output="o", n=1)


def test_label_with_an_api_judge_caches_and_never_writes_the_key(tmp_path, monkeypatch):
    from test_judges import FakeJudgeServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-label-secret")
    server = FakeJudgeServer()  # the longer answer wins; 429 once
    try:
        rows = [{"prompt": f"q{i}", "responses": ["kind " * (i % 3 + 1), "rude " * 2], "label": 0} for i in range(6)]
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        (tmp_path / "principles.txt").write_text("Prefer longer answers.\n")
        cfg = dict(judge=f"openai:{server.url}#judge", data=(str(data),), output=str(tmp_path / "out.jsonl"),
                   principles=str(tmp_path / "principles.txt"))
        first = run_label(LabelConfig(**cfg))
        assert first["requests_this_run"] == 13 and server.requests == 13  # 12 prompts, one retried
        assert first["written"] == 4 and first["skipped_ties"] == 2 and first["agreement"] == pytest.approx(2 / 6)  # longer wins: 2 right, 2 wrong, 2 equal (ties)
        again = run_label(LabelConfig(**cfg, resume="never"))
        assert again["requests_this_run"] == 0 and server.requests == 13 and again["agreement"] == first["agreement"]
    finally:
        server.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert "sk-label-secret" not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("judge", [RULE, "knockout"])
def test_pairs_mixed_with_larger_sets_give_ranked_rows_throughout(tmp_path, tiny_model_dir, judge):
    """One file holds one row kind: an input mixing two-candidate and three-candidate rows is labelled as ranked
    rows throughout (a pair is a ranking of two), which `load_rows` reads and `alignkit dpo` trains on."""
    from alignkit.data.formats import load_rows
    from alignkit.examples import WORDS
    from alignkit.models.tiny import save_tiny_model
    from alignkit.train.dpo import train_dpo

    if judge == "knockout":  # a pairwise-only judge: ranks by a round robin
        judge = f"lm:{save_tiny_model(tmp_path / 'judge', WORDS + ['A', 'B', 'C', '[[', ']]'], seed=1)}"
    pairs = shuffled_pairs(6, seed=21)
    triples = [{"prompt": r["prompt"], "responses": r["responses"][:3]} for r in ranked_rows(6, k=3, seed=22)]
    data = write_jsonl(tmp_path / "mixed.jsonl", [row for pair in zip(pairs, triples) for row in pair])
    out = tmp_path / "labelled.jsonl"
    report = run_label(LabelConfig(judge=judge, data=(str(data),), output=str(out), batch_size=4))
    assert report["rows"] == 12
    loaded = load_rows([str(out)], kind="auto")
    assert loaded.kind == "ranked" and len(loaded.rows) == report["written"] > 0
    assert {len(r.responses) for r in loaded.rows} == {2, 3}
    if judge == RULE:  # (an untrained lm judge ties everything: no pair to train on)
        train_dpo(DPOConfig(model=tiny_model_dir, data=(str(out),), output_dir=str(tmp_path / "dpo"), max_steps=1,
                            batch_size=4))
        assert (tmp_path / "dpo" / "final" / "model.safetensors").exists()
