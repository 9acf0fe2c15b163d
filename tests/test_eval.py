"""`alignkit eval` (SPEC §9): win rate with Wilson interval, ties half, the length-controlled win rate, KL."""

import json
import math
import random

import pytest

from alignkit.config import EvalConfig
from alignkit.examples import WORDS, make_tiny_model, write_jsonl
from alignkit.judges import Verdict
from alignkit.judges.winrate import lc_win_rate, run_eval, summarise, wilson_interval

RULE = "python:alignkit.examples:good_word_share"


def _lengths_and_outcomes(n, seed, quality, length_effect, mean_gap):
    """Length differences Δ ~ N(mean_gap, 40) characters and outcomes drawn from σ(quality + effect·tanh(Δ/sd))."""
    rng = random.Random(seed)
    d = [rng.gauss(mean_gap, 40) for _ in range(n)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    y = [float(rng.random() < 1 / (1 + math.exp(-(quality + length_effect * math.tanh(x / sd))))) for x in d]
    return y, d


def test_a_model_that_wins_only_by_being_longer_has_a_length_controlled_win_rate_near_one_half():
    y, d = _lengths_and_outcomes(400, seed=0, quality=0.0, length_effect=3.0, mean_gap=40)
    assert sum(y) / len(y) > 0.75                       # raw: the longer model looks much better
    assert abs(lc_win_rate(y, d) - 0.5) < 0.07          # length taken out: a coin flip
    separable = [float(x > 0) for x in d]               # wins exactly when longer
    assert sum(separable) / len(separable) > 0.8 and abs(lc_win_rate(separable, d) - 0.5) < 0.1


def test_a_better_model_of_the_same_length_keeps_its_win_rate():
    y, d = _lengths_and_outcomes(400, seed=1, quality=math.log(4), length_effect=0.0, mean_gap=0)
    raw = sum(y) / len(y)
    assert raw > 0.75 and lc_win_rate(y, d) == pytest.approx(raw, abs=0.02)
    assert lc_win_rate([1.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]) == pytest.approx(0.5, abs=1e-3)  # no length spread


def test_wilson_interval_and_ties_count_half():
    lo, hi = wilson_interval(0.5, 100)
    assert (lo, hi) == (pytest.approx(0.40383, abs=1e-5), pytest.approx(0.59617, abs=1e-5))
    verdicts = [Verdict(0, 0.9), Verdict(None, 0.5, flipped=True, both_orders=True), Verdict(1, 0.8, both_orders=True),
                Verdict(None, 0.5, failed=True)]
    s = summarise(verdicts, [10, 20, 30, 40], [10, 10, 10, 10], kl=None)
    assert s["n"] == 3 and s["win_rate"] == pytest.approx(0.5) and s["ties"] == 1 and s["failures"] == 1
    assert s["position_bias"] == 0.5 and s["mean_length"] == {"model": 25.0, "baseline": 10.0}
    assert s["win_rate_ci"] == pytest.approx(list(wilson_interval(0.5, 3)))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = random.Random(0)
    rows = [{"prompt": f"describe the {rng.choice(['red', 'blue'])} {rng.choice(['cat', 'dog'])} ->"}
            for _ in range(12)]
    return str(write_jsonl(tmp_path_factory.mktemp("eval") / "prompts.jsonl", rows))


def test_eval_end_to_end_on_tiny_models(tmp_path, tiny_model_dir, prompts_file, harness):
    other = make_tiny_model(tmp_path / "other", seed=1)
    result = harness.alignkit(["eval", "--model", other, "--baseline", tiny_model_dir, "--judge", RULE,
                               "--data", prompts_file, "--output-dir", tmp_path / "run", "--max-new-tokens", "8"])
    assert "win rate" in result.stdout and "length-controlled" in result.stdout
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {"n", "win_rate", "win_rate_ci", "lc_win_rate", "ties", "position_bias", "mean_length", "kl"} <= set(report)
    assert report["n"] == 12 and report["kl"] > 0 and report["position_bias"] is None
    lo, hi = report["win_rate_ci"]
    assert 0 <= lo <= report["win_rate"] <= hi <= 1
    verdicts = [json.loads(line) for line in (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 12 and {v["winner"] for v in verdicts} <= {"model", "baseline", "tie"}
    wins = sum(v["winner"] == "model" for v in verdicts) + 0.5 * sum(v["winner"] == "tie" for v in verdicts)
    assert report["win_rate"] == pytest.approx(wins / 12)


def test_a_model_against_itself_ties_everywhere_with_kl_zero(tmp_path, tiny_model_dir, prompts_file):
    report = run_eval(EvalConfig(model=tiny_model_dir, baseline=tiny_model_dir, judge=RULE, data=(prompts_file,),
                                 output_dir=str(tmp_path / "self"), max_new_tokens=8, max_prompts=6))
    assert report["n"] == 6 and report["win_rate"] == 0.5 and report["ties"] == 6
    assert report["kl"] == pytest.approx(0.0, abs=1e-6) and report["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)


def test_kl_is_null_across_vocabularies_and_an_lm_judge_asks_both_orders(tmp_path, tiny_model_dir, prompts_file):
    from alignkit.models.tiny import save_tiny_model

    judge_dir = save_tiny_model(tmp_path / "judge", WORDS + ["A", "B", "C", "[["], seed=3)
    report = run_eval(EvalConfig(model=str(judge_dir), baseline=tiny_model_dir, judge=f"lm:{judge_dir}",
                                 data=(prompts_file,), output_dir=str(tmp_path / "x"), max_new_tokens=6,
                                 max_prompts=4))
    assert report["kl"] is None and report["n"] == 4 and report["position_bias"] is not None


def test_eval_mistakes_are_one_message(tmp_path, prompts_file, capsys):
    from alignkit.cli import main

    assert main(["eval", "--judge", RULE, "--data", prompts_file]) == 2
    assert '"model" and "baseline"' in capsys.readouterr().err
    assert main(["eval", "--judge", RULE, "--data", prompts_file, "--model", str(tmp_path / "nope"),
                 "--baseline", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["eval", "--judge", "nope:x", "--data", prompts_file, "--model", "a", "--baseline", "b"]) == 2
    assert not (tmp_path / "o").exists()
