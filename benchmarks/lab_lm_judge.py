"""An lm: judge on the lab's world (SPEC §7, §9): sft a tiny LM on judging prompts labelled by the world's gold
reward (the better answer at a random position), then `alignkit label` held-out shuffled pairs with it and with
the untrained LM; prints agreement with the gold and the position-bias rate.

    python benchmarks/lab_lm_judge.py [SFT_PAIRS=3000] [HIDDEN=64] [EPOCHS=3] [FOLDER=/tmp/labjudge]
"""
import json
import os
import random
import sys

from alignkit.config import LabelConfig, SFTConfig
from alignkit.examples import write_jsonl
from alignkit.judges.base import judging_prompt
from alignkit.judges.label import run_label
from alignkit.lab import world
from alignkit.models.tiny import save_tiny_model
from alignkit.train.sft import train_sft

TEMPLATE = "{principles}{question} A : {answer_a} B : {answer_b}"


def main(pairs: int = 3000, hidden: int = 64, epochs: int = 3, root: str = "/tmp/labjudge") -> None:
    os.makedirs(root, exist_ok=True)
    template = TEMPLATE
    open(f"{root}/template.txt", "w").write(template)
    save_tiny_model(f"{root}/base", world.WORDS + ["A", "B", "C", "[[", "]]", ":"], seed=3, hidden_size=hidden, num_layers=2)
    train_prompts, held_prompts = world.split_prompts(0)
    rng = random.Random(0)

    def rows(prompts, n, seed, for_sft):
        out = []
        for r in world.pairwise_rows(prompts, n, seed):
            a, b = r["chosen"], r["rejected"]
            ga, gb = world.gold_reward([r["prompt"]] * 2, [a, b])
            if ga == gb:
                continue
            if rng.random() < 0.5:
                a, b, ga, gb = b, a, gb, ga
            better = 0 if ga > gb else 1
            if for_sft:
                out.append({"prompt": [{"role": "user", "content": judging_prompt(template, None, r["prompt"], a, b)}],
                            "completion": [{"role": "assistant", "content": "[[A]]" if better == 0 else "[[B]]"}]})
            else:
                out.append({"prompt": r["prompt"], "responses": [a, b], "label": better})
        return out

    sft = rows(train_prompts, pairs, 1, True)
    held = rows(held_prompts, 300, 2, False)
    write_jsonl(f"{root}/sft.jsonl", sft)
    write_jsonl(f"{root}/held.jsonl", held)
    print("judge sft rows", len(sft), "held-out pairs", len(held))
    train_sft(SFTConfig(model=f"{root}/base", data=(f"{root}/sft.jsonl",), output_dir=f"{root}/judge", epochs=epochs,
                        batch_size=16, lr=1e-3, lr_schedule="cosine", resume="never"))
    common = dict(judge_template=f"{root}/template.txt", data=(f"{root}/held.jsonl",), resume="never")
    for name, path in (("trained", f"{root}/judge/final"), ("untrained", f"{root}/base")):
        report = run_label(LabelConfig(judge=f"lm:{path}", output=f"{root}/{name}.jsonl", **common))
        print(name, json.dumps({k: report[k] for k in report if k in ("agreement", "position_bias", "tie_rate", "failures", "rows")}))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(int(a) for a in args[:3]), *args[3:4])
