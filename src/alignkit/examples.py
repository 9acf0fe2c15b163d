"""A built-in tiny world for the demo, the tests and the benchmarks: words, a tiny model, and data sets
with an easy, known preference (responses with more "good" words are better).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "elk"]
COLORS = ["red", "blue", "green", "gold", "pink", "gray", "black", "white"]
GOOD = ["kind", "clear", "helpful", "honest", "useful", "correct", "precise", "polite"]
BAD = ["rude", "vague", "wrong", "lazy", "messy", "false", "sloppy", "unclear"]
FILLER = ["the", "a", "and", "of", "is", "it", "this", "that", "very", "so"]
TASK = ["list", "name", "describe", "copy", "answer", "please", "->"]
WORDS = ANIMALS + COLORS + GOOD + BAD + FILLER + TASK


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """`copy` demonstrations: the completion repeats the prompt's animals and colors."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(ANIMALS + COLORS) for _ in range(rng.randint(2, 5))]
        rows.append({"prompt": "copy " + " ".join(words) + " ->", "completion": " ".join(words)})
    return rows


def _response(rng: random.Random, n_good: int, length: int) -> str:
    words = [rng.choice(GOOD) for _ in range(n_good)] + [rng.choice(BAD) for _ in range(length - n_good)]
    rng.shuffle(words)
    return " ".join(words)


def _prompt(rng: random.Random) -> str:
    return f"describe the {rng.choice(COLORS)} {rng.choice(ANIMALS)} ->"


def pairwise_rows(n: int, seed: int = 0) -> list[dict]:
    """The chosen response has more good words than the rejected one (same length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(3, 6)
        better = rng.randint(length // 2 + 1, length)
        worse = rng.randint(0, length // 2)
        rows.append({"prompt": _prompt(rng), "chosen": _response(rng, better, length),
                     "rejected": _response(rng, worse, length)})
    return rows


def ranked_rows(n: int, k: int = 4, seed: int = 0) -> list[dict]:
    """K responses, best first, with strictly decreasing numbers of good words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(k, k + 2)
        goods = sorted(rng.sample(range(length + 1), k), reverse=True)
        rows.append({"prompt": _prompt(rng), "responses": [_response(rng, g, length) for g in goods]})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tiny_model(path: str | Path, seed: int = 0, **model_kwargs) -> Path:
    """A tiny Llama with a word-level tokenizer over this world's words, saved as an HF folder."""
    from alignkit.models.tiny import save_tiny_model

    return save_tiny_model(path, WORDS, seed=seed, **model_kwargs)


def heldout_accuracy_with_transformers(reward_model_dir: str | Path, rows: list[dict]) -> float:
    """Pairwise accuracy of a saved reward model on pairwise or ranked rows, loaded with plain transformers
    (AutoModelForSequenceClassification) and scoring the text `prompt + " " + response + eos_token`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()

    def score(prompt: str, responses: list[str]) -> list[float]:
        texts = [f"{prompt} {r}{tokenizer.eos_token}" for r in responses]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return model(**enc).logits[:, 0].tolist()

    right = total = 0
    for row in rows:
        responses = row["responses"] if "responses" in row else [row["chosen"], row["rejected"]]
        s = score(row["prompt"], responses)
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                right += s[i] > s[j]
                total += 1
    return right / total


def good_word_share(prompts: list[str], responses: list[str]) -> list[float]:
    """A rule reward (`--reward-fn python:alignkit.examples:good_word_share`): the share of "good" words."""
    out = []
    for response in responses:
        words = response.split()
        out.append(sum(w in GOOD for w in words) / max(1, len(words)))
    return out
