"""Time to first step: where a short alignkit run spends its time before (and in) its first step (SPEC §12).

    python benchmarks/first_step.py [--trainer dpo|sft] [--pairs 240] [--threads 2] [--world DIR] [--runs 2]

Runs `alignkit dpo` (or sft) for one step on the benchmark's world in a fresh process, `--runs` times with
the same output folder settings, and prints each phase: Python start and imports, the tokenizer, reading the
rows, tokenising them, loading the policy (and the reference), the reference pass, the first step, and what
is left (run folder, saving the final model). The phases are timed by wrapping alignkit's own functions from
outside, so nothing in the library changes for the measurement. The second run shows what a rerun on
unchanged data and models saves (caches).
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

_CHILD = r"""
import json, sys, time
began = float(sys.argv[1])
phases = {"python start": time.time() - began}
t = time.perf_counter()
import torch
phases["import torch"] = time.perf_counter() - t
t = time.perf_counter()
import transformers
phases["import transformers"] = time.perf_counter() - t
t = time.perf_counter()
trainer, world_path, out = sys.argv[2], sys.argv[3], sys.argv[4]
from alignkit.config import DPOConfig, SFTConfig
import alignkit.train.loop as loop
if trainer == "dpo":
    import alignkit.train.dpo as module
    import alignkit.train.preference_data as task_module
else:
    import alignkit.train.sft as module
    task_module = module
phases["import alignkit"] = time.perf_counter() - t

def timed(owner, name, phase, first_only=False):
    inner = getattr(owner, name)
    def wrapper(*a, **k):
        if first_only and phase in phases:
            return inner(*a, **k)
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)

timed(module, "load_tokenizer", "tokenizer")
timed(module, "load_train_eval", "read rows")
for name in ("encode_pair", "encode_sft"):
    if hasattr(module, name):
        timed(module, name, "tokenize")
for name in ("Encoder",):
    if hasattr(module, name):
        timed(module, name, "tokenize")
timed(task_module, "load_causal_lm", "load policy")
if hasattr(task_module, "build_reference"):
    timed(task_module, "build_reference", "load reference")
    timed(task_module, "precompute_reference", "reference pass")
timed(loop, "train_step", "first step", first_only=True)
world = json.load(open(world_path))
common = dict(output_dir=out, max_steps=1, batch_size=8, lr=1e-5, lr_schedule="constant", max_length=512,
              seed=0, resume="never", log_every=1)
t = time.perf_counter()
if trainer == "dpo":
    module.train_dpo(DPOConfig(model=world["policy"], ref_model=world["reference"], data=(world["pairs"],),
                               max_prompt_length=256, **common))
else:
    module.train_sft(SFTConfig(model=world["policy"], data=(world["sft"],), **common))
total = time.perf_counter() - t
phases["rest (run folder, optimizer, saving)"] = total - sum(v for k, v in phases.items() if not k.startswith(("python", "import")))
print(json.dumps(phases))
"""


def measure(trainer: str, world_json: Path, threads: int, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    began = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(began), trainer, str(world_json), out],
                          capture_output=True, text=True, env=env)
    whole = time.time() - began
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "whole process": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=["dpo", "sft"], default="dpo")
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--world", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from world import build

    world_dir = Path(args.world or tempfile.mkdtemp(prefix="bench-world-"))
    if not (world_dir / "world.json").exists():
        (world_dir / "world.json").write_text(json.dumps(build(world_dir, args.pairs)))
    runs = [measure(args.trainer, world_dir / "world.json", args.threads, tempfile.mkdtemp(prefix="first-step-"))
            for _ in range(args.runs)]
    print(f"alignkit {args.trainer}: one step on {args.pairs} examples, {args.threads} threads; seconds per run")
    for phase in runs[0]:
        print(f"  {phase:38} " + "  ".join(f"{r.get(phase, 0.0):7.2f}" for r in runs))
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
