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
                   ensemble="uwo", gold_fn=RULE, heldout_reward_models=(rms[1],)))
    m = _metrics(out)
    assert all(x["hacking/ensemble_std"] > 0 and 0 <= x["reward/gold"] <= 1 for x in m)
    assert all(x["reward/heldout"] == x["reward/heldout"] and x["hacking/flag"] == 0.0 for x in m)


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
    assert scorers[0].prefix_sharing == [True]
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
                   eval_samples_per_prompt=2, gold_fn=RULE, lr=3e-3))
    m = _metrics(out)
    evals = [x for x in m if "eval/reward/gold" in x]
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
