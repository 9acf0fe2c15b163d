"""alignkit vs TRL, side by side, on the same model, data and settings (SPEC §12).

    python benchmarks/run.py [--steps 30] [--pairs 240] [--threads 2] [--only dpo|reward|online|ppo]
                              [--trl-ppo-python VENV/bin/python]

Each job runs in its own process (one after another, same thread count); the table gives wall time, peak
RSS, and the ratios TRL / alignkit (so > 1 means alignkit is faster or smaller). TRL runs in its default
configuration (which turns gradient checkpointing on), with `precompute_ref_log_probs=True`, and without
gradient checkpointing (its fastest setting on CPU, and alignkit's default). The first-step losses
come from a separate one-step run on one batch of 8 pairs, so that data order cannot change them.
Two speed ratios: the whole job's wall time, and training pairs per second in the training loop (SPEC §12).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_job(job: str, world_dir: Path, steps: int, data: str, threads: int, python: str = sys.executable) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench-{job}-")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([python, str(HERE / "jobs.py"), job, str(world_dir), str(steps), data, out],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["dpo", "reward", "online", "ppo"], default=None,
                        help="one group; online (grpo, rloo vs TRL's GRPOTrainer/RLOOTrainer) and ppo (vs TRL 0.29's "
                             "PPOTrainer) run only when named")
    parser.add_argument("--trl-ppo-python", default=None,
                        help="the python of a virtual environment with trl==0.29.1 and transformers<5.3, for --only ppo")
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
    groups = {"dpo": [("alignkit-dpo", "trl-dpo"), ("alignkit-dpo", "trl-dpo-precompute"),
                      ("alignkit-dpo", "trl-dpo-no-checkpointing")],
              "reward": [("alignkit-reward", "trl-reward"), ("alignkit-reward", "trl-reward-no-checkpointing")],
              "online": [("alignkit-grpo", "trl-grpo"), ("alignkit-rloo", "trl-rloo")],
              "ppo": [("alignkit-ppo", "trl-ppo"), ("alignkit-ppo", "trl-ppo-checkpointing")]}
    if args.only == "ppo" and not args.trl_ppo_python:
        raise SystemExit("--only ppo needs --trl-ppo-python (see benchmarks/README.md for the environment)")
    results = {}
    for name, comparisons in groups.items():
        if (args.only and name != args.only) or (name in ("online", "ppo") and args.only != name):
            continue
        for ours, theirs in comparisons:
            for job in (ours, theirs):
                if job not in results:
                    python = args.trl_ppo_python if job.startswith("trl-ppo") else sys.executable
                    timed = run_job(job, world_dir, args.steps, world["pairs"], args.threads, python)
                    if name not in ("online", "ppo"):
                        timed["first_loss"] = run_job(job, world_dir, 1, world["first_batch"], args.threads)["first_loss"]
                    results[job] = timed
            a, t = results[ours], results[theirs]
            print(f"\n{ours} vs {theirs}")
            print(f"  wall time   {a['seconds']:8.2f} s vs {t['seconds']:8.2f} s   speed-up x{t['seconds'] / a['seconds']:.2f}"
                  "   (whole job: imports, loading, tokenizing, reference pass, training)")
            what = "iterations/s" if name in ("online", "ppo") else "pairs/s"
            print(f"  loop time   {a['loop_seconds']:8.2f} s vs {t['loop_seconds']:8.2f} s   speed-up "
                  f"x{t['loop_seconds'] / a['loop_seconds']:.2f}   (training loop: {what})")
            print(f"  peak RSS    {a['peak_rss_mb']:8.0f} MB vs {t['peak_rss_mb']:8.0f} MB   ratio x{t['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
            if name not in ("online", "ppo"):
                diff = abs(a["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
                print(f"  first loss  {a['first_loss']:.6f} vs {t['first_loss']:.6f}   rel. diff {100 * diff:.3f}%")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
