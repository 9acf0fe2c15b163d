"""Best-of-N maths: the KL bound, the unbiased best-of-n estimator against brute force, and the d(α − βd) fit."""

import itertools
import math
import random

import pytest

from alignkit.bon import best_of_n_weights, expected_best_of_n, fit_bon_curve, kl_bound


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert kl_bound(64) == pytest.approx(math.log(64) - 63 / 64, abs=1e-15)
    with pytest.raises(ValueError):
        kl_bound(0)


def test_weights_by_hand():
    # N = 3, n = 2: ranks (ascending) get C(i, 1)/C(3, 2) = 0, 1/3, 2/3
    assert best_of_n_weights([0.5, 0.1, 0.9], 2) == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-15)
    assert best_of_n_weights([3.0, 1.0, 2.0], 1) == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert best_of_n_weights([3.0, 1.0, 2.0], 3) == pytest.approx([1.0, 0.0, 0.0], abs=1e-15)
    # a tie at the top shares its ranks' weight: (1/3 + 2/3)/2 each
    assert best_of_n_weights([0.9, 0.1, 0.9], 2) == pytest.approx([0.5, 0.0, 0.5], abs=1e-15)
    with pytest.raises(ValueError):
        best_of_n_weights([1.0, 2.0], 3)


def _brute_force(proxy, gold, n):
    """Average over every n-subset of the gold of its best (ties: the mean gold of the tied best)."""
    values = []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        best = [gold[i] for i in subset if proxy[i] == top]
        values.append(sum(best) / len(best))
    return sum(values) / len(values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_equals_brute_force(seed):
    rng = random.Random(seed)
    size = 9
    proxy = [rng.choice([0.0, 0.5, 1.0, 1.5]) if seed == 2 else rng.gauss(0, 1) for _ in range(size)]  # seed 2: ties
    gold = [rng.gauss(0, 1) for _ in range(size)]
    for n in range(1, size + 1):
        assert expected_best_of_n(proxy, gold, n) == pytest.approx(_brute_force(proxy, gold, n), abs=1e-12)
    assert sum(best_of_n_weights(proxy, 4)) == pytest.approx(1.0, abs=1e-12)


def test_estimator_is_stable_for_many_samples():
    proxy = list(range(128))
    gold = [float(i) for i in range(128)]
    # E[max of a random 64-subset of 0..127] = 64·128/65 − 1 + ... exactly: n(N+1)/(n+1) − 1 on 0-based values
    assert expected_best_of_n(proxy, gold, 64) == pytest.approx(64 * 129 / 65 - 1, rel=1e-12)


def test_fit_recovers_a_known_curve():
    d = [math.sqrt(kl_bound(n)) for n in (1, 2, 4, 8, 16, 32, 64)]
    gain = [x * (0.8 - 0.3 * x) for x in d]
    fit = fit_bon_curve(d, gain)
    assert fit["alpha"] == pytest.approx(0.8, abs=1e-10) and fit["beta"] == pytest.approx(0.3, abs=1e-10)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    noisy = fit_bon_curve(d, [g + (0.05 if i % 2 else -0.05) for i, g in enumerate(gain)])
    assert 0.5 < noisy["r2"] < 1.0


# ------------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from alignkit.examples import pairwise_rows, write_jsonl

    rows = [{"prompt": r["prompt"]} for r in pairwise_rows(6, seed=31)]
    return str(write_jsonl(tmp_path_factory.mktemp("bon") / "prompts.jsonl", rows))


def test_bon_command_keeps_the_top_scored_candidate(tmp_path, tiny_model_dir, prompts_file, capsys):
    """`alignkit bon --n 8` on a rule reward: each row keeps its highest-scored candidate, the kept ones beat
    the mean candidate, and the report prints the KL bound log 8 − 7/8."""
    import json

    from alignkit.cli import main
    from alignkit.examples import good_word_share

    out = tmp_path / "bon.jsonl"
    code = main(["bon", "--model", tiny_model_dir, "--data", prompts_file, "--n", "8", "--output", str(out),
                 "--reward-fn", "python:alignkit.examples:good_word_share", "--max-new-tokens", "8", "--seed", "3"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["candidates"]) == 8 for r in rows)
    for r in rows:
        scores = [c["score"] for c in r["candidates"]]
        assert r["best_score"] == max(scores)
        assert r["best"] == r["candidates"][scores.index(max(scores))]["text"]
        assert scores == pytest.approx(good_word_share([r["prompt"]] * 8, [c["text"] for c in r["candidates"]]))
    mean_best = sum(r["best_score"] for r in rows) / len(rows)
    mean_candidate = sum(c["score"] for r in rows for c in r["candidates"]) / (8 * len(rows))
    assert mean_best > mean_candidate
    printed = capsys.readouterr().out
    assert f"{math.log(8) - 7 / 8:.4f}" in printed and "mean best score" in printed


def test_best_of_n_samples_a_prompts_n_candidates_in_one_generation(tiny_model_dir, tokenizer):
    """Prompts are batched (batch_size samples per call) with each prompt repeated n times, so the engine
    prefills it once; a reward model scores every candidate; a seed fixes the result."""
    import torch

    from alignkit.bon import best_of_n
    from alignkit.data.tokenize import Encoder
    from alignkit.models.load import load_causal_lm
    from alignkit.rl.rollout import generate

    calls = []

    def recording(model, prompts, **kw):
        calls.append(prompts)
        return generate(model, prompts, **kw)

    model = load_causal_lm(tiny_model_dir)
    enc = Encoder(tokenizer, 64, 32)
    prompts = [(p, enc.prompt_ids(p)) for p in ("copy cat ->", "copy dog fox ->", "describe the red owl ->")]

    def scorer(prompts, texts, finished, sampled):  # longer responses score higher
        return torch.tensor([float(len(t.split())) for t in texts]), None

    picked = best_of_n(model, tokenizer, prompts, scorer, 4, max_new_tokens=6, batch_size=8, seed=1,
                       generate_fn=recording)
    assert [len(c) for c in calls] == [8, 4]  # 2 prompts × 4, then 1 × 4
    assert calls[0][:4] == [prompts[0][1]] * 4 and calls[0][4:] == [prompts[1][1]] * 4
    assert [r.prompt for r in picked] == [p for p, _ in prompts]
    for r in picked:
        assert r.best_score == max(r.scores) == len(r.best.split())
    again = best_of_n(model, tokenizer, prompts, scorer, 4, max_new_tokens=6, batch_size=8, seed=1)
    assert [r.candidates for r in again] == [r.candidates for r in picked]


def test_bon_scores_with_a_reward_model(tmp_path, tiny_model_dir, tokenizer, prompts_file):
    """A reward model (random head) scores the candidates as plain transformers scores their text."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.bon import run_bon
    from alignkit.config import BonConfig
    from alignkit.models.load import load_reward_model, load_tokenizer, save_pretrained_atomic

    rm_tokenizer = load_tokenizer(tiny_model_dir)
    rm = load_reward_model(tiny_model_dir, rm_tokenizer)
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight)
    save_pretrained_atomic(rm, rm_tokenizer, tmp_path / "rm")
    out = tmp_path / "bon.jsonl"
    summary = run_bon(BonConfig(model=tiny_model_dir, data=(prompts_file,), output=str(out), n=3,
                                reward_model=str(tmp_path / "rm"), max_new_tokens=5))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == len(rows) == 6 and summary["kl_bound"] == pytest.approx(kl_bound(3))
    assert summary["mean_best_score"] > summary["mean_candidate_score"]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    row = rows[0]
    for c in row["candidates"]:  # a finished candidate is scored with its EOS, a cut one without
        ids = tokenizer(row["prompt"] + " " + c["text"]).input_ids  # the word tokenizer joins words with spaces
        with torch.no_grad():
            plain_scores = [float(plain(input_ids=torch.tensor([x])).logits[0, 0])
                            for x in (ids, ids + [tokenizer.eos_token_id])]
        assert min(abs(c["score"] - s) for s in plain_scores) < 1e-4


class _Verdict:
    def __init__(self, winner):
        self.winner = winner


class _LongerWins:
    """A pairwise-only judge: the response with more words wins, equal lengths tie."""

    can_score = False

    def __init__(self):
        self.calls = 0

    def compare_batch(self, items):
        self.calls += 1
        return [_Verdict(None if len(a.split()) == len(b.split()) else int(len(b.split()) > len(a.split())))
                for _, a, b in items]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9])
def test_knockout_finds_the_best_of_a_transitive_judge(n):
    """With a judge that orders responses consistently, the knockout's champion is the best candidate; it alone
    survives every round (⌈log2 n⌉), and each round is one batched call across prompts."""
    from alignkit.bon import knockout

    rng = random.Random(n)
    candidates = [[" ".join(["w"] * k) for k in rng.sample(range(1, 40), n)] for _ in range(4)]
    judge = _LongerWins()
    survived = knockout(judge, ["p"] * 4, candidates)
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    assert judge.calls == rounds
    for cands, s in zip(candidates, survived):
        best = max(range(n), key=lambda i: len(cands[i].split()))
        assert s[best] == rounds and all(v < rounds for i, v in enumerate(s) if i != best)


def test_best_of_n_with_a_pairwise_judge(tiny_model_dir, tokenizer):
    from alignkit.bon import best_of_n
    from alignkit.data.tokenize import Encoder
    from alignkit.models.load import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    enc = Encoder(tokenizer, 64, 32)
    prompts = [(p, enc.prompt_ids(p)) for p in ("copy cat ->", "describe the red owl ->")]
    for r in best_of_n(model, tokenizer, prompts, _LongerWins(), 4, max_new_tokens=8, seed=2):
        longest = max(len(t.split()) for t in r.candidates)
        assert len(r.best.split()) == longest and r.best_score == 2


def test_rl_fit_recovers_a_known_curve_and_by_hand():
    from alignkit.bon import fit_rl_curve

    d = [0.3, 0.6, 1.0, 1.5, 2.2, 3.0, 4.0]
    gain = [x * (0.5 - 0.3 * math.log(x)) for x in d]
    fit = fit_rl_curve([0.0] + d, [0.0] + gain)  # d = 0 is dropped (log 0)
    assert fit["alpha"] == pytest.approx(0.5, abs=1e-9) and fit["beta"] == pytest.approx(0.3, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["points"] == len(d)
    # two points, solved by hand: at d = 1, gain = α; at d = e, gain = e(α − β)
    by_hand = fit_rl_curve([1.0, math.e], [0.4, math.e * (0.4 - 0.1)])
    assert by_hand["alpha"] == pytest.approx(0.4) and by_hand["beta"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        fit_rl_curve([0.0, 1.0], [0.0, 0.2])
