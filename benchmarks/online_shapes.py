"""Online RL over the shapes users run: grpo, alignkit vs TRL's GRPOTrainer, on short and long prompts, 2–8
samples per prompt and 16–128 new tokens (SPEC §12, issue 14).

    python benchmarks/online_shapes.py [--steps 4] [--threads 2] [--shapes all|NAME,NAME]

The benchmark's world (`world.py`: 32k vocabulary, hidden 256, 4 layers); short prompts are 6–16 words, long
ones 16–96. Each shape is two processes of `--steps` steps (4 prompts per step); per side: the mean time of the
steps after the first, and the utilisation of the float32 matmul peak measured in the same run (flops.py's
grpo step: generation, reference and trained log-probs), and the wall time of generation alone (alignkit's
rollout call; TRL's `model.generate`, timed from outside) with the speed-up of everything else in the step.
GRPO needs 2 samples at least (TRL refuses 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name: prompt words (low, high), samples per prompt, new tokens
SHAPES = {"short-4x16": ((6, 16), 4, 16), "long-4x16": ((16, 96), 4, 16), "short-2x16": ((6, 16), 2, 16),
          "long-8x16": ((16, 96), 8, 16), "short-4x128": ((6, 16), 4, 128), "long-4x128": ((16, 96), 4, 128)}
PROMPTS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="all")
    parser.add_argument("--world", default=None)
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import flops
    from run import run_job
    from transformers import AutoTokenizer
    from world import VOCAB, build, sentence

    world_dir = Path(args.world or tempfile.mkdtemp(prefix="bench-world-"))
    if not (world_dir / "world.json").exists():
        (world_dir / "world.json").write_text(json.dumps(build(world_dir, 48)))
    world = json.loads((world_dir / "world.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    shape = flops.Shape.from_folder(world["policy"])
    peak = flops.matmul_peak(args.threads)
    print(f"float32 matmul peak, {args.threads} threads: {peak / 1e9:.1f} GFLOP/s; grpo, {PROMPTS} prompts a step, "
          f"{args.steps} steps (time per step: the steps after the first)")
    print(f"{'shape':12} {'alignkit s/step':>15} {'TRL s/step':>11} {'speed-up':>9} {'util alignkit':>14} "
          f"{'util TRL':>9} {'generation s (alignkit / TRL)':>30} {'rest speed-up':>14}")
    names = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    rows = []
    for name in names:
        (low, high), samples, new_tokens = SHAPES[name]
        rng = random.Random(1)
        prompts = [sentence(rng, low, high, VOCAB) for _ in range(PROMPTS * args.steps * 2)]
        data = world_dir / f"prompts-{low}-{high}.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        mean_prompt = round(sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts))
        settings = {"PROMPTS": PROMPTS, "SAMPLES": samples, "NEW_TOKENS": new_tokens}
        step_flops = flops.grpo_step(shape, [mean_prompt] * PROMPTS, samples, new_tokens)
        row = {"shape": name, "prompt_tokens": mean_prompt, "samples": samples, "new_tokens": new_tokens}
        for side in ("alignkit", "trl"):
            result = run_job(f"{side}-grpo", world_dir, args.steps, str(data), args.threads, settings=settings)
            later = result["step_seconds"][1:] or result["step_seconds"]
            generation = result.get("generate_seconds", [])
            generation = generation[1:] or generation or [float("nan")]  # one generation per step on both sides
            row[side] = {"step_seconds": sum(later) / len(later), "peak_rss_mb": result["peak_rss_mb"],
                         "generate_seconds": sum(generation) / len(generation),
                         "utilisation": step_flops / (sum(later) / len(later)) / peak}
        rows.append(row)
        a, t = row["alignkit"], row["trl"]
        rest = (t["step_seconds"] - t["generate_seconds"]) / (a["step_seconds"] - a["generate_seconds"])
        print(f"{name:12} {a['step_seconds']:15.2f} {t['step_seconds']:11.2f} "
              f"{t['step_seconds'] / a['step_seconds']:8.2f}x {100 * a['utilisation']:13.1f}% "
              f"{100 * t['utilisation']:8.1f}% {a['generate_seconds']:16.2f} / {t['generate_seconds']:5.2f} "
              f"({t['generate_seconds'] / a['generate_seconds']:4.2f}x) {rest:13.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "rows": rows}))


if __name__ == "__main__":
    main()
