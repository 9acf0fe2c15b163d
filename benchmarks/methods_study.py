"""A small, reproducible study behind docs/methods.md: every direct method on the built-in tiny world.

    python benchmarks/methods_study.py [--seed 0]

The world: prompts "describe the <color> <animal> ->", responses of "good" and "bad" words; the chosen
response has more good words. One SFT model (on the pairs' chosen responses) is the start and the reference
of every method; each method then trains one epoch on the same pairs (KTO on them converted to unary) and is
evaluated on held-out pairs: implicit-reward accuracy, margin, and how far the policy moved (mean change of
the chosen and rejected log-probs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

METHODS = [
    ("dpo sigmoid β=0.1", "dpo", {"loss": "sigmoid", "beta": 0.1}),
    ("dpo sigmoid β=0.5", "dpo", {"loss": "sigmoid", "beta": 0.5}),
    ("cdpo ε=0.1", "dpo", {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.1}),
    ("robust ε=0.1", "dpo", {"loss": "robust", "beta": 0.1, "label_smoothing": 0.1}),
    ("hinge β=0.1", "dpo", {"loss": "hinge", "beta": 0.1}),
    ("ipo β=0.1", "dpo", {"loss": "ipo", "beta": 0.1}),
    ("simpo β=2 γ=0.5", "dpo", {"loss": "simpo", "beta": 2.0, "simpo_gamma": 0.5}),
    ("rdpo α=0.01", "dpo", {"loss": "rdpo", "beta": 0.1, "rdpo_alpha": 0.01}),
    ("kto β=0.1", "kto", {"beta": 0.1}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from alignkit import examples
    from alignkit.config import DPOConfig, KTOConfig, SFTConfig
    from alignkit.models.load import quiet_transformers
    from alignkit.train.dpo import train_dpo
    from alignkit.train.kto import train_kto
    from alignkit.train.sft import train_sft

    quiet_transformers()
    root = Path(tempfile.mkdtemp(prefix="methods-"))
    base = examples.make_tiny_model(root / "base", seed=args.seed)
    pairs = examples.pairwise_rows(600, seed=args.seed + 1)
    data = examples.write_jsonl(root / "pairs.jsonl", pairs)
    sft_data = examples.write_jsonl(root / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                          for r in pairs[:300]])
    short = dict(max_length=64, max_prompt_length=32, seed=args.seed, resume="never")
    train_sft(SFTConfig(model=str(base), data=(str(sft_data),), output_dir=str(root / "sft"), max_steps=60,
                        batch_size=16, lr=3e-3, **short))
    rows = []
    for name, command, extra in METHODS:
        cls, train = (DPOConfig, train_dpo) if command == "dpo" else (KTOConfig, train_kto)
        out = root / name.replace(" ", "_")
        last = train(cls(model=str(root / "sft" / "final"), data=(str(data),), output_dir=str(out), epochs=1,
                         batch_size=16, lr=args.lr, eval_fraction=0.1, eval_every=1000, **short, **extra))
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        rows.append((name, last["eval/rewards/accuracy"], last["eval/rewards/margin"],
                     last["eval/logps/chosen"] - first["eval/logps/chosen"],
                     last["eval/logps/rejected"] - first["eval/logps/rejected"]))
    print(f"\nseed {args.seed}, lr {args.lr}, one epoch of {len(pairs)} pairs (10% held out), from one SFT model\n")
    print("| method | eval reward accuracy | eval reward margin | Δ log p(chosen) | Δ log p(rejected) |")
    print("|---|---|---|---|---|")
    for name, acc, margin, dc, dr in rows:
        print(f"| {name} | {acc:.3f} | {margin:.3f} | {dc:+.2f} | {dr:+.2f} |")


if __name__ == "__main__":
    main()
