"""Tokenization conventions, collation, and the one log-prob function against an unpadded oracle."""

import pytest
import torch

from alignkit.data.collate import (
    Tokenized,
    TokenizedPair,
    TokenizedRanking,
    collate_pairs,
    collate_rankings,
    collate_sequences,
)
from alignkit.data.rows import PairRow, SFTRow
from alignkit.data.tokenize import DEFAULT_CHAT_TEMPLATE, Encoder
from alignkit.models.logps import reward_scores, sequence_logps


def words(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_prompt_completion_gets_bos_and_eos_and_masks_the_prompt(tokenizer):
    enc = Encoder(tokenizer, max_length=32, max_prompt_length=16)
    seq = enc.sft(SFTRow("copy cat dog ->", "cat dog", None, "x:1"))
    assert words(tokenizer, seq.ids) == ["<s>", "copy", "cat", "dog", "->", "cat", "dog", "</s>"]
    assert seq.loss_mask == [False] * 5 + [True] * 3


def test_eos_not_doubled_and_text_rows_train_on_everything(tokenizer):
    enc = Encoder(tokenizer, 32, 16)
    assert enc.response_ids("copy ->", "cat </s>")[-2:] == [enc.tokenizer.convert_tokens_to_ids("cat"), enc.eos_id]
    seq = enc.sft(SFTRow("", "the cat", None, "x:1"))
    assert words(tokenizer, seq.ids) == ["<s>", "the", "cat", "</s>"]
    assert seq.loss_mask == [False, True, True, True]
    full = enc.sft(SFTRow("copy ->", "cat", None, "x:1"), completion_only=False)
    assert all(full.loss_mask)


def test_truncation_keeps_prompt_end_and_bos_and_cuts_response_end(tokenizer):
    enc = Encoder(tokenizer, max_length=7, max_prompt_length=4)
    seq = enc.sft(SFTRow("copy red blue green ->", "cat dog owl bee", None, "x:1"))
    assert words(tokenizer, seq.ids[:4]) == ["<s>", "blue", "green", "->"]
    assert words(tokenizer, seq.ids[4:]) == ["cat", "dog", "owl"]  # response cut at its end: no EOS
    assert len(seq) == 7


def test_prompt_limit_defaults_to_half_of_max_length(tokenizer):
    """max_prompt_length 0 (the configs' default) = max_length // 2: with max_length 8 a 7-token prompt keeps
    BOS and its last 3 tokens; an explicit limit wins."""
    seq = Encoder(tokenizer, max_length=8).sft(SFTRow("copy red blue green gold ->", "cat dog owl bee", None, "x:1"))
    assert words(tokenizer, seq.ids) == ["<s>", "green", "gold", "->", "cat", "dog", "owl", "bee"]
    assert Encoder(tokenizer, max_length=8, max_prompt_length=0).max_prompt_length == 4
    assert Encoder(tokenizer, max_length=8, max_prompt_length=6).max_prompt_length == 6
    assert Encoder(tokenizer, max_length=2).max_prompt_length == 1


def test_messages_train_on_assistant_turns_only(tokenizer):
    enc = Encoder(tokenizer, 64, 32)
    messages = [{"role": "system", "content": "kind"}, {"role": "user", "content": "copy cat"},
                {"role": "assistant", "content": "cat"}, {"role": "user", "content": "copy dog"},
                {"role": "assistant", "content": "dog"}]
    seq = enc.sft(SFTRow(None, None, messages, "x:1"))
    trained = [w for w, m in zip(words(tokenizer, seq.ids), seq.loss_mask) if m]
    assert trained == ["cat", "</s>", "dog", "</s>"]
    assert words(tokenizer, seq.ids)[:4] == ["<s>", "system", ":", "kind"]


def test_default_template_and_conversational_response(tokenizer):
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # the word tokenizer ships none
    enc = Encoder(tokenizer, 64, 32)
    prompt = [{"role": "user", "content": "copy cat"}]
    assert words(tokenizer, enc.prompt_ids(prompt)) == ["<s>", "user", ":", "copy", "cat", "assistant", ":"]
    chosen = [{"role": "assistant", "content": "cat"}]
    assert words(tokenizer, enc.response_ids(prompt, chosen)) == ["cat", "</s>"]
    # a string prompt with a string response stays a plain concatenation
    assert words(tokenizer, enc.response_ids("copy cat ->", "cat")) == ["cat", "</s>"]


def test_collate_pads_and_positions(tokenizer):
    a, b = Tokenized([1, 5, 6], [False, True, True]), Tokenized([1, 7], [False, True])
    right = collate_sequences([a, b], pad_id=0)
    assert right.input_ids.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert right.position_ids.tolist() == [[0, 1, 2], [0, 1, 1]]
    left = collate_sequences([a, b], pad_id=0, padding_side="left")
    assert left.input_ids.tolist() == [[1, 5, 6], [0, 1, 7]]
    assert left.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert left.loss_mask.tolist() == [[False, True, True], [False, False, True]]
    assert right.num_targets == 3 and right.num_tokens == 5


def test_collate_pairs_and_rankings():
    t = lambda n: Tokenized(list(range(1, n + 1)), [False] + [True] * (n - 1))
    pb = collate_pairs([TokenizedPair(t(3), t(2), 1.5), TokenizedPair(t(4), t(2), None)], pad_id=0)
    assert pb.size == 2 and pb.sequences.input_ids.shape == (4, 4)
    assert pb.margin.tolist() == [1.5, 0.0]
    rb = collate_rankings([TokenizedRanking((t(2), t(3), t(2)), (0, 1, 1)), TokenizedRanking((t(2), t(2)), (0, 1))], 0)
    assert rb.index.tolist() == [[0, 1, 2], [3, 4, 0]]
    assert rb.mask.tolist() == [[True, True, True], [True, True, False]]
    assert rb.ties[0].tolist() == [0, 1, 1]


def _oracle_logps(model, seq: Tokenized) -> float:
    """One row, no padding, no batching: Σ log softmax(logits[t-1])[ids[t]] over target tokens t."""
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, seq.ids[t]]) for t in range(1, len(seq.ids)) if seq.loss_mask[t])


@pytest.fixture(scope="module")
def double_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()


def _ragged(tokenizer, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        plen, rlen = 2 + i % 3, 1 + (3 * i) % 5
        ids = torch.randint(5, len(tokenizer), (plen + rlen,), generator=g).tolist()
        seqs.append(Tokenized([1] + ids, [False] * (plen + 1) + [True] * rlen))
    return seqs


def test_logps_left_right_padding_match_unpadded_oracle(double_model, tokenizer):
    seqs = _ragged(tokenizer)
    oracle = torch.tensor([_oracle_logps(double_model, s) for s in seqs], dtype=torch.float64)
    with torch.no_grad():
        right = sequence_logps(double_model, collate_sequences(seqs, tokenizer.pad_token_id, "right"))
        left = sequence_logps(double_model, collate_sequences(seqs, tokenizer.pad_token_id, "left"))
    torch.testing.assert_close(right.logps, oracle, rtol=0, atol=1e-10)  # a float64 model stays float64
    torch.testing.assert_close(left.logps, oracle, rtol=0, atol=1e-10)
    assert right.lengths.tolist() == [sum(s.loss_mask) for s in seqs]
    assert torch.isfinite(left.token_logps).all()


def test_reward_scores_read_the_last_real_token_either_padding(tiny_model_dir, tokenizer):
    from alignkit.models.load import load_reward_model

    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, tokenizer).double().eval()
    torch.nn.init.normal_(model.score.weight)  # a non-zero head, so scores differ
    seqs = _ragged(tokenizer, n=4, seed=1)
    with torch.no_grad():
        single = torch.stack([model(input_ids=torch.tensor([s.ids])).logits[0, 0] for s in seqs])
        right = reward_scores(model, collate_sequences(seqs, tokenizer.pad_token_id, "right"))
        left = reward_scores(model, collate_sequences(seqs, tokenizer.pad_token_id, "left"))
    torch.testing.assert_close(right, single, rtol=0, atol=1e-10)
    torch.testing.assert_close(left, single, rtol=0, atol=1e-10)


def test_new_reward_head_starts_at_zero(tiny_model_dir, tokenizer):
    from alignkit.models.load import load_reward_model

    model = load_reward_model(tiny_model_dir, tokenizer)
    assert float(model.score.weight.detach().abs().sum()) == 0.0
    assert all(p.requires_grad for p in model.parameters())


def test_pair_rows_share_the_prompt_tokens(tokenizer):
    from alignkit.data.encode import encode_pair

    enc = Encoder(tokenizer, 32, 16)
    pair = encode_pair(enc, PairRow("describe the cat ->", "kind clear", "rude", 2.0, "x:1"))
    assert pair.chosen.ids[:5] == pair.rejected.ids[:5]
    assert words(tokenizer, pair.rejected.ids[5:]) == ["rude", "</s>"]
    assert pair.margin == 2.0


def _random_pairs(tokenizer, n=5, seed=0):
    from alignkit.data.collate import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        p, c, r = 1 + i % 4, 1 + (2 * i) % 5, 1 + (3 * i + 1) % 6
        ids = lambda k: torch.randint(5, len(tokenizer), (k,), generator=g).tolist()  # noqa: E731
        prompt = [1] + ids(p)
        chosen, rejected = ids(c), ids(r)
        pairs.append(TokenizedPair(Tokenized(prompt + chosen, [False] * len(prompt) + [True] * c),
                                   Tokenized(prompt + rejected, [False] * len(prompt) + [True] * r), margin=None))
    return pairs


def test_prefix_shared_pairs_equal_separate_sequences(double_model, tokenizer):
    """[prompt | chosen | rejected] in one row with a 4D mask gives the log-probs of the two sequences alone."""
    from alignkit.data.collate import collate_packed_pairs
    from alignkit.models.logps import pair_logps

    pairs = _random_pairs(tokenizer)
    packed = collate_packed_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        shared = pair_logps(double_model, packed)
        plain = pair_logps(double_model, collate_pairs(pairs, tokenizer.pad_token_id))
    oracle = torch.tensor([_oracle_logps(double_model, p.chosen) for p in pairs] +
                          [_oracle_logps(double_model, p.rejected) for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(shared.logps, oracle, rtol=0, atol=1e-10)
    torch.testing.assert_close(plain.logps, oracle, rtol=0, atol=1e-10)
    assert shared.lengths.tolist() == plain.lengths.tolist()
    assert packed.num_tokens < plain_tokens(pairs)


def plain_tokens(pairs):
    return sum(len(p.chosen) + len(p.rejected) for p in pairs)


def test_fast_logits_path_is_checked_and_fallback_agrees(double_model, tokenizer):
    """Only target positions go through the output layer; the shortcut is verified once against the full
    forward, and the full-forward fallback gives the same numbers."""
    from alignkit.models.logps import _unwrap

    seqs = _ragged(tokenizer, n=3, seed=4)
    batch = collate_sequences(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        fast = sequence_logps(double_model, batch).logps
        checks = _unwrap(double_model)._alignkit_checks
        assert checks["fast_logits"] is True
        checks["fast_logits"] = False
        slow = sequence_logps(double_model, batch).logps
        checks["fast_logits"] = True
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_pad_equal_to_eos_gets_its_own_pad_token_so_scores_read_the_eos(tmp_path):
    """With pad == eos, transformers' last-non-pad rule would score the token before EOS; alignkit adds a pad
    token, so a finished response (… EOS) and a truncated one score differently, in plain transformers too."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.examples import WORDS
    from alignkit.models.load import load_reward_model, save_pretrained_atomic
    from alignkit.models.tiny import build_tiny_llama, build_word_tokenizer

    tok = build_word_tokenizer(WORDS)
    model = build_tiny_llama(tok)
    tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    rm = load_reward_model(str(tmp_path / "base"), tok)
    assert tok.pad_token_id != tok.eos_token_id and rm.config.pad_token_id == tok.pad_token_id
    assert rm.get_input_embeddings().num_embeddings == len(tok)
    torch.nn.init.normal_(rm.score.weight)
    save_pretrained_atomic(rm, tok, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        ids = tok(["copy cat -> cat </s>", "copy cat -> cat"], return_tensors="pt", padding=True)
        scores = plain(**ids).logits[:, 0]
    assert abs(float(scores[0] - scores[1])) > 1e-4


def test_packed_pairs_without_a_shared_prompt(double_model, tokenizer):
    """No shared prefix at all (no BOS): the first response token is never predicted, as in the padded path."""
    from alignkit.data.collate import TokenizedPair, collate_packed_pairs
    from alignkit.models.logps import pair_logps

    pairs = [TokenizedPair(Tokenized([7, 8, 9], [True] * 3), Tokenized([10, 11], [True] * 2)),
             TokenizedPair(Tokenized([12, 13], [True] * 2), Tokenized([14, 15, 16, 17], [True] * 4))]
    with torch.no_grad():
        shared = pair_logps(double_model, collate_packed_pairs(pairs, tokenizer.pad_token_id))
        plain = pair_logps(double_model, collate_pairs(pairs, tokenizer.pad_token_id))
    torch.testing.assert_close(shared.logps, plain.logps, rtol=0, atol=1e-10)
    assert shared.lengths.tolist() == [2, 1, 1, 3]


def _long_pairs(prompt_len, chosen_len, rejected_len, vocab, seed=0):
    from alignkit.data.collate import TokenizedPair
    from alignkit.data.tokenize import Tokenized

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, vocab, (prompt_len,), generator=g).tolist()

    def seq(n):
        return Tokenized(prompt + torch.randint(5, vocab, (n,), generator=g).tolist(), [False] * prompt_len + [True] * n)

    return [TokenizedPair(seq(chosen_len), seq(rejected_len))]


def test_padding_is_chosen_where_the_packed_mask_would_cost_more_attention_than_the_prompt_saves():
    """Hand-worked (hidden 64, 4 heads of 16, MLP 256: 65,536 matmul weights and 256 FLOPs per attended pair a
    layer). [P | C | R] with P = C = R = 200: packed 600 · (2 · 65,536 + 256 · 600) = 170.8M; two causal rows of
    400, no mask: 2 · (400 · 131,072 + 80,200 · 256) = 145.9M < 0.9 · 170.8M → pad. At 100 tokens each, 62.4M vs
    62.7M → pack; with responses of unequal length the padded rows need a mask (full squares) → pack; so does
    eager attention, which never skips the causal half."""
    from types import SimpleNamespace

    from alignkit.data.collate import collate_packed_pairs
    from alignkit.models.logps import _layer_costs, padding_is_cheaper

    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256)
    assert _layer_costs(config) == (65_536, 256)
    assert padding_is_cheaper(config, collate_packed_pairs(_long_pairs(200, 200, 200, 50), 0))
    assert not padding_is_cheaper(config, collate_packed_pairs(_long_pairs(100, 100, 100, 50), 0))
    assert not padding_is_cheaper(config, collate_packed_pairs(_long_pairs(200, 200, 199, 50), 0))
    assert not padding_is_cheaper(SimpleNamespace(), collate_packed_pairs(_long_pairs(200, 200, 200, 50), 0))
    # eager attention computes the whole square either way: 2 · (400 · 131,072 + 160,000 · 256) = 186.8M → pack
    eager = SimpleNamespace(**vars(config), _attn_implementation="eager")
    assert not padding_is_cheaper(eager, collate_packed_pairs(_long_pairs(200, 200, 200, 50), 0))


def test_long_equal_pairs_read_padded_and_give_the_packed_numbers(double_model, tokenizer, monkeypatch):
    from alignkit.data.collate import collate_packed_pairs
    from alignkit.models import logps
    from alignkit.models.logps import model_batch, pair_logps

    config = logps._unwrap(double_model).config
    # the fixture's tiny Llama has the shape of the hand-worked case above: 200 tokens each pads
    batch = collate_packed_pairs(_long_pairs(200, 200, 200, len(tokenizer)), tokenizer.pad_token_id)
    assert logps.padding_is_cheaper(config, batch)
    read, _ = model_batch(double_model, batch)
    assert read.attention_mask.dim() == 2 and read.input_ids.shape[0] == 2  # one sequence per row
    with torch.no_grad():
        padded = pair_logps(double_model, batch)
        monkeypatch.setattr(logps, "padding_is_cheaper", lambda config, batch: False)
        assert model_batch(double_model, batch)[0].attention_mask.dim() == 4
        packed = pair_logps(double_model, batch)
    torch.testing.assert_close(padded.logps, packed.logps, rtol=0, atol=1e-8)
