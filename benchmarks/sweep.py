"""How cost grows: alignkit and TRL over model size and sequence length (SPEC §12, issue 14).

    python benchmarks/sweep.py [--trainers sft,dpo,reward,grpo] [--sizes 4M,21M,58M,134M]
                               [--lengths 128,256,512,1024,2048] [--steps 3] [--threads 2]
                               [--checkpointing] [--out benchmarks/results] [--plots benchmarks/plots]

Two one-dimensional sweeps around a middle point: every model size at sequence length 128, and every
sequence length on the 21M model (hidden 256, 4 layers). Every model has a 32,000-word vocabulary and is
built in-process (Llama, untied embeddings). Rows have exact lengths (one word = one token): a sequence of
length T is `<s>` + T/2 − 1 prompt words + T/2 − 1 response words + `</s>`, so a preference pair is a
T/2-token prompt and two T/2-token responses; for grpo, T − 32 prompt tokens and 32 new tokens.

Each point is one process per side running `--steps` optimizer steps (sft: 4 examples a step; dpo and
reward: 2 pairs; grpo: 2 prompts × 4 samples, 32 new tokens); the time per step is the mean of the steps
after the first. TRL runs in its fastest CPU setting: no gradient checkpointing, DPO's reference log-probs
precomputed (as alignkit does by default), so both loops train the policy only. Memory is the process's
peak RSS, and what it grew by from the start of the first step ("train MB": activations, gradients,
optimizer state). Utilisation: the FLOPs the step's maths needs (flops.py) per second of step, over the
float32 matmul peak measured just before and after that point's process (the better of the two: the
machine is shared and its load changes). `--checkpointing` adds alignkit with gradient
checkpointing on the sequence-length sweep (sft, dpo).

Points run cheapest first. Results go to OUT/sweep.json and OUT/sweep.csv as they come (a partial sweep is
kept; `--resume` runs only the points missing there), plots to PLOTS/. `--plot-only` redraws the plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 32000
NEW_TOKENS = 32
# name: hidden, layers, heads, MLP width (Llama proportions, 32k vocabulary: the name is the total size)
SIZES = {"4M": (64, 2, 2, 256), "21M": (256, 4, 4, 1024), "58M": (512, 8, 8, 1376), "134M": (768, 12, 12, 2048)}
MIDDLE_SIZE, MIDDLE_LENGTH = "21M", 128
BATCH = {"sft": 4, "dpo": 2, "reward": 2, "grpo": 2}
PROMPTS, SAMPLES = 2, 4
JOBS = {("sft", "alignkit"): "alignkit-sft", ("sft", "trl"): "trl-sft-no-checkpointing",
        ("dpo", "alignkit"): "alignkit-dpo", ("dpo", "trl"): "trl-dpo-precompute-no-checkpointing",
        ("reward", "alignkit"): "alignkit-reward", ("reward", "trl"): "trl-reward-no-checkpointing",
        ("grpo", "alignkit"): "alignkit-grpo", ("grpo", "trl"): "trl-grpo",
        ("sft", "alignkit-checkpointing"): "alignkit-sft", ("dpo", "alignkit-checkpointing"): "alignkit-dpo"}


def build_world(root: Path, size: str, length: int, rows: int) -> dict:
    """The model and the exact-length rows of one sweep point (see the module's docstring)."""
    if (root / "world.json").exists():
        return json.loads((root / "world.json").read_text())
    from alignkit.models.tiny import build_tiny_llama, build_word_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(VOCAB_SIZE)]
    tokenizer = build_word_tokenizer(words)
    hidden, layers, heads, mlp = SIZES[size]
    model = build_tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                             intermediate_size=mlp, max_position_embeddings=max(512, length + 64))
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    import random

    rng = random.Random(0)
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    half = length // 2 - 1
    pairs = [{"prompt": say(half), "chosen": " " + say(half), "rejected": " " + say(half)} for _ in range(rows)]
    files = {"pairs": pairs, "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs],
             "prompts": [{"prompt": say(length - NEW_TOKENS - 1)} for _ in range(rows)]}
    world = {"policy": str(root / "policy"), "reference": str(root / "policy"), "reward": str(root / "policy")}
    for name, records in files.items():
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        world[name] = str(root / f"{name}.jsonl")
    (root / "world.json").write_text(json.dumps(world))
    return world


def step_flops(trainer: str, size: str, length: int) -> float:
    """The FLOPs one step's maths needs (flops.py), for the sweep's exact lengths."""
    import flops

    hidden, layers, heads, mlp = SIZES[size]
    shape = flops.Shape(hidden=hidden, layers=layers, intermediate=mlp, heads=heads, kv_heads=heads,
                        head_dim=hidden // heads, vocab=VOCAB_SIZE + 9)  # + <pad> <s> </s> <unk> and template words
    half = length // 2
    if trainer == "sft":
        return BATCH["sft"] * flops.sft(shape, half, half)
    if trainer in ("dpo", "reward"):
        return BATCH[trainer] * flops.pair(shape, half, half, half, trained=True, logits=trainer == "dpo")
    return flops.grpo_step(shape, [length - NEW_TOKENS] * PROMPTS, SAMPLES, NEW_TOKENS)


def run_point(trainer: str, side: str, size: str, length: int, steps: int, threads: int, work: Path) -> dict:
    from flops import matmul_peak

    world = build_world(work / f"{size}-{length}", size, length, rows=max(16, steps * BATCH[trainer] * 2))
    job = JOBS[(trainer, side)]
    settings = {"MAX_LENGTH": length + 64, "MAX_PROMPT_LENGTH": length, "BATCH": BATCH[trainer],
                "PROMPTS": PROMPTS, "SAMPLES": SAMPLES, "NEW_TOKENS": NEW_TOKENS,
                "CHECKPOINTING": side == "alignkit-checkpointing"}
    data = {"sft": world["sft"], "grpo": world["prompts"]}.get(trainer, world["pairs"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "BENCH_SETTINGS": json.dumps(settings)}
    (work / "world.json").write_text(json.dumps(world))
    out = tempfile.mkdtemp(prefix=f"sweep-{job}-", dir=work)
    peak = matmul_peak(threads)  # before and after the job: the machine is shared, its load changes
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "jobs.py"), job, str(work), str(steps), data, out],
                          capture_output=True, text=True, env=env)
    row = {"trainer": trainer, "side": side, "size": size, "length": length, "steps": steps,
           "params_m": params(size) / 1e6, "process_seconds": time.perf_counter() - began,
           "peak_flops": max(peak, matmul_peak(threads))}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    later = result["step_seconds"][1:] or result["step_seconds"]
    step = sum(later) / len(later)
    tokens = {"sft": BATCH["sft"] * length, "dpo": BATCH["dpo"] * 3 * length // 2,
              "reward": BATCH["reward"] * 3 * length // 2, "grpo": PROMPTS * SAMPLES * length}[trainer]
    return {**row, "step_seconds": step, "tokens_per_s": tokens / step, "peak_rss_mb": result["peak_rss_mb"],
            "train_mb": result["peak_rss_mb"] - result["rss_first_step_mb"],
            "step_flops": step_flops(trainer, size, length), "all_step_seconds": result["step_seconds"]}


def params(size: str) -> int:
    import flops

    hidden, layers, heads, mlp = SIZES[size]
    return flops.Shape(hidden, layers, mlp, heads, heads, hidden // heads, VOCAB_SIZE + 9).params


def points(args) -> list[tuple]:
    """(trainer, side, size, length), cheapest first (parameters × length), so that a sweep cut short has
    every trainer's small points; the middle point once."""
    out = []
    for trainer in args.trainers:
        sides = ["alignkit", "trl"] + (["alignkit-checkpointing"] if args.checkpointing and trainer in ("sft", "dpo")
                                       else [])
        for length in args.lengths:
            out += [(trainer, side, MIDDLE_SIZE, length) for side in sides]
        for size in args.sizes:
            if size != MIDDLE_SIZE:
                out += [(trainer, side, size, MIDDLE_LENGTH) for side in ("alignkit", "trl")]
    return sorted(out, key=lambda p: params(p[2]) * p[3])  # stable: each point's sides stay together


def plot(rows: list[dict], threads: int, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    good = [r for r in rows if "error" not in r]
    saved = []
    for axis, fixed, key_fixed, label in (("length", MIDDLE_SIZE, "size", "sequence length (tokens)"),
                                          ("params_m", MIDDLE_LENGTH, "length", "parameters (M)")):
        fig, axes = plt.subplots(3, 4, figsize=(17, 11), squeeze=False)
        for col, trainer in enumerate(("sft", "dpo", "reward", "grpo")):
            for side, style in (("alignkit", "o-"), ("trl", "s--"), ("alignkit-checkpointing", "^:")):
                series = sorted((r for r in good if r["trainer"] == trainer and r["side"] == side
                                 and r[key_fixed] == fixed), key=lambda r: r[axis])
                if not series:
                    continue
                xs = [r[axis] for r in series]
                axes[0][col].plot(xs, [r["step_seconds"] for r in series], style, label=side)
                axes[1][col].plot(xs, [r["peak_rss_mb"] for r in series], style, label=side)
                axes[2][col].plot(xs, [100 * r["step_flops"] / r["step_seconds"] / r["peak_flops"] for r in series], style,
                                  label=side)
            axes[0][col].set_title(trainer)
            for row, ylabel in enumerate(("seconds per step", "peak RSS (MB)", "% of matmul peak")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                if row < 2:
                    ax.set_yscale("log")
                ax.set_xlabel(label)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        name = "sweep_length.png" if axis == "length" else "sweep_size.png"
        fig.suptitle(f"alignkit vs TRL, CPU float32, {threads} thread(s): "
                     + ("model 21M, sequence length varies" if axis == "length" else "sequence 128, model size varies"))
        fig.tight_layout()
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
        saved.append(folder / name)
    return saved


def table(rows: list[dict]) -> str:
    lines = [f"{'trainer':7} {'side':23} {'size':>5} {'len':>5} {'s/step':>8} {'tok/s':>8} {'peak MB':>8} "
             f"{'train MB':>9} {'util %':>7}  (of GFLOP/s)"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['trainer']:7} {r['side']:23} {r['size']:>5} {r['length']:>5}  failed: {r['error']}")
            continue
        lines.append(f"{r['trainer']:7} {r['side']:23} {r['size']:>5} {r['length']:>5} {r['step_seconds']:8.2f} "
                     f"{r['tokens_per_s']:8.0f} {r['peak_rss_mb']:8.0f} {r['train_mb']:9.0f} "
                     f"{100 * r['step_flops'] / r['step_seconds'] / r['peak_flops']:7.1f}  ({r['peak_flops'] / 1e9:.0f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", default="sft,dpo,reward,grpo")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--lengths", default="128,256,512,1024,2048")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--plots", default=str(HERE / "plots"))
    parser.add_argument("--work", default=None, help="folder for models and runs (default: a temp folder)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep OUT/sweep.json's points and run the others")
    args = parser.parse_args()
    args.trainers = args.trainers.split(",")
    args.sizes = args.sizes.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    sys.path.insert(0, str(HERE))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads((out / "sweep.json").read_text())
        print(table(saved["rows"]))
        print("\n".join(str(p) for p in plot(saved["rows"], saved["threads"], Path(args.plots))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="sweep-"))
    rows: list[dict] = []
    if args.resume and (out / "sweep.json").exists():  # keep the points measured so far
        rows = [r for r in json.loads((out / "sweep.json").read_text())["rows"] if "error" not in r]
    done = {(r["trainer"], r["side"], r["size"], r["length"]) for r in rows}
    for trainer, side, size, length in points(args):
        if (trainer, side, size, length) in done:
            continue
        row = run_point(trainer, side, size, length, args.steps, args.threads, work)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        (out / "sweep.json").write_text(json.dumps({"threads": args.threads, "rows": rows}))
        with open(out / "sweep.csv", "w", newline="") as f:
            fields = [k for k in rows[0] if k != "all_step_seconds"] + ["utilisation"]
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                util = r["step_flops"] / r["step_seconds"] / r["peak_flops"] if "step_seconds" in r else ""
                writer.writerow({**r, "utilisation": util})
    print(table(rows))
    print("\n".join(str(p) for p in plot(rows, args.threads, Path(args.plots))))


if __name__ == "__main__":
    main()
