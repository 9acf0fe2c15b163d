"""The architecture matrix: tiny models (built in-process) of the decoder families users bring.

Each differs where a fast path can go silently wrong: sliding windows shorter than the sequences (Mistral,
Phi-3, Gemma 2 and 3, the last two with layer types), ALiBi (Bloom), learned positions (GPT-2, OPT), parallel
attention (GPT-NeoX, Falcon), dropout on by default (GPT-2), logit soft-capping (Gemma 2). For every one:
packed log-probs, values and scores equal plain `transformers` on each unpadded sequence (or the fallback
says it engaged), generation's log-probs equal a forward, and each trainer's first loss equals the loss worked
out here from plain `transformers` forwards of each sequence.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.examples import WORDS, pairwise_rows, sft_rows, write_jsonl
from alignkit.models.tiny import ARCHITECTURES, build_word_tokenizer, tiny_config

PACKING_FAILS = {"bloom"}  # ALiBi reads positions from a 2D mask: packed rows fail, padded rows are used


def _save(path, arch, seed=0, head=None):
    """A tiny `arch` model (a causal LM, or with `head="score"` a reward model with a random head) as an HF
    folder."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = build_word_tokenizer(WORDS)
    config = tiny_config(arch, tokenizer)
    torch.manual_seed(seed)
    if head == "score":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """arch -> {"policy", "other" (another seed: a reference that differs), "rm" (random score head)}."""
    root = tmp_path_factory.mktemp("zoo")
    return {arch: {"policy": _save(root / arch, arch), "other": _save(root / f"{arch}-other", arch, seed=1),
                   "rm": _save(root / f"{arch}-rm", arch, seed=2, head="score")} for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-data")
    pairs = pairwise_rows(6, seed=11)
    for row in pairs:  # long enough to cross the 6-token sliding window in prompt and response
        row["chosen"] += " and the " + row["chosen"]
    unary = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
             for i, r in enumerate(pairs)]
    return {"pairs": pairs, "unary": unary, "sft": sft_rows(6, seed=12),
            "pairs_file": str(write_jsonl(root / "pairs.jsonl", pairs)),
            "unary_file": str(write_jsonl(root / "unary.jsonl", unary)),
            "sft_file": str(write_jsonl(root / "sft.jsonl", sft_rows(6, seed=12))),
            "prompts_file": str(write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pairs]))}


def _plain(path, kind="lm"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
    return cls.from_pretrained(path).eval()


@torch.no_grad()
def _oracle_logps(model, seq) -> float:
    """Σ log p of the target tokens of one unpadded sequence, from the model's plain forward."""
    ids = torch.tensor([seq.ids])
    logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return float(picked[torch.tensor(seq.loss_mask[1:])].sum())


def _encoder(path):
    from alignkit.data.tokenize import Encoder
    from alignkit.models.load import load_tokenizer

    return Encoder(load_tokenizer(path))


def _pair(encoder, prompt, chosen, rejected):
    p = encoder.prompt_ids(prompt)
    return encoder.join(p, encoder.response_ids(prompt, chosen)), encoder.join(p, encoder.response_ids(prompt, rejected))


def _first(run_dir) -> dict:
    return next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["step"] == 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_rows_equal_plain_transformers(arch, zoo, data, capsys):
    """Packed log-probs, per-token values and scores of pairs sharing a prompt equal plain transformers on each
    sequence alone, on sequences longer than the sliding window."""
    from alignkit.data.collate import TokenizedPair, collate_packed_pairs, collate_pairs
    from alignkit.models.logps import packed_token_values, pair_logps, reward_scores, token_values

    enc = _encoder(zoo[arch]["policy"])
    pairs = [TokenizedPair(*_pair(enc, r["prompt"], r["chosen"], r["rejected"])) for r in data["pairs"]]
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    assert max(len(s) for s in seqs) > 12  # twice the window
    policy, rm = _plain(zoo[arch]["policy"]), _plain(zoo[arch]["rm"], "rm")
    packed = collate_packed_pairs(pairs, enc.tokenizer.pad_token_id)
    with torch.no_grad():
        want = torch.tensor([_oracle_logps(policy, s) for s in seqs])
        torch.testing.assert_close(pair_logps(policy, packed).logps, want, rtol=0, atol=1e-4)
        want_scores = torch.stack([rm(input_ids=torch.tensor([s.ids])).logits[0, 0] for s in seqs])
        torch.testing.assert_close(reward_scores(rm, packed), want_scores, rtol=0, atol=1e-4)
        padded = collate_pairs(pairs, enc.tokenizer.pad_token_id).sequences
        want_values = token_values(rm, padded)[padded.loss_mask[:, 1:]]
        torch.testing.assert_close(packed_token_values(rm, packed), want_values, rtol=0, atol=1e-4)
    notice = capsys.readouterr().err
    assert ("using padded batches" in notice) == (arch in PACKING_FAILS), notice


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_log_probs_equal_a_forward(arch, zoo):
    """KV-cached sampling from left-padded prompts (a prompt's samples sharing its cache) scores its tokens as a
    packed forward of the finished sequences does, past the sliding window."""
    from alignkit.data.collate import pack_sequences
    from alignkit.data.tokenize import Tokenized
    from alignkit.models.logps import packed_target_logps
    from alignkit.rl.rollout import generate

    enc = _encoder(zoo[arch]["policy"])
    policy = _plain(zoo[arch]["policy"])
    prompts = [enc.prompt_ids(p) for p in ("copy cat dog ->", "describe the red fox and the blue owl ->")]
    ids = [p for p in prompts for _ in range(2)]
    rollout = generate(policy, ids, pad_id=enc.tokenizer.pad_token_id, eos_id=enc.eos_id, max_new_tokens=10,
                       generator=torch.Generator().manual_seed(0))
    responses = [r[m].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]
    seqs = [Tokenized(p + r, [False] * len(p) + [True] * len(r)) for p, r in zip(ids, responses)]
    with torch.no_grad():
        forward = packed_target_logps(policy, pack_sequences(seqs, [0, 0, 1, 1], enc.tokenizer.pad_token_id))
    torch.testing.assert_close(forward, rollout.logps[rollout.response_mask], rtol=0, atol=1e-4)


def _run(train, cfg_cls, out, **fields):
    train(cfg_cls(output_dir=str(out), max_steps=1, batch_size=6, eval_fraction=0.0, lr=1e-4, disable_dropout=True,
                  **fields))
    return _first(out)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_trainer_first_loss_equals_plain_transformers(arch, zoo, data, tmp_path):
    """One step of sft, reward, dpo and kto (every row in the one batch, packed where the trainer packs): the
    logged first loss equals the loss worked out from plain transformers forwards of each sequence. The
    reference is another model and the reward model's head is random, so no loss is trivially log 2."""
    from alignkit.config import DPOConfig, KTOConfig, RewardConfig, SFTConfig
    from alignkit.data.formats import load_rows
    from alignkit.train.dpo import train_dpo
    from alignkit.train.kto import kto_examples, train_kto
    from alignkit.train.reward import train_reward
    from alignkit.train.sft import train_sft

    paths = zoo[arch]
    enc = _encoder(paths["policy"])
    policy, other, rm = _plain(paths["policy"]), _plain(paths["other"]), _plain(paths["rm"], "rm")
    pairs = [_pair(enc, r["prompt"], r["chosen"], r["rejected"]) for r in data["pairs"]]
    beta = 0.5

    # sft: mean token NLL over every completion token of the batch
    seqs = [enc.prompt_response(r["prompt"], r["completion"]) for r in data["sft"]]
    nll = -sum(_oracle_logps(policy, s) for s in seqs) / sum(sum(s.loss_mask[1:]) for s in seqs)
    got = _run(train_sft, SFTConfig, tmp_path / "sft", model=paths["policy"], data=(data["sft_file"],))
    assert got["loss"] == pytest.approx(nll, abs=1e-4)

    # reward: Bradley–Terry on the random head's scores
    with torch.no_grad():
        score = lambda s: float(rm(input_ids=torch.tensor([s.ids])).logits[0, 0])  # noqa: E731
        bt = sum(float(-F.logsigmoid(torch.tensor(score(c) - score(r)))) for c, r in pairs) / len(pairs)
    got = _run(train_reward, RewardConfig, tmp_path / "reward", model=paths["rm"], data=(data["pairs_file"],))
    assert got["loss"] == pytest.approx(bt, abs=1e-4)

    # dpo against another model as the reference (precomputed log-probs)
    h = [(_oracle_logps(policy, c) - _oracle_logps(other, c)) - (_oracle_logps(policy, r) - _oracle_logps(other, r))
         for c, r in pairs]
    dpo = sum(float(-F.logsigmoid(torch.tensor(beta * x))) for x in h) / len(h)
    got = _run(train_dpo, DPOConfig, tmp_path / "dpo", model=paths["policy"], ref_model=paths["other"],
               data=(data["pairs_file"],), beta=beta)
    assert got["loss"] == pytest.approx(dpo, abs=1e-4)

    # kto: reference point from the mismatched completions of the batch
    rows = load_rows([data["unary_file"]], kind="auto").rows
    examples = kto_examples(enc, rows, seed=0)
    r = torch.tensor([_oracle_logps(policy, e.pair.chosen) - _oracle_logps(other, e.pair.chosen) for e in examples])
    z0 = max(0.0, sum(_oracle_logps(policy, e.pair.rejected) - _oracle_logps(other, e.pair.rejected)
                      for e in examples) / len(examples))
    good = torch.tensor([bool(e.label) for e in examples])
    kto = float(torch.where(good, 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))).mean())
    got = _run(train_kto, KTOConfig, tmp_path / "kto", model=paths["policy"], ref_model=paths["other"],
               data=(data["unary_file"],), beta=beta)
    assert got["loss"] == pytest.approx(kto, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ppo_first_iteration_starts_at_the_reference(arch, zoo, data, tmp_path):
    """ppo with a value model on every architecture: the first iteration's KL to the reference is 0 and no
    ratio is clipped (the sampler, the update's forward and the reference agree; dropout is off)."""
    from alignkit.config import PPOConfig
    from alignkit.train.ppo import train_ppo

    out = tmp_path / "ppo"
    train_ppo(PPOConfig(model=zoo[arch]["policy"], data=(data["prompts_file"],), output_dir=str(out), max_steps=1,
                        rollout_batch_size=3, samples_per_prompt=2, max_new_tokens=8, lr=1e-4,
                        reward_fn="python:alignkit.examples:good_word_share"))
    first = _first(out)
    assert abs(first["kl"]) < 1e-4 and first["clipfrac"] == 0.0, first
    assert math.isfinite(first["value_loss"]) and first["value_loss"] > 0


def test_chunked_attention_llama4_packs_exactly(capsys):
    """Llama 4's chunked layers (a token sees its own chunk of `attention_chunk_size`) in the packed mask: the
    packed log-probs equal plain transformers on each sequence, with no fallback, across chunk borders."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from alignkit.data.collate import TokenizedPair, collate_packed_pairs
    from alignkit.data.tokenize import Tokenized
    from alignkit.models.logps import pair_logps

    config = Llama4TextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              attention_chunk_size=4, num_local_experts=2, interleave_moe_layer_step=1,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert "chunked_attention" in config.layer_types
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 40, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for i in range(3):
        prompt = ids(5 + i)
        pairs.append(TokenizedPair(*(Tokenized(prompt + r, [False] * len(prompt) + [True] * len(r))
                                     for r in (ids(9 + 2 * i), ids(6 + i)))))
    with torch.no_grad():
        got = pair_logps(model, collate_packed_pairs(pairs, 0)).logps
        want = torch.tensor([_oracle_logps(model, p.chosen) for p in pairs] +
                            [_oracle_logps(model, p.rejected) for p in pairs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert "using padded batches" not in capsys.readouterr().err


def test_packing_that_is_not_exact_is_caught_and_read_padded(zoo, data, monkeypatch, capsys):
    """A packed mask that forgets Mistral's sliding window (what transformers does with a 4D mask) disagrees
    with the padded forward on sequences longer than the window: the check catches it, says so once, and the
    numbers come from padded rows — equal to plain transformers."""
    from alignkit.data.collate import TokenizedPair, collate_packed_pairs
    from alignkit.models import logps

    monkeypatch.setattr(logps, "packed_attention_mask", lambda config, mask, position_ids: mask)
    enc = _encoder(zoo["mistral"]["policy"])
    pairs = [TokenizedPair(*_pair(enc, r["prompt"], r["chosen"], r["rejected"])) for r in data["pairs"]]
    policy = _plain(zoo["mistral"]["policy"])
    with torch.no_grad():
        got = logps.pair_logps(policy, collate_packed_pairs(pairs, enc.tokenizer.pad_token_id)).logps
        want = torch.tensor([_oracle_logps(policy, p.chosen) for p in pairs] +
                            [_oracle_logps(policy, p.rejected) for p in pairs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    notice = capsys.readouterr().err
    assert "MistralForCausalLM: packed rows do not reproduce a padded forward" in notice
    assert "using padded batches for sequences longer than its attention window (6)" in notice


def test_soft_capped_logits_never_take_the_output_layer_shortcut(zoo, data):
    """Gemma 2 caps its logits (30·tanh(x/30)); a tiny model's logits are too small for the check to see the
    cap, so a model that declares post-processed logits computes full logits: exact at any scale."""
    from alignkit.data.collate import TokenizedPair, collate_packed_pairs
    from alignkit.models.logps import _unwrap, pair_logps

    enc = _encoder(zoo["gemma2"]["policy"])
    policy = _plain(zoo["gemma2"]["policy"])
    assert policy.config.final_logit_softcapping == 30.0
    pairs = [TokenizedPair(*_pair(enc, r["prompt"], r["chosen"], r["rejected"])) for r in data["pairs"][:2]]
    with torch.no_grad():
        pair_logps(policy, collate_packed_pairs(pairs, enc.tokenizer.pad_token_id))
    assert _unwrap(policy)._alignkit_checks["fast_logits"] is False


def test_a_row_of_several_blocks_is_checked_too(zoo, monkeypatch, capsys):
    """A GPT-2 (learned absolute positions) whose backbone ignores `position_ids` (positions = columns) is right
    on a row holding one sequence from column 0 and wrong on a row of two blocks side by side: the check reads
    both kinds of row, so it catches that, and the numbers come from padded rows. (With rotary positions the
    same bug would be harmless here: a block shifted as a whole keeps its relative positions.)"""
    from alignkit.data.collate import pack_sequences
    from alignkit.data.tokenize import Tokenized
    from alignkit.models.logps import packed_logps

    model = _plain(zoo["gpt2"]["policy"])
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward", lambda *a, **kw: forward(*a, **{**kw, "position_ids": None}))
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    seqs = [Tokenized([1] + torch.randint(5, vocab, (n - 1,), generator=g).tolist(), [False, False] + [True] * (n - 2))
            for n in (12, 6, 5)]
    batch = pack_sequences(seqs, [0, 1, 2], 0)
    assert batch.input_ids.shape[0] == 2  # [12] and [6 | 5]: the longest sequence's row has one block
    with torch.no_grad():
        got = packed_logps(model, batch).logps
        want = torch.tensor([_oracle_logps(model, s) for s in seqs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert "GPT2LMHeadModel: packed rows do not reproduce a padded forward" in capsys.readouterr().err
