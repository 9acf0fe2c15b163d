"""The lab's world: gold reward by hand, annotators that follow gold (and their biases), seeded data sets."""

import math
import random
from collections import Counter

import pytest

import alignkit.lab.world as W
from alignkit.lab.world import (
    FACTS,
    GOLD,
    Annotator,
    GoldReward,
    all_prompts,
    answer,
    corpus,
    gold_reward,
    pairwise_rows,
    ranked_rows,
    sft_rows,
    split_prompts,
    unary_rows,
    write_response,
)


def test_prompts_answers_and_split():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 100 + 30 + 144
    assert all(len(p.split()) == 4 for p in prompts)
    assert answer("add 9 8 ->") == ["17"]
    assert answer("color of lemon ->") == [FACTS["lemon"]]
    assert answer("repeat cat cat ->") == ["cat", "cat"]
    with pytest.raises(ValueError):
        answer("add nine 8 ->")
    train, heldout = split_prompts(seed=3)
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(prompts)
    assert {p.split()[0] for p in heldout} == {"add", "color", "repeat"}
    assert split_prompts(3) == split_prompts(3) and split_prompts(3) != split_prompts(4)


@pytest.mark.parametrize("response, gold", [
    ("7", 1.0),                               # bare right answer
    ("5", 0.0),                               # wrong
    ("well so 7", 1.0 - 2 * 0.05),            # filler: right, 2 extra words
    ("great question 7", 1.0 - 2 * 0.05 - 2 * 0.1),
    ("7 7 7", 0.0 - 2 * 0.05 - 2 * 0.1),      # core [7, 7, 7] is not the answer; 2 extra, 2 repeats
    ("well well 7", 1.0 - 2 * 0.05 - 1 * 0.1),
    ("", 0.0),
])
def test_gold_reward_by_hand(response, gold):
    assert GOLD("add 3 4 ->", response) == pytest.approx(gold, abs=1e-12)


def test_gold_reward_counts_repeats_beyond_the_answer():
    assert GOLD("repeat cat cat ->", "cat cat") == 1.0                       # the answer itself repeats
    assert GOLD("repeat cat cat ->", "cat cat cat") == pytest.approx(-0.05 - 0.1)
    assert GoldReward(length_cost=0.0, repeat_cost=0.0, flattery_cost=0.0)("add 3 4 ->", "great 7") == 1.0
    assert gold_reward(["add 1 1 ->", "color of snow ->"], ["2", FACTS["snow"]]) == [1.0, 1.0]


def test_unbiased_noiseless_annotator_follows_gold():
    rng = random.Random(0)
    judge = Annotator(length_bias=0.0, flattery_bias=0.0, sharpness=50.0)
    wins = sum(judge.prefers_first("add 3 4 ->", "7", "well 7", rng) for _ in range(4000))
    assert wins / 4000 == pytest.approx(1 / (1 + math.exp(-50.0 * 0.05)), abs=0.015)  # gold 1.0 vs 0.95
    rows = pairwise_rows(all_prompts(), 400, seed=1, annotator=judge)
    agree = sum(GOLD(r["prompt"], r["chosen"]) >= GOLD(r["prompt"], r["rejected"]) for r in rows)
    assert agree / len(rows) >= 0.97


def test_bradley_terry_probability_and_noise():
    rng = random.Random(1)
    judge = Annotator(length_bias=0.0, flattery_bias=0.0, sharpness=4.0)
    # gold 1.0 vs 0.0: P = σ(4) = 0.982
    p = sum(judge.prefers_first("add 3 4 ->", "7", "5", rng) for _ in range(20000)) / 20000
    assert p == pytest.approx(0.9820, abs=0.005)
    coin = Annotator(noise=1.0)
    p = sum(coin.prefers_first("add 3 4 ->", "7", "5", rng) for _ in range(20000)) / 20000
    assert p == pytest.approx(0.5, abs=0.015)


def test_biased_annotators_like_flattery_and_length():
    judge = Annotator()  # defaults: length 0.08, flattery 0.3
    assert judge.utility("add 3 4 ->", "great question 7") > judge.utility("add 3 4 ->", "7")
    assert GOLD("add 3 4 ->", "great question 7") < GOLD("add 3 4 ->", "7")
    rows = pairwise_rows(all_prompts(), 3000, seed=2)
    flattery = lambda s: sum(w in ("great", "question", "excellent", "brilliant", "wonderful") for w in s.split())  # noqa: E731
    decided = [r for r in rows if flattery(r["chosen"]) != flattery(r["rejected"])]
    assert sum(flattery(r["chosen"]) > flattery(r["rejected"]) for r in decided) / len(decided) > 0.55
    # "well 7" (gold 0.95, 2 words) against "7" (gold 1.0): the length bias tips the choice to the longer one
    rng = random.Random(3)
    biased = sum(judge.prefers_first("add 3 4 ->", "well 7", "7", rng) for _ in range(8000)) / 8000
    fair = sum(Annotator(length_bias=0.0, flattery_bias=0.0).prefers_first("add 3 4 ->", "well 7", "7", rng)
               for _ in range(8000)) / 8000
    assert biased == pytest.approx(1 / (1 + math.exp(-4.0 * (0.95 + 0.16 - 1.08))), abs=0.015) and biased > 0.5
    assert fair == pytest.approx(1 / (1 + math.exp(-4.0 * -0.05)), abs=0.015) and fair < 0.5


def test_plackett_luce_ranking_frequencies():
    """Top choice of three with utilities u: P(first = i) = softmax(sharpness · u)_i."""
    judge = Annotator(length_bias=0.0, flattery_bias=0.0, sharpness=2.0)
    responses = ["7", "well 7", "5"]                         # gold 1.0, 0.95, 0.0
    rng = random.Random(5)
    firsts = Counter(judge.rank("add 3 4 ->", responses, rng)[0] for _ in range(20000))
    z = [math.exp(2.0 * u) for u in (1.0, 0.95, 0.0)]
    for r, w in zip(responses, z):
        assert firsts[r] / 20000 == pytest.approx(w / sum(z), abs=0.012)


def test_data_sets_are_seeded_and_well_formed():
    prompts, _ = split_prompts(0)
    assert sft_rows(prompts, 50, seed=1) == sft_rows(prompts, 50, seed=1) != sft_rows(prompts, 50, seed=2)
    demos = sft_rows(prompts, 2000, seed=1)
    right = sum(GOLD(r["prompt"], r["completion"]) > 0.5 for r in demos) / len(demos)
    assert 0.5 < right < 0.75                                 # SFT_STYLE: 60% right
    for r in ranked_rows(prompts, 30, seed=1, k=4):
        assert len(set(r["responses"])) == 4 and r["prompt"] in prompts
    for r in pairwise_rows(prompts, 30, seed=1):
        assert r["chosen"] != r["rejected"]
    labels = [r["label"] for r in unary_rows(prompts, 2000, seed=1)]
    assert 0.2 < sum(labels) / len(labels) < 0.8


def test_write_response_and_corpus_cover_the_world():
    rng = random.Random(0)
    seen = {write_response("color of snow ->", rng) for _ in range(300)}
    assert FACTS["snow"] in seen and len(seen) > 5
    lines = corpus(1000, seed=0)
    assert len(lines) == 1000
    assert all(f"{p} {' '.join(answer(p))}" in lines for p in all_prompts())  # every fact is stated once


def test_drift_measures_by_hand():
    got = W.drift(["add 1 2 ->"] * 4, ["3", "great question 3", "well 3 3", "brilliant wonderful so"])
    assert got == {"flattery": 0.5, "repetition": 0.25, "filler": 0.5, "words": 2.5}


def test_candidates_cover_flattery_counts_and_off_task_answers_and_experts_differ():
    rng = random.Random(0)
    texts = [W.write_response("add 3 4 ->", rng, W.CANDIDATE_STYLE) for _ in range(4000)]
    counts = {sum(w in W.FLATTERY for w in t.split()) for t in texts}
    assert {0, 1, 2, 3} <= counts
    assert any(not any(w in W.NUMBERS for w in t.split()) for t in texts)  # off-task answers exist
    # the experts dislike flattery where the crowd likes it
    plain, flattering = "7", "great 7"
    assert W.CROWD.utility("add 3 4 ->", flattering) > W.CROWD.utility("add 3 4 ->", plain)
    assert W.EXPERTS.utility("add 3 4 ->", flattering) < W.EXPERTS.utility("add 3 4 ->", plain)
