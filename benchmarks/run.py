"""alignkit vs TRL, side by side, on the same model, data and settings (SPEC §12).

    python benchmarks/run.py [--steps 30] [--pairs 240] [--threads 2] [--only sft|dpo|reward|online|ppo]
                              [--trl-ppo-python VENV/bin/python]

Each job runs in its own process (one after another, same thread count). Per comparison: the whole process's
wall time (Python start, imports, loading, tokenizing, reference pass, training), the training loop's time,
peak RSS, the ratios TRL / alignkit (so > 1 means alignkit is faster or smaller), and each side's
utilisation: the FLOPs the loop's maths needs (`flops.py`, one convention for both sides) per second of loop,
over the float32 matmul peak measured in this run with the same thread count. TRL runs in its default
configuration (which turns gradient checkpointing on), with `precompute_ref_log_probs=True`, and without
gradient checkpointing (its fastest setting on CPU, and alignkit's default). The first-step losses come from a
separate one-step run on one batch of 8, so that data order cannot change them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_job(job: str, world_dir: Path, steps: int, data: str, threads: int, python: str = sys.executable,
            settings: dict | None = None) -> dict:
    """Run one job of jobs.py in a fresh process; `settings` override jobs.py's shapes (BATCH, SAMPLES, …)."""
    out = tempfile.mkdtemp(prefix=f"bench-{job}-")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "BENCH_SETTINGS": json.dumps(settings or {})}
    began = time.perf_counter()
    proc = subprocess.run([python, str(HERE / "jobs.py"), job, str(world_dir), str(steps), data, out],
                          capture_output=True, text=True, env=env)
    process_seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": process_seconds}


# Which jobs run the reference model inside their training loop (the others compute its log-probs before it)
REFERENCE_IN_LOOP = {"trl-dpo", "trl-dpo-no-checkpointing"}


def loop_flops(job: str, group: str, world: dict, steps: int) -> float:
    """The FLOPs the maths of `job`'s training loop needs (flops.py's convention), from the benchmark's data:
    the mean example × the examples the loop trains on (exact when steps × batch is one epoch)."""
    import flops
    import jobs
    from transformers import AutoTokenizer

    shape = flops.Shape.from_folder(world["policy"])
    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    with open(world["pairs"]) as f:
        rows = [json.loads(line) for line in f]

    def count(text, prompt):  # <s> + prompt words; response words + </s>
        return len(tokenizer(text, add_special_tokens=prompt)["input_ids"]) + (0 if prompt else 1)

    lengths = [(count(r["prompt"], True), count(r["chosen"], False), count(r["rejected"], False)) for r in rows]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    if group == "sft":
        return steps * jobs.BATCH * mean([flops.sft(shape, p, c) for p, c, _ in lengths])
    if group in ("dpo", "reward"):
        dpo = group == "dpo"
        per_pair = [flops.pair(shape, p, c, r, trained=True, logits=dpo)
                    + (flops.pair(shape, p, c, r, trained=False) if job in REFERENCE_IN_LOOP else 0)
                    for p, c, r in lengths]
        return steps * jobs.BATCH * mean(per_pair)
    prompt = round(mean([p for p, _, _ in lengths]))
    if group == "online":
        return steps * flops.grpo_step(shape, [prompt] * jobs.PROMPTS, jobs.SAMPLES, jobs.NEW_TOKENS)
    return steps * flops.ppo_step(shape, [prompt] * jobs.PPO_ROLLOUTS, jobs.NEW_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["sft", "dpo", "reward", "online", "ppo"], default=None,
                        help="one group; online (grpo, rloo vs TRL's GRPOTrainer/RLOOTrainer) and ppo (vs TRL 0.29's "
                             "PPOTrainer) run only when named")
    parser.add_argument("--trl-ppo-python", default=None,
                        help="the python of a virtual environment with trl==0.29.1 and transformers<5.3, for --only ppo")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each job this many times, in A B B A order, and keep the fastest loop")
    parser.add_argument("--world", default=None, help="folder for the model and data (default: a temp folder)")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit('the benchmark needs TRL: pip install -e ".[bench]"') from None

    sys.path.insert(0, str(HERE))
    from world import build

    world_dir = Path(args.world or tempfile.mkdtemp(prefix="bench-world-"))
    world = build(world_dir, args.pairs)
    (world_dir / "world.json").write_text(json.dumps(world))
    import torch
    import transformers

    if args.only == "ppo":
        print(subprocess.run([args.trl_ppo_python, "-c", "import trl, transformers; print('TRL side: trl', "
                              "trl.__version__, 'transformers', transformers.__version__)"],
                             capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{args.threads} threads, {args.steps} steps of batch 8, {args.pairs} pairs")
    groups = {"sft": [("alignkit-sft", "trl-sft"), ("alignkit-sft", "trl-sft-no-checkpointing")],
              "dpo": [("alignkit-dpo", "trl-dpo"), ("alignkit-dpo", "trl-dpo-precompute"),
                      ("alignkit-dpo", "trl-dpo-no-checkpointing")],
              "reward": [("alignkit-reward", "trl-reward"), ("alignkit-reward", "trl-reward-no-checkpointing")],
              "online": [("alignkit-grpo", "trl-grpo"), ("alignkit-rloo", "trl-rloo")],
              "ppo": [("alignkit-ppo", "trl-ppo"), ("alignkit-ppo", "trl-ppo-checkpointing")]}
    if args.only == "ppo" and not args.trl_ppo_python:
        raise SystemExit("--only ppo needs --trl-ppo-python (see benchmarks/README.md for the environment)")
    from flops import matmul_peak

    peaks = [matmul_peak(args.threads)]
    print(f"float32 matmul peak, {args.threads} threads (2048² torch.mm, best of 5): {peaks[0] / 1e9:.1f} GFLOP/s")
    results, rows = {}, []
    for name, comparisons in groups.items():
        if (args.only and name != args.only) or (name in ("online", "ppo") and args.only != name):
            continue
        data, first_batch = ((world["sft"], world["sft_first_batch"]) if name == "sft"
                             else (world["pairs"], world["first_batch"]))
        jobs_here = list(dict.fromkeys(job for pair in comparisons for job in pair))
        runs: dict[str, list] = {job: [] for job in jobs_here}
        for turn in range(args.repeat):  # A B … B A: a load that drifts during the group hits both sides alike
            for job in (jobs_here if turn % 2 == 0 else jobs_here[::-1]):
                python = args.trl_ppo_python if job.startswith("trl-ppo") else sys.executable
                runs[job].append(run_job(job, world_dir, args.steps, data, args.threads, python))
        for job, timed in runs.items():  # the fastest of the repeats: the one least disturbed by other load
            best = {**min(timed, key=lambda r: r["loop_seconds"]),
                    "process_seconds": min(r["process_seconds"] for r in timed),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in timed),
                    "loop_seconds_all": [r["loop_seconds"] for r in timed]}
            best["loop_flops"] = loop_flops(job, name, world, args.steps)
            if name not in ("online", "ppo"):
                python = args.trl_ppo_python if job.startswith("trl-ppo") else sys.executable
                best["first_loss"] = run_job(job, world_dir, 1, first_batch, args.threads, python)["first_loss"]
            results[job] = best
        rows += [(name, ours, theirs) for ours, theirs in comparisons]
        peaks.append(matmul_peak(args.threads))
    peak = max(peaks)  # the machine is shared: the best measurement is nearest its limit
    print(f"float32 matmul peak after each group: {', '.join(f'{p / 1e9:.1f}' for p in peaks[1:])} GFLOP/s; "
          f"utilisation below is of {peak / 1e9:.1f} GFLOP/s")

    def used(job):
        r = results[job]
        return r["loop_flops"] / r["loop_seconds"] / peak

    for name, ours, theirs in rows:
        a, t = results[ours], results[theirs]
        print(f"\n{ours} vs {theirs}")
        print(f"  process     {a['process_seconds']:8.2f} s vs {t['process_seconds']:8.2f} s   speed-up "
              f"x{t['process_seconds'] / a['process_seconds']:.2f}   (whole process: Python start, imports, "
              "loading, tokenizing, reference pass, training)")
        what = "iterations/s" if name in ("online", "ppo") else "examples/s"
        print(f"  loop time   {a['loop_seconds']:8.2f} s vs {t['loop_seconds']:8.2f} s   speed-up "
              f"x{t['loop_seconds'] / a['loop_seconds']:.2f}   (training loop: {what})")
        print(f"  peak RSS    {a['peak_rss_mb']:8.0f} MB vs {t['peak_rss_mb']:8.0f} MB   ratio "
              f"x{t['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
        print(f"  utilisation {100 * used(ours):7.1f} %  vs {100 * used(theirs):7.1f} %    of the measured peak "
              f"(loop FLOPs {a['loop_flops'] / 1e9:.0f} vs {t['loop_flops'] / 1e9:.0f} G: the maths needed)")
        if name not in ("online", "ppo"):
            diff = abs(a["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
            print(f"  first loss  {a['first_loss']:.6f} vs {t['first_loss']:.6f}   rel. diff {100 * diff:.3f}%")
    print("\nsummary (TRL / alignkit; utilisation of the measured float32 matmul peak)")
    print(f"{'alignkit':16} {'TRL':26} {'loop':>6} {'process':>8} {'memory':>7} {'util alignkit':>14} {'util TRL':>9}")
    for _, ours, theirs in rows:
        a, t = results[ours], results[theirs]
        print(f"{ours:16} {theirs:26} {t['loop_seconds'] / a['loop_seconds']:6.2f} "
              f"{t['process_seconds'] / a['process_seconds']:8.2f} {t['peak_rss_mb'] / a['peak_rss_mb']:7.2f} "
              f"{100 * used(ours):13.1f}% {100 * used(theirs):8.1f}%")
    print("\n" + json.dumps({"peak_flops": peak, "peaks": peaks, "jobs": results}))


if __name__ == "__main__":
    main()
