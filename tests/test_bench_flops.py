"""benchmarks/flops.py: the FLOP model behind every benchmark's utilisation, checked by hand on a toy shape
and against a real Llama's weights."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flops  # noqa: E402

# hidden 4, 1 layer, MLP 8, 2 heads of 2 (no GQA), vocabulary 10
TOY = flops.Shape(hidden=4, layers=1, intermediate=8, heads=2, kv_heads=2, head_dim=2, vocab=10)


def test_trunk_counts_the_matmul_weights_of_the_layers():
    """q, k, v, o: 4 matrices of 4×4 = 64; gate, up, down: 3 of 4×8 = 96; total 160."""
    assert TOY.trunk == 160
    assert TOY.params == 160 + 2 * 10 * 4


def test_trunk_matches_a_llama_with_grouped_query_attention():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    shape = flops.Shape.from_config(config.to_dict())
    assert shape.trunk == linear
    assert shape.params == linear + model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()


def test_forward_of_a_fresh_sequence():
    """3 positions: matmuls 2·160·3 = 960; causal (query, key) pairs 1+2+3 = 6, each 4·layers·heads·head_dim
    = 16 → 96; no logits. 1056."""
    assert flops.forward(TOY, 3) == 1056


def test_forward_after_a_prefix_with_logits_and_a_score():
    """2 positions after 3: matmuls 640; pairs 2·3 + (1+2) = 9 → 144; 2 logits 2·4·10·2 = 160; one score 2·4 = 8."""
    assert flops.forward(TOY, 2, past=3, logits=2) == 944
    assert flops.forward(TOY, 2, past=3, logits=2, scores=1) == 952
    assert flops.train(TOY, 2, past=3, logits=2) == 3 * 944


def test_a_preference_pair_computes_the_prompt_once():
    """Prompt 3, chosen 3, rejected 2 tokens. Prompt: 1056. Chosen: 2 positions after 3, 3 targets: 640 + 144 +
    240 = 1024. Rejected: 1 position after 3, 2 targets: 320 + 16·4 + 160 = 544. Forward 2624; trained 3×."""
    assert flops.pair(TOY, 3, 3, 2, trained=False) == 2624
    assert flops.pair(TOY, 3, 3, 2, trained=True) == 3 * 2624


def test_a_reward_pair_reads_one_score_per_response():
    """Prompt 1056; chosen 3 positions after 3: 960 + 16·(9+6) = 240, + 8 → 1208; rejected 2 after 3: 640 + 144
    + 8 = 792. Trained: 3·3056."""
    assert flops.pair(TOY, 3, 3, 2, trained=True, logits=False) == 3 * (1056 + 1208 + 792)


def test_sft_trains_prompt_and_completion_with_targets_on_the_completion():
    """Prompt 2 + completion 2: 3 positions (1056 without logits) + 2 targets 160 → 1216, trained 3648."""
    assert flops.sft(TOY, 2, 2) == 3648


def test_generation_feeds_back_all_but_the_last_token_and_projects_every_sampled_one():
    """Prompt 3 once (1056); 2 samples × 1 fed-back token after 3: 2·(320 + 16·4) = 768; 2·2 sampled tokens
    × 2·4·10 = 320. 2144."""
    assert flops.generate(TOY, 3, samples=2, new_tokens=2) == 2144


def test_a_grpo_step_is_generation_plus_trained_and_reference_log_probs():
    """One prompt of 3, 2 samples of 2 tokens: generation 2144; log-probs forward: prompt 1056 + 2·(1 position
    after 3 with 2 targets: 320 + 64 + 160 = 544) = 2144; trained 3·2144, reference 2144."""
    assert flops.grpo_step(TOY, [3], samples=2, new_tokens=2) == 2144 + 3 * 2144 + 2144
    assert flops.grpo_step(TOY, [3], samples=2, new_tokens=2, reference=False) == 2144 + 3 * 2144
