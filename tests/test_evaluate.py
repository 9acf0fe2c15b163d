"""Policy evaluation on held-out prompts: the sequence KL against a padded oracle, seeded samples, scores."""

import pytest
import torch

from alignkit.data.collate import Tokenized, collate_sequences
from alignkit.models.logps import sequence_logps
from alignkit.rl.evaluate import evaluate_policy


def _models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return policy, reference


def test_kl_equals_a_padded_oracle_and_samples_are_seeded(tiny_model_dir, tokenizer):
    policy, reference = _models(tiny_model_dir)
    texts = ["copy cat dog ->", "name a red fox ->", "list ->"]
    prompts = [(t, tokenizer(t).input_ids) for t in texts]
    ev = evaluate_policy(policy, tokenizer, prompts, reference=reference, samples_per_prompt=3, max_new_tokens=6,
                         temperature=0.9, seed=4, batch_size=4)  # 4 // 3 = one prompt per chunk
    assert len(ev.responses) == 9 and ev.prompts == [t for t in texts for _ in range(3)]
    again = evaluate_policy(policy, tokenizer, prompts, reference=reference, samples_per_prompt=3, max_new_tokens=6,
                            temperature=0.9, seed=4, batch_size=4)
    assert again.responses == ev.responses  # the same seed (and chunking) gives the same samples
    torch.testing.assert_close(again.kl, ev.kl, rtol=0, atol=1e-9)

    # oracle: both models on a plain padded batch of the sampled sequences, at the same temperature
    seqs = [Tokenized(ids + out, [False] * len(ids) + [True] * len(out))
            for (_, ids), out in zip([p for p in prompts for _ in range(3)], ev.response_ids)]
    assert [len(r) for r in ev.response_ids] == ev.lengths.tolist()
    batch = collate_sequences(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        want = sequence_logps(policy, batch, 0.9).logps - sequence_logps(reference, batch, 0.9).logps
    torch.testing.assert_close(ev.kl.double(), want, rtol=0, atol=1e-6)
    assert ev.summary()["kl"] == pytest.approx(float(want.mean()), abs=1e-6)


def test_scores_gold_and_zero_kl_against_itself(tiny_model_dir, tokenizer):
    policy, _ = _models(tiny_model_dir)
    prompts = [(t, tokenizer(t).input_ids) for t in ["copy cat ->", "list ->"]]
    ev = evaluate_policy(policy, tokenizer, prompts, reference=policy, samples_per_prompt=2, max_new_tokens=5,
                         gold=lambda ps, rs: [len(r.split()) for r in rs], seed=1)
    assert float(ev.kl.abs().max()) == 0.0  # both sides come from the same packed forward
    assert ev.gold.tolist() == [len(r.split()) for r in ev.responses]
    assert set(ev.summary()) == {"kl", "response_length", "reward/gold"}


def test_each_chunk_draws_from_its_own_seed(tiny_model_dir, tokenizer):
    """How many draws one chunk uses (here: 1 vs 6 tokens per row) does not change the next chunk's draws, so
    two policies get matched samples chunk after chunk."""
    policy, reference = _models(tiny_model_dir)
    prompts = [(t, tokenizer(t).input_ids) for t in ["copy cat ->", "list ->", "name a dog ->", "copy red ->"]]
    short = evaluate_policy(policy, tokenizer, prompts, reference=reference, samples_per_prompt=2, max_new_tokens=1,
                            seed=5, batch_size=4)
    long = evaluate_policy(policy, tokenizer, prompts, reference=reference, samples_per_prompt=2, max_new_tokens=6,
                           seed=5, batch_size=4)
    assert [r[:1] for r in long.response_ids] == [r[:1] for r in short.response_ids]


def test_no_prompts_or_zero_temperature_is_an_error(tiny_model_dir, tokenizer):
    policy, _ = _models(tiny_model_dir)
    with pytest.raises(ValueError):
        evaluate_policy(policy, tokenizer, [], reference=policy)
    with pytest.raises(ValueError):
        evaluate_policy(policy, tokenizer, [("list ->", tokenizer("list ->").input_ids)], reference=policy,
                        temperature=0.0)
