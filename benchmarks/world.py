"""The benchmark's shared inputs: a small Llama (hidden 256, 4 layers) with a 32,000-word tokenizer (a realistic
vocabulary: the output projection is then most of a small model's work, as it is for real models of up to ~1B
parameters), a reference model of the same shape from another random init, and preference pairs with prompts
of 16–96 words and responses of 8–64 words (each word one token). Both libraries read exactly these files.
Everything is built in-process: nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 32000
VOCAB = [f"w{i}" for i in range(VOCAB_SIZE)]


def sentence(rng: random.Random, low: int, high: int, words: list[str] = VOCAB) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def build(root: Path, pairs: int, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> dict:
    from alignkit.models.tiny import build_tiny_llama, build_word_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    words = VOCAB[:vocab_size] if vocab_size <= len(VOCAB) else [f"w{i}" for i in range(vocab_size)]
    tokenizer = build_word_tokenizer(words)
    for name, model_seed in (("policy", 0), ("reference", 1)):
        model = build_tiny_llama(tokenizer, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                                 seed=model_seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    # a reward model for the ppo comparison: the policy's backbone with a seeded random score head (both
    # libraries also initialise their value model from it)
    import torch
    from transformers import AutoModelForSequenceClassification

    reward = AutoModelForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        reward.score.weight.normal_(0.0, 0.1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    rng = random.Random(seed)
    rows = []
    for _ in range(pairs):
        # TRL concatenates prompt + response text, so responses start with a space
        rows.append({"prompt": sentence(rng, 16, 96, words), "chosen": " " + sentence(rng, 8, 64, words),
                     "rejected": " " + sentence(rng, 8, 64, words)})
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(root / "first_batch.jsonl", "w") as f:  # the first-step loss check: one batch, order-free
        f.writelines(json.dumps(r) + "\n" for r in rows[:8])
    # SFT reads the same prompts with the chosen response as the completion
    for name, part in (("sft.jsonl", rows), ("sft_first_batch.jsonl", rows[:8])):
        with open(root / name, "w") as f:
            f.writelines(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in part)
    return {"sft": str(root / "sft.jsonl"), "sft_first_batch": str(root / "sft_first_batch.jsonl"),"policy": str(root / "policy"), "reference": str(root / "reference"), "reward": str(root / "reward"),
            "pairs": str(root / "pairs.jsonl"), "first_batch": str(root / "first_batch.jsonl")}
