"""`alignkit demo` (what `make demo` runs until the lab exists): SFT → reward model on the built-in tiny world.

Builds a tiny Llama with a word tokenizer, fine-tunes it on `copy` demonstrations, trains a reward model
from the SFT model on pairwise preferences, then scores held-out pairs with plain `transformers`.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignkit import examples
from alignkit.config import RewardConfig, SFTConfig


def run_demo(output_dir: str = "runs/demo", seed: int = 0) -> dict:
    from alignkit.models.load import quiet_transformers

    quiet_transformers()
    started = time.perf_counter()
    out = Path(output_dir)
    base = examples.make_tiny_model(out / "base", seed=seed, hidden_size=64, num_layers=2)
    sft_data = examples.write_jsonl(out / "data" / "sft.jsonl", examples.sft_rows(600, seed=seed))
    pref_data = examples.write_jsonl(out / "data" / "prefs.jsonl", examples.pairwise_rows(800, seed=seed + 1))
    print(f"demo: tiny model and data in {out}")

    from alignkit.train.reward import train_reward
    from alignkit.train.sft import train_sft

    sft = train_sft(SFTConfig(
        model=str(base), data=(str(sft_data),), output_dir=str(out / "sft"), seed=seed, max_steps=120,
        batch_size=16, lr=3e-3, lr_schedule="cosine", warmup_steps=10, eval_fraction=0.1, eval_every=40,
        max_length=64, max_prompt_length=32, resume="never"))
    rm = train_reward(RewardConfig(
        model=str(out / "sft" / "final"), data=(str(pref_data),), output_dir=str(out / "reward"), seed=seed,
        epochs=2, batch_size=16, lr=1e-3, lr_schedule="cosine", eval_fraction=0.1, eval_every=40,
        max_length=64, max_prompt_length=32, resume="never"))
    heldout = examples.pairwise_rows(200, seed=seed + 2)
    plain_accuracy = examples.heldout_accuracy_with_transformers(out / "reward" / "final", heldout)
    elapsed = time.perf_counter() - started
    print()
    print(f"SFT:          eval loss {sft.get('eval/loss', float('nan')):.3f} nats/token  -> {out / 'sft' / 'final'}")
    print(f"reward model: eval accuracy {rm.get('eval/accuracy', float('nan')):.3f}          "
          f"-> {out / 'reward' / 'final'}")
    print(f"              accuracy on 200 new pairs, loaded with plain transformers: {plain_accuracy:.3f}")
    print(f"metrics:      {out / 'sft' / 'metrics.jsonl'}, {out / 'reward' / 'metrics.jsonl'}")
    print(f"demo finished in {elapsed:.0f} s")
    return {"sft": sft, "reward": rm, "plain_transformers_accuracy": plain_accuracy}
