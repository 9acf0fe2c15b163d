"""The rollout engine: KV-cache sampling equals a full forward, padding changes nothing, EOS stops a row."""

import math

import pytest
import torch

from alignkit.rl.rollout import generate, sample, top_p_filter


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


PROMPTS = [[1, 30, 31, 32, 7], [1, 12], [1, 40, 41, 5]]


def test_top_p_keeps_the_smallest_nucleus():
    """p = (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps the first two (0.5 < 0.7 ≤ 0.8); top_p 0.5 keeps one."""
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampled_logps_equal_a_full_forward_at_the_temperature(model64, tokenizer):
    g = torch.Generator().manual_seed(0)
    r = generate(model64, PROMPTS, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                 max_new_tokens=6, temperature=0.7, top_p=0.9, generator=g)
    for i, prompt in enumerate(PROMPTS):
        n = int(r.response_mask[i].sum())
        ids = torch.tensor([prompt + r.response_ids[i, :n].tolist()])
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0].double()
        oracle = [float((logits[len(prompt) - 1 + k] / 0.7).log_softmax(-1)[ids[0, len(prompt) + k]])
                  for k in range(n)]
        torch.testing.assert_close(r.logps[i, :n], torch.tensor(oracle, dtype=r.logps.dtype), rtol=0, atol=1e-6)
        assert float(r.logps[i, n:].abs().sum()) == 0.0


def test_left_padding_changes_nothing_greedy(model64, tokenizer):
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=5, temperature=1e-6)
    batched = generate(model64, PROMPTS, **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model64, [prompt], **kw)
        n = int(alone.response_mask[0].sum())
        assert batched.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()


def test_eos_ends_a_row_and_seeds_reproduce(model64, tokenizer):
    eos = tokenizer.eos_token_id
    boost = torch.zeros(model64.config.vocab_size, dtype=torch.float64)
    boost[eos] = 2.0  # make EOS likely enough that some rows end early and some do not
    hook = model64.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    try:
        runs = [generate(model64, PROMPTS * 4, pad_id=tokenizer.pad_token_id, eos_id=eos, max_new_tokens=8,
                         temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    finally:
        hook.remove()
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    r = runs[0]
    for row, mask, finished in zip(r.response_ids, r.response_mask, r.finished):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        if finished:
            assert int(row[n - 1]) == eos and eos not in row[:n - 1].tolist()
            assert (row[n:] == tokenizer.pad_token_id).all()
        else:
            assert n == r.response_ids.shape[1]
    assert 0 < int(r.finished.sum()) < len(r.finished)


def test_repeated_prompts_are_encoded_once_and_score_like_a_full_forward(model64, tokenizer):
    """The K samples of a prompt share one prompt pass (its KV cache copied row-wise): each row's sampled
    log-probs still equal a full forward of that row alone, and rows of one prompt differ."""
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 + [PROMPTS[2]]
    r = generate(model64, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                 max_new_tokens=6, temperature=1.3, generator=torch.Generator().manual_seed(1))
    assert r.prompt_ids.shape[0] == len(prompts)
    for i, prompt in enumerate(prompts):
        n = int(r.response_mask[i].sum())
        ids = torch.tensor([prompt + r.response_ids[i, :n].tolist()])
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0].double() / 1.3
        oracle = [float(logits[len(prompt) - 1 + k].log_softmax(-1)[ids[0, len(prompt) + k]]) for k in range(n)]
        torch.testing.assert_close(r.logps[i, :n], torch.tensor(oracle, dtype=r.logps.dtype), rtol=0, atol=1e-6)
    assert len({tuple(row.tolist()) for row in r.response_ids[:3]}) > 1


def test_sampler_draws_from_the_distribution():
    """Inverse-CDF sampling: frequencies match p within 5 standard errors; a token of p = 0 is never drawn."""
    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(p.expand(1000, -1), g) for _ in range(20)])
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    se = (p.double() * (1 - p.double()) / len(draws)).sqrt()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), freq
    assert freq[1] == 0 and freq[5] == 0


def test_two_level_sampler_draws_what_one_float64_inverse_cdf_draws():
    """The block-then-inside inversion picks the token a single float64 cumulative sum over the whole
    vocabulary picks for the same uniform number (vocabularies not a multiple of the block, top-p zeros)."""
    from alignkit.rl.rollout import SAMPLE_BLOCK

    g = torch.Generator().manual_seed(5)
    for vocab in (7, SAMPLE_BLOCK, 1000, 32009):
        logits = torch.randn(64, vocab, generator=g) * 4
        probs = top_p_filter(logits, 0.9).softmax(-1)
        u = torch.rand((64, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(vocab))
        cdf = probs.double().cumsum(-1)
        oracle = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=vocab - 1)
        got = sample(probs, torch.Generator().manual_seed(vocab))
        assert torch.equal(got, oracle), vocab
        assert (probs.gather(-1, got[:, None]) > 0).all()


def test_sampler_never_draws_a_zero_probability_token_at_the_top_of_a_block(monkeypatch):
    """A draw at the very end of the distribution (u → 1) lands on the last token of positive probability,
    not on the zeros that follow it or on the block's padding."""
    probs = torch.zeros(3, 600)
    probs[:, [3, 300, 511]] = torch.tensor([0.2, 0.3, 0.5])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, 1 - 2 ** -53, dtype=torch.float64))
    assert sample(probs, None).tolist() == [511, 511, 511]


def test_few_row_output_layer_gives_the_plain_numbers_and_is_put_back(tiny_model_dir, tokenizer, monkeypatch):
    """A decoding step of few rows on CPU runs the output layer as (W·hᵀ)ᵀ: the same tokens and log-probs as
    the plain h·Wᵀ (float32), the head's forward restored afterwards — also when generation fails — and never
    on a head with a hook."""
    from transformers import AutoModelForCausalLM

    import alignkit.rl.rollout as rollout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = model.get_output_embeddings()

    def run():
        return generate(model, PROMPTS * 2, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                        max_new_tokens=6, generator=torch.Generator().manual_seed(3))

    swapped = []
    monkeypatch.setattr(torch, "mm", lambda *a, _mm=torch.mm: swapped.append(1) or _mm(*a))
    fast = run()
    assert swapped and "forward" not in vars(head)
    monkeypatch.setattr(rollout, "FEW_ROWS_PER_THREAD", 0)  # the plain product
    swapped.clear()
    plain = run()
    assert not swapped
    assert torch.equal(fast.response_ids, plain.response_ids)
    torch.testing.assert_close(fast.logps, plain.logps, rtol=0, atol=1e-5)
    monkeypatch.setattr(rollout, "FEW_ROWS_PER_THREAD", 8)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rollout, "_prefill", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert "forward" not in vars(head)
    monkeypatch.undo()
    handle = head.register_forward_hook(lambda module, args, out: None)
    with rollout._few_row_head(model, 2):
        assert "forward" not in vars(head)
    handle.remove()
    with rollout._few_row_head(model, 2):
        assert "forward" in vars(head)
        few = torch.randn(1, 2, head.in_features)
        torch.testing.assert_close(head(few), torch.nn.functional.linear(few, head.weight), rtol=0, atol=1e-6)
        many = torch.randn(1, 8 * torch.get_num_threads() + 1, head.in_features)  # a whole prompt's positions
        assert torch.equal(head(many), torch.nn.functional.linear(many, head.weight))
    assert "forward" not in vars(head)
