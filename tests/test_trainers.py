"""Each trainer learns (metrics that must improve), saves a model plain transformers loads, and resumes."""

import pytest
import torch

from alignkit.config import RewardConfig, SFTConfig
from alignkit.examples import (
    heldout_accuracy_with_transformers,
    pairwise_rows,
    ranked_rows,
    sft_rows,
    write_jsonl,
)
from alignkit.train.reward import train_reward
from alignkit.train.sft import train_sft


def test_sft_lowers_the_loss_clearly(tmp_path, tiny_model_dir, harness):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(300, seed=3))
    out = tmp_path / "run"
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=100, batch_size=16,
                        lr=3e-3, lr_schedule="cosine", warmup_steps=5, eval_fraction=0.1, eval_every=25))
    evals = harness.values(out, "eval/loss")
    assert evals[-1] < 0.5 * evals[0], evals  # from ~log(V) to well below
    train_losses = [m["loss"] for m in harness.metrics(out) if "loss" in m and "eval/loss" not in m]
    assert sum(train_losses[-5:]) / 5 < 0.6 * sum(train_losses[:5]) / 5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size > 0 and (out / "final" / "tokenizer.json").is_file()
    assert (out / "config.yaml").read_text().startswith("model:")


def test_sft_on_messages_trains_on_assistant_turns(tmp_path, tiny_model_dir, harness):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in sft_rows(120, seed=4)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    last = train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=20,
                               batch_size=16, lr=3e-3, eval_fraction=0.1, eval_every=10))
    evals = harness.values(out, "eval/loss")
    assert evals[-1] < evals[0] and last["eval/loss"] == evals[-1]


CHATS = [
    [{"role": "system", "content": "kind"}, {"role": "user", "content": "copy cat"},
     {"role": "assistant", "content": "cat"}, {"role": "user", "content": "copy dog owl"},
     {"role": "assistant", "content": "dog owl"}],
    [{"role": "user", "content": "copy red fox"}, {"role": "assistant", "content": "red fox"}],
]


def _assistant_positions(words: list[str]) -> list[int]:
    """Positions of assistant-turn tokens, read off the rendered words alone (default template:
    `assistant : <content> </s>`): everything after `assistant :` up to and including its `</s>`."""
    positions, inside = [], False
    for i, w in enumerate(words):
        if inside:
            positions.append(i)
            inside = w != "</s>"
        elif w == ":" and i > 0 and words[i - 1] == "assistant":
            inside = True
    return positions


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_loss_on_messages_is_the_nll_of_assistant_tokens_only(tiny_model_dir, tokenizer, completion_only):
    """Token level, against plain transformers in float64: sft_step_loss on a padded batch of two
    conversations equals Σ −log p(token) over exactly the assistant-turn tokens (content and EOS, both turns
    of the first chat) — system and user turns, role markers and padding are never targets — and, with
    completion_only_loss false, over every token after the first."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.collate import collate_sequences
    from alignkit.data.rows import SFTRow
    from alignkit.data.tokenize import Encoder
    from alignkit.train.sft import sft_step_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    encoder = Encoder(tokenizer, max_length=64)
    seqs = [encoder.sft(SFTRow(None, None, chat, "x:1"), completion_only) for chat in CHATS]
    expected, targets = 0.0, []
    for seq in seqs:
        words = tokenizer.convert_ids_to_tokens(seq.ids)
        positions = _assistant_positions(words) if completion_only else list(range(1, len(words)))
        targets.append([words[i] for i in positions])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq.ids])).logits[0], -1)
        expected -= sum(float(logp[i - 1, seq.ids[i]]) for i in positions)
    if completion_only:
        assert targets == [["cat", "</s>", "dog", "owl", "</s>"], ["red", "fox", "</s>"]]
    batch = collate_sequences(seqs, tokenizer.pad_token_id)
    assert batch.num_targets == sum(map(len, targets))
    with torch.no_grad():
        loss = sft_step_loss(model, batch).loss
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_sft_first_logged_loss_is_the_mean_nll_of_assistant_tokens(tmp_path, tiny_model_dir, tokenizer, harness):
    """End to end: `alignkit sft` on `messages` rows logs, at step 1 (before its update), the mean −log p over
    the assistant-turn tokens of the batch (8 of them in the two chats), as plain transformers computes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    total, count = 0.0, 0
    for chat in CHATS:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        positions = _assistant_positions(tokenizer.convert_ids_to_tokens(ids))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(float(logp[i - 1, ids[i]]) for i in positions)
        count += len(positions)
    assert count == 8
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    out = tmp_path / "run"
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=1, batch_size=2,
                        lr=1e-3))
    assert harness.metrics(out)[0]["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("kind", ["pairwise", "ranked4", "ranked4-pairs"])
def test_reward_model_reaches_90_percent_heldout_with_plain_transformers(tmp_path, tiny_model_dir, kind, harness):
    rows = pairwise_rows(480, seed=5) if kind == "pairwise" else ranked_rows(240, k=4, seed=5)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    last = train_reward(RewardConfig(
        model=tiny_model_dir, data=(str(data),), output_dir=str(out), epochs=2, batch_size=16, lr=1e-3,
        lr_schedule="cosine", eval_fraction=0.1, eval_every=10,
        ranked_loss="pairs" if kind.endswith("pairs") else "plackett_luce"))
    evals = harness.values(out, "eval/accuracy")
    assert evals[0] == pytest.approx(0.5)  # a zero head scores every response alike
    assert last["eval/accuracy"] >= 0.9
    fresh = pairwise_rows(100, seed=99) if kind == "pairwise" else ranked_rows(50, k=4, seed=99)
    assert heldout_accuracy_with_transformers(out / "final", fresh) >= 0.9


def test_reward_margin_enters_the_loss(tmp_path, tiny_model_dir, harness):
    """A new reward head is zero, so r_c = r_r = 0 on the first step and the loss is −log σ(−m) = log(1 + e^m):
    m = 3 → 3.048587351573742; with use_margin false, log 2 = 0.6931471805599453."""
    rows = [dict(r, margin=3.0) for r in pairwise_rows(32, seed=6)]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    for use_margin, expected in ((True, 3.048587351573742), (False, 0.6931471805599453)):
        out = tmp_path / f"run-{use_margin}"
        train_reward(RewardConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=1,
                                  batch_size=16, lr=1e-3, use_margin=use_margin))
        assert harness.metrics(out)[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_lora_sft_trains_only_adapters_and_saves_merged_or_adapter(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(64, seed=7))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for save in ("merged", "adapter"):
        out = tmp_path / save
        train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=6, batch_size=8,
                            lr=1e-2, lora_r=4, lora_alpha=8, lora_save=save, save_every=3))
        if save == "adapter":
            assert (out / "final" / "adapter_config.json").is_file()
            continue
        merged = AutoModelForCausalLM.from_pretrained(out / "final")
        changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
        assert changed and all("proj" in n for n in changed)  # LoRA-adapted linear layers only
        from safetensors.torch import load_file

        saved = load_file(out / "checkpoints" / "step-3" / "model.safetensors")
        assert saved and all("lora_" in name for name in saved)  # checkpoints hold (and train) adapters only


def test_lora_reward_model_saves_merged_with_head(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", pairwise_rows(160, seed=8))
    out = tmp_path / "run"
    last = train_reward(RewardConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=30,
                                     batch_size=16, lr=5e-3, lora_r=8, lora_alpha=16, eval_fraction=0.1))
    assert last["eval/accuracy"] > 0.75
    assert heldout_accuracy_with_transformers(out / "final", pairwise_rows(40, seed=98)) > 0.75


def test_tensorboard_reporting(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(32, seed=9))
    out = tmp_path / "run"
    train_sft(SFTConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=2, batch_size=8,
                        report_to="tensorboard"))
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kind", ["pairwise", "ranked"])
def test_reward_prefix_sharing_changes_nothing(tmp_path, tiny_model_dir, kind, harness):
    rows = pairwise_rows(64, seed=13) if kind == "pairwise" else ranked_rows(32, k=3, seed=13)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    losses = {}
    for shared in (True, False):
        out = tmp_path / f"run-{shared}"
        train_reward(RewardConfig(model=tiny_model_dir, data=(str(data),), output_dir=str(out), max_steps=4,
                                  batch_size=8, lr=1e-3, eval_fraction=0.0, prefix_sharing=shared))
        losses[shared] = [m["loss"] for m in harness.metrics(out)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]


@pytest.mark.parametrize("train_kind, eval_kind", [("ranked", "pairwise"), ("pairwise", "ranked")])
def test_reward_evaluates_on_the_other_comparison_kind(tmp_path, tiny_model_dir, train_kind, eval_kind):
    """A reward model trained on rankings evaluates on pairs and the other way round (a pair is a ranking of
    two; this used to stop with 'field "responses" is missing'). eval/accuracy keeps its meaning, the share of
    ordered pairs ranked correctly: at the end it equals that share measured with plain transformers on the
    final model, to within one pair (a near-tie may round differently)."""
    train_rows = pairwise_rows(240, seed=21) if train_kind == "pairwise" else ranked_rows(120, k=3, seed=21)
    eval_rows = pairwise_rows(40, seed=22) if eval_kind == "pairwise" else ranked_rows(20, k=3, seed=22)
    data = write_jsonl(tmp_path / "train.jsonl", train_rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    out = tmp_path / "run"
    last = train_reward(RewardConfig(
        model=tiny_model_dir, data=(str(data),), eval_data=(str(held_out),), output_dir=str(out), max_steps=30,
        batch_size=16, lr=1e-3))
    pairs = 40 if eval_kind == "pairwise" else 20 * 3
    expected = heldout_accuracy_with_transformers(out / "final", eval_rows)
    assert last["eval/accuracy"] == pytest.approx(expected, abs=1.01 / pairs)
    assert last["eval/accuracy"] > 0.75
