"""Online RLHF: each algorithm raises a rule reward within 40 iterations of 16 rollouts × 12 tokens, the
adaptive KL controller moves β towards its target, monitors are logged, and a crashed run resumes exactly."""

import json
import random

import pytest
import torch

from alignkit.config import PPOConfig
from alignkit.examples import ANIMALS, COLORS, write_jsonl
from alignkit.train.ppo import train_ppo

RULE = "python:alignkit.examples:good_word_share"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = random.Random(0)
    rows = [{"prompt": f"describe the {rng.choice(COLORS)} {rng.choice(ANIMALS)} ->"} for _ in range(200)]
    return str(write_jsonl(tmp_path_factory.mktemp("ppo") / "prompts.jsonl", rows))


def _cfg(model, data, out, **kw):
    args = dict(model=model, data=(data,), output_dir=str(out), reward_fn=RULE, max_steps=40, rollout_batch_size=4,
                samples_per_prompt=4, max_new_tokens=12, lr=1e-3, kl_coef=0.01)
    args.update(kw)
    return PPOConfig(**args)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_each_algorithm_raises_the_rule_reward(tmp_path, tiny_model_dir, prompts_file, algo):
    out = tmp_path / algo
    train_ppo(_cfg(tiny_model_dir, prompts_file, out, algo=algo))
    m = _metrics(out)
    first, final = sum(x["reward/score"] for x in m[:5]) / 5, sum(x["reward/score"] for x in m[-5:]) / 5
    assert final - first >= 0.08, (first, final)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the reference policy
    for key in ("kl", "kl_coef", "response_length", "entropy", "clipfrac", "policy_loss", "loss", "lr",
                "tokens_per_s", "hacking/length_ratio", "hacking/reward_length_corr", "hacking/distinct_2",
                "hacking/repetition", "hacking/flag"):
        assert all(key in x and x[key] == x[key] for x in m), key  # logged and finite
    if algo == "ppo":  # a value model that learns: its loss is positive and falls
        assert all(x["value_loss"] > 0 for x in m)
        assert sum(x["value_loss"] for x in m[-5:]) < sum(x["value_loss"] for x in m[:5])
    else:  # no value model: no value loss to log
        assert not any("value_loss" in x for x in m)
    assert all(x["tokens_per_s"] > 0 for x in m)
    assert (out / "final" / "model.safetensors").is_file()


def test_reward_model_ensemble_and_gold(tmp_path, tiny_model_dir, prompts_file):
    """Two reward models (uwo), a held-out one and a gold function: ensemble spread, held-out score and gold
    are logged every iteration."""
    from alignkit.config import RewardConfig
    from alignkit.examples import pairwise_rows
    from alignkit.train.reward import train_reward

    data = write_jsonl(tmp_path / "pairs.jsonl", pairwise_rows(64, seed=3))
    rms = []
    for seed in (0, 1):
        out = tmp_path / f"rm{seed}"
        train_reward(RewardConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=4,
                                  batch_size=8, lr=1e-3, seed=seed))
        rms.append(str(out / "final"))
    out = tmp_path / "run"
    train_ppo(_cfg(tiny_model_dir, prompts_file, out, algo="rloo", max_steps=3, reward_fn="", reward_models=tuple(rms),
                   ensemble="uwo", gold_fn=RULE, heldout_reward_models=(rms[1],), hacking_window=1, hacking_patience=1,
                   hacking_kl_budget=1e-6))
    m = _metrics(out)
    assert all(x["hacking/ensemble_std"] > 0 and 0 <= x["reward/gold"] <= 1 for x in m)
    assert all(x["reward/heldout"] == x["reward/heldout"] for x in m)
    # a detector with a window of 1 compares from iteration 2 on: the first update moved the policy past a KL
    # budget of 1e-6, so it flags there (not before: no baseline yet), keeps best/ and says why
    assert [x["hacking/flag"] for x in m] == [0.0, 1.0, 1.0] and m[1]["kl"] > 1e-6
    record = json.loads((out / "hacking.json").read_text())
    assert record["flag_step"] == 2 and "over the budget" in record["reasons"][0]
    assert (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "final" / "alignkit_run.json").read_text())["hacking"] == record


def test_kl_target_moves_the_coefficient_towards_it(tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "adaptive"
    train_ppo(_cfg(tiny_model_dir, prompts_file, out, algo="rloo", max_steps=12, kl_target=0.05, kl_horizon=200))
    m = _metrics(out)
    assert m[-1]["kl"] > 0.05 and m[-1]["kl_coef"] > 0.01  # KL above target → β grows


def test_crash_and_resume_gives_identical_weights(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    from safetensors.torch import load_file

    from alignkit.train import ppo

    cfg = lambda out: _cfg(tiny_model_dir, prompts_file, out, algo="ppo", max_steps=6, save_every=2)  # noqa: E731
    train_ppo(cfg(tmp_path / "straight"))
    real, calls = ppo.ppo_update, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", crashing)
    with pytest.raises(RuntimeError):
        train_ppo(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(ppo, "ppo_update", real)
    train_ppo(cfg(tmp_path / "resumed"))
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("share", [True, False])
def test_packed_rollout_log_probs_and_values_equal_padded_ones(tiny_model_dir, tokenizer, share):
    """Prefix-shared blocks ([prompt | sample 1 | … | sample K]), several per row (4D mask), give each sampled
    token the log-prob and value a plain padded forward of its own sequence gives, in the row-major order of
    the response mask."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.collate import Tokenized, collate_sequences
    from alignkit.models.load import load_reward_model
    from alignkit.models.logps import packed_target_logps, packed_token_values, sequence_logps, token_values
    from alignkit.rl.responses import RolloutPacker, scatter_tokens

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    value = load_reward_model(tiny_model_dir, tokenizer).double().eval()
    torch.nn.init.normal_(value.score.weight, std=0.5)
    prompts = [[1, 30, 31, 32, 7]] * 3 + [[1, 12]] * 3
    rng = random.Random(0)
    responses = [[rng.randrange(5, 60) for _ in range(rng.randint(1, 6))] for _ in prompts]
    mask = torch.zeros((len(prompts), 6), dtype=torch.bool)
    for i, r in enumerate(responses):
        mask[i, :len(r)] = True
    pack = RolloutPacker(prompts, responses, [i // 3 for i in range(6)], tokenizer.pad_token_id, share)
    for indices in ([0, 1, 2, 3, 4, 5], [1, 2, 4]):
        batch = pack(indices)
        assert batch.size <= (len({i // 3 for i in indices}) if share else len(indices))
        sub = mask[indices]
        with torch.no_grad():
            got = scatter_tokens(packed_target_logps(policy, batch, 0.8), sub)
            got_v = scatter_tokens(packed_token_values(value, batch), sub)
            padded = collate_sequences([Tokenized(prompts[i] + responses[i], [False] * len(prompts[i]) +
                                                  [True] * len(responses[i])) for i in indices],
                                       tokenizer.pad_token_id)
            want = sequence_logps(policy, padded, 0.8)
            want_v = token_values(value, padded)
        for row, i in enumerate(indices):
            n, p = len(responses[i]), len(prompts[i])
            torch.testing.assert_close(got[row, :n].double(), want.token_logps[row, p - 1:p - 1 + n], rtol=0, atol=1e-6)
            torch.testing.assert_close(got_v[row, :n].double(), want_v[row, p - 1:p - 1 + n], rtol=0, atol=1e-6)
            assert float(got[row, n:].abs().sum()) == 0.0


def test_first_fit_rows_packs_longest_first_within_capacity():
    from alignkit.data.collate import first_fit_rows

    assert first_fit_rows([5, 3, 4, 2], 7) == [[0, 3], [1, 2]]
    assert first_fit_rows([9, 2], 7) == [[0], [1]]  # too long for the capacity: a row of its own
    rows = first_fit_rows([3, 1, 4, 1, 5, 9, 2, 6], 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum([3, 1, 4, 1, 5, 9, 2, 6][i] for i in r) <= 10 for r in rows) and len(rows) == 4


def test_reward_models_score_packed_rows_like_padded_ones(tmp_path, tiny_model_dir):
    """The scorer's padding-free, prompt-sharing rows give each response the score plain padding gives."""
    from alignkit.rewards import Scorer

    scorers = []
    for share in (True, False):
        scorer = Scorer(_cfg(tiny_model_dir, "unused", tmp_path, reward_model=tiny_model_dir, reward_fn="",
                             prefix_sharing=share))
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            scorer.models[0][0].score.weight.normal_(0, 1.0)
        scorers.append(scorer)
    prompts = ["describe the red cat ->"] * 3 + ["describe the blue dog ->"] * 2 + ["a ->"]
    responses = ["good good", "red", "", "bad cat dog dog", "blue", "green fox good"]
    packed, _ = scorers[0](prompts, responses)
    padded, _ = scorers[1](prompts, responses)
    assert scorers[0].prefix_sharing is True
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
    assert packed.std() > 0


def test_value_model_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, prompts_file):
    from alignkit.errors import UserError
    from alignkit.models.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other", ["zebra", "quokka", "axolotl"], seed=1)
    with pytest.raises(UserError, match="vocabulary differs"):
        train_ppo(_cfg(tiny_model_dir, prompts_file, tmp_path / "run", algo="ppo", value_model=str(other), max_steps=1))


def test_stop_on_hacking_stops_at_the_flag_and_keeps_best(tmp_path, tiny_model_dir, prompts_file):
    """Without a KL penalty the good-word rule is hacked by repeating good words: the detector sees distinct-2
    collapse (it never reads the reward's definition), flags, keeps best/, and stop_on_hacking ends the run."""
    out = tmp_path / "hack"
    train_ppo(_cfg(tiny_model_dir, prompts_file, out, algo="rloo", kl_coef=0.0, stop_on_hacking=True, max_steps=80))
    m = _metrics(out)
    record = json.loads((out / "hacking.json").read_text())
    assert record["flagged"] and any("distinct-2" in r for r in record["reasons"]), record
    assert m[-1]["step"] == record["flag_step"] < 80
    assert m[-1]["hacking/flag"] == 1.0 and all(x["hacking/flag"] == 0.0 for x in m[:-1])
    assert (out / "best" / "model.safetensors").is_file() and (out / "final" / "model.safetensors").is_file()
    evaluations = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluations] == [1, record["flag_step"]]
    from alignkit.examples import GOOD

    assert evaluations[-1]["rising_tokens"][0]["token"] in GOOD  # what the policy learned to say more
    assert m[-1]["hacking/repetition"] > m[0]["hacking/repetition"]


def test_reward_models_score_what_was_sampled(tmp_path, tiny_model_dir):
    """A reward model with the policy's vocabulary scores the sampled ids; one read through text gets the same
    sequence back (EOS only after a finished response), and the EOS changes the score (it is seen)."""
    from alignkit.data.collate import Tokenized
    from alignkit.data.tokenize import Encoder
    from alignkit.models.load import load_tokenizer
    from alignkit.rewards import Scorer

    tok = load_tokenizer(tiny_model_dir)
    scorer = Scorer(_cfg(tiny_model_dir, "unused", tmp_path, reward_model=tiny_model_dir, reward_fn=""),
                    policy_tokenizer=tok)
    assert scorer.models[0][3]  # same vocabulary: scores token ids
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        scorer.models[0][0].score.weight.normal_(0, 1.0)
    enc = Encoder(tok, 512, 256)
    prompts = ["describe the red cat ->"] * 2 + ["describe the blue dog ->"] * 2
    responses = ["good good", "good good", "bad cat", "bad cat"]
    finished = [True, False, True, False]
    sampled = []
    for p, r, done in zip(prompts, responses, finished):
        ids = enc.response_ids(p, r)
        sampled.append(Tokenized(enc.prompt_ids(p) + (ids if done else ids[:-1]),
                                 [False] * len(enc.prompt_ids(p)) + [True] * (len(ids) - (not done))))
    by_ids, _ = scorer(prompts, responses, finished, sampled)
    scorer.models[0] = scorer.models[0][:3] + (False,)
    by_text, _ = scorer(prompts, responses, finished, sampled)
    torch.testing.assert_close(by_ids, by_text, rtol=1e-5, atol=1e-5)
    assert abs(float(by_ids[0] - by_ids[1])) > 1e-4 and abs(float(by_ids[2] - by_ids[3])) > 1e-4


def test_lora_policy_uses_its_disabled_adapters_as_the_reference(tmp_path, tiny_model_dir, prompts_file):
    """With LoRA there is no second model: the reference is the policy with adapters off. LoRA starts as the
    identity (B = 0), so the first iteration's KL is 0; later ones are not, and final/ is a merged model."""
    out = tmp_path / "lora"
    train_ppo(_cfg(tiny_model_dir, prompts_file, out, algo="grpo", lora_r=4, lora_alpha=8, max_steps=4, lr=1e-2))
    m = _metrics(out)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert any(abs(x["kl"]) > 1e-4 for x in m[1:])
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final" / "adapter_config.json").exists()


def test_a_nan_reward_stops_the_run_after_max_bad_steps(tmp_path, tiny_model_dir, prompts_file, monkeypatch):
    """Non-finite updates are skipped, counted, and end the run with a TrainingError after max_bad_steps."""
    from alignkit.errors import TrainingError

    (tmp_path / "nan_reward.py").write_text("def f(prompts, responses):\n    return [float('nan')] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TrainingError, match="2 non-finite iterations in a row"):
        train_ppo(_cfg(tiny_model_dir, prompts_file, tmp_path / "nan", algo="rloo", reward_fn="python:nan_reward:f",
                       max_bad_steps=2, max_steps=10))


def test_held_out_prompts_are_evaluated_at_the_start_every_eval_every_and_at_the_end(tmp_path, tiny_model_dir,
                                                                                   prompts_file):
    out = tmp_path / "evals"
    train_ppo(_cfg(tiny_model_dir, prompts_file, out, algo="grpo", max_steps=5, eval_every=2, eval_fraction=0.1,
                   eval_samples_per_prompt=2, gold_fn=RULE, eval_fn="python:alignkit.lab.world:drift", lr=3e-3))
    m = _metrics(out)
    evals = [x for x in m if "eval/reward/gold" in x]
    for x in evals:  # eval_fn's measures of the held-out samples, under eval/
        assert {"eval/flattery", "eval/repetition", "eval/filler", "eval/words"} <= set(x)
        assert 0 <= x["eval/flattery"] <= 1 and x["eval/words"] >= 0
    assert all(x["reward/score_std"] >= 0 for x in m if "reward/score" in x)
    assert [x["step"] for x in evals] == [0, 2, 4, 5]
    assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # the start policy is the reference
    assert evals[-1]["eval/kl"] != evals[0]["eval/kl"]
    for x in evals:
        assert {"eval/reward/score", "eval/response_length"} <= set(x)
    assert len([x for x in m if x["step"] == 2]) == 1  # one object per step: training and eval metrics together


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_old_log_probs_come_from_the_sampler_only_in_float32(tiny_model_dir, tokenizer, compute_dtype):
    """One update per rollout reuses the sampler's log-probs in float32; under bf16 autocast they come from a
    packed forward like the update's, so that the first ratio is exactly 1."""
    from transformers import AutoModelForCausalLM

    from alignkit.models.logps import packed_target_logps
    from alignkit.models.precision import autocast_context
    from alignkit.rl.responses import RolloutPacker, scatter_tokens
    from alignkit.rl.rollout import generate
    from alignkit.train.ppo import measure

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = [tokenizer("copy cat dog ->").input_ids] * 2 + [tokenizer("list ->").input_ids] * 2
    rollout = generate(policy, ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=5,
                       generator=torch.Generator().manual_seed(0))
    responses = [r[m].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]
    everything = RolloutPacker(ids, responses, [0, 0, 1, 1], tokenizer.pad_token_id)([0, 1, 2, 3])
    cfg = PPOConfig(model=tiny_model_dir, data=("x",), algo="rloo", samples_per_prompt=2, reward_fn=RULE)
    old, ref, _ = measure(cfg, policy, policy, None, everything, rollout, rollout.response_mask, compute_dtype, True)
    with torch.no_grad(), autocast_context(compute_dtype):
        forward = scatter_tokens(packed_target_logps(policy, everything), rollout.response_mask)
    if compute_dtype is None:
        assert torch.equal(old, scatter_tokens(rollout.logps[rollout.response_mask], rollout.response_mask))
        torch.testing.assert_close(old, forward, rtol=0, atol=1e-5)
    else:
        assert torch.equal(old, forward)
    assert torch.equal(ref, forward)  # the reference here is the policy itself


def _unit_cfg(algo, **kw):
    return PPOConfig(model="m", data=("x",), reward_fn=RULE, algo=algo, samples_per_prompt=2, **kw)


def test_compute_advantages_by_hand():
    """Two samples of one prompt: row 0 has 2 tokens (log-probs 0.2 and 0 above the reference), row 1 one
    token; scores (1, 0), β = 0.5, k1.
    ppo (γ = λ = 1, values (0.5, 0.25) and (0.1)): rewards row 0 = (−0.1, 1), row 1 = (0);
      A row 0: t1 = 1 − 0.25 = 0.75, t0 = −0.1 + 0.25 − 0.5 + 0.75 = 0.4; returns A + V = (0.9, 1.0);
      A row 1 = 0 − 0.1 = −0.1, return 0; the advantages (0.4, 0.75, −0.1) are then whitened.
    rloo: score − β·Σ KL = (0.9, 0); leave-one-out → (0.9, −0.9) on every token of each row.
    grpo: (1, 0) → (±0.5) / (std √0.5 + 1e-4) on every token; the KL is left to the loss."""
    from alignkit.train.ppo import compute_advantages

    mask = torch.tensor([[True, True], [True, False]])
    ref = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    old = ref + torch.tensor([[0.2, 0.0], [0.0, 0.0]])
    values = torch.tensor([[0.5, 0.25], [0.1, 0.0]])
    given = dict(scores=torch.tensor([1.0, 0.0]), old_logps=old, ref_logps=ref, mask=mask, kl_coef=0.5)
    adv, ret = compute_advantages(_unit_cfg("ppo", gamma=1.0, gae_lambda=1.0), values, **given)
    raw = torch.tensor([0.4, 0.75, -0.1])
    torch.testing.assert_close(adv[mask], (raw - raw.mean()) / (raw.var() + 1e-8).sqrt())
    torch.testing.assert_close(ret, torch.tensor([[0.9, 1.0], [0.0, 0.0]]))
    assert adv[1, 1] == 0.0
    adv, ret = compute_advantages(_unit_cfg("rloo"), None, **given)
    torch.testing.assert_close(adv, torch.tensor([[0.9, 0.9], [-0.9, 0.0]]))
    assert ret is None
    adv, _ = compute_advantages(_unit_cfg("grpo"), None, **given)
    a = 0.5 / (0.5 ** 0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([[a, a], [-a, 0.0]]))


def _first_update(tiny_model_dir, tokenizer, cfg, ref_shift=0.0):
    """One `ppo_update` of a fresh tiny policy on a rollout of 4 samples, with old log-probs from the same packed
    forward the update makes and random advantages; returns (stats, advantages, mask)."""
    from transformers import AutoModelForCausalLM

    from alignkit.models.logps import packed_target_logps
    from alignkit.rl.responses import sample_responses
    from alignkit.train.loop import build_optimizer
    from alignkit.train.ppo import ppo_update

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [(t, tokenizer(t).input_ids) for t in ("copy cat dog ->", "list ->")]
    batch = sample_responses(policy, tokenizer, prompts, 2, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    everything, mask = batch.pack_all(), batch.rollout.response_mask
    with torch.no_grad():
        from alignkit.rl.responses import scatter_tokens

        old = scatter_tokens(packed_target_logps(policy, everything), mask)
    advantages = torch.where(mask, torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)), 0.0)
    stats = ppo_update(cfg, policy, None, build_optimizer(policy, cfg), batch.pack, everything, mask, old,
                       torch.where(mask, old - ref_shift, 0.0), lambda values: (advantages, None), None, 0.1, None, 1)
    return stats, advantages, mask


def test_first_update_has_ratio_one_and_loss_minus_mean_advantage(tiny_model_dir, tokenizer):
    """At the first update the policy is the one that sampled: every ratio is 1 (not one token clipped even
    with a clip range of 1e-6), so the clipped loss is −mean(A) over the response tokens."""
    stats, advantages, mask = _first_update(tiny_model_dir, tokenizer, _unit_cfg("rloo", clip_range=1e-6, lr=1e-3))
    assert stats["clipfrac"] == 0.0
    assert stats["policy_loss"] == pytest.approx(-float(advantages[mask].mean()), rel=1e-6, abs=1e-7)
    assert stats["loss"] == stats["policy_loss"] and "value_loss" not in stats


def test_grpo_honours_the_kl_estimator(tiny_model_dir, tokenizer):
    """grpo adds β·mean KL_t to the loss, with the configured estimator; the reference sits 0.5 below the
    policy at every token (u = −0.5): k1 = 0.5, k3 = e^−0.5 − 1 + 0.5 ≈ 0.1065; β = 0.1. Empty = k3."""
    import math

    from alignkit.train.ppo import kl_estimator

    kl = {}
    for estimator in ("k1", "k3", ""):
        stats, _, _ = _first_update(tiny_model_dir, tokenizer, _unit_cfg("grpo", kl_estimator=estimator), 0.5)
        kl[estimator] = stats["loss"] - stats["policy_loss"]
    assert kl["k1"] == pytest.approx(0.1 * 0.5, rel=1e-5)
    assert kl["k3"] == pytest.approx(0.1 * (math.exp(-0.5) - 0.5), rel=1e-5)
    assert kl[""] == kl["k3"]
    assert kl_estimator(_unit_cfg("grpo")) == "k3" and kl_estimator(_unit_cfg("rloo")) == "k1"


def test_a_rollout_of_one_response_token_trains(tmp_path, tiny_model_dir, prompts_file):
    """One prompt, one sample, one token: the advantage whitening has a single entry (used to crash). The
    logged lr is the rate the iteration used."""
    from alignkit.cli import main

    out = tmp_path / "one"
    assert main(["ppo", "--model", tiny_model_dir, "--data", prompts_file, "--output-dir", str(out), "--reward-fn",
                 RULE, "--rollout-batch-size", "1", "--max-new-tokens", "1", "--max-steps", "2", "--lr", "1e-3",
                 "--lr-schedule", "linear"]) == 0
    m = _metrics(out)
    assert [x["response_length"] for x in m] == [1.0, 1.0] and all(x["loss"] == x["loss"] for x in m)
    assert [x["lr"] for x in m] == pytest.approx([1e-3, 5e-4])  # the rate each iteration used, not the next one


def test_resume_checks_the_settings_and_cuts_samples_back(tmp_path, tiny_model_dir, prompts_file):
    """A ppo checkpoint resumes only a run with the same settings; resuming cuts samples.jsonl back to the
    checkpoint's step, as metrics.jsonl is, so nothing is written twice."""
    import shutil

    from alignkit.errors import UserError

    out = tmp_path / "run"
    cfg = lambda **kw: _cfg(tiny_model_dir, prompts_file, out, algo="rloo", max_steps=4, save_every=2, **kw)  # noqa: E731
    train_ppo(cfg())
    shutil.move(out / "final", tmp_path / "old-final")  # as if killed after step 4's samples, before final/
    with pytest.raises(UserError, match=r"other settings \(rollout_batch_size 4 → 8\)"):
        train_ppo(cfg(rollout_batch_size=8))
    train_ppo(cfg())
    assert [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()] == [1, 4]
    assert [x["step"] for x in _metrics(out)] == [1, 2, 3, 4]


def test_ppo_applies_gradient_checkpointing_and_num_threads(tmp_path, tiny_model_dir, prompts_file):
    """The shared loop's fields work for ppo too: checkpointing on policy and value model (same numbers), the
    thread count set."""
    from safetensors.torch import load_file

    from alignkit.train.loop import run
    from alignkit.train.ppo import PPOTrainer

    threads = torch.get_num_threads()
    try:
        for checkpointing in (False, True):
            cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / str(checkpointing), algo="ppo", max_steps=2,
                       gradient_checkpointing=checkpointing, num_threads=1)
            trainer = PPOTrainer(cfg)
            run(cfg, trainer)
            assert trainer.policy.is_activation_checkpointing == checkpointing
            assert trainer.value.is_activation_checkpointing == checkpointing
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("False", "True"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_ppo_help_lists_only_fields_it_uses(capsys):
    from alignkit.cli import main

    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    text = capsys.readouterr().out
    assert "--rollout-batch-size" in text and "--gradient-checkpointing" in text and "--eval-batch-size" in text
    for gone in ("--batch-size ", "--grad-accum", "--group-by-length"):
        assert gone not in text, gone
    assert main(["ppo", "--model", "m", "--data", "x", "--reward-fn", RULE, "--batch-size", "4"]) == 2
    assert 'unknown field "batch_size"' in capsys.readouterr().err


def test_generate_fn_samples_the_rollouts_and_the_evaluations(tmp_path, tiny_model_dir, prompts_file):
    """`GenerateFn` is a real injection point: a backend given to train_ppo samples every rollout and every
    held-out evaluation (here a wrapper of the default that counts its calls)."""
    from alignkit.rl.rollout import generate

    calls = []

    def counting(model, prompts, **kw):
        calls.append(len(prompts))
        return generate(model, prompts, **kw)

    train_ppo(_cfg(tiny_model_dir, prompts_file, tmp_path / "run", algo="grpo", max_steps=2, eval_every=1,
                   eval_fraction=0.02, eval_samples_per_prompt=2), generate_fn=counting)
    # evaluations at steps 0, 1, 2 (4 held-out prompts × 2 samples, one batch each) and 2 rollouts of 4 × 4
    assert sorted(calls) == [8, 8, 8, 16, 16]
