"""A few steps of every trainer on one GPU, on a model built in-process: tokens/s and peak GPU memory (SPEC §12).

    bash benchmarks/gpu_smoke.sh [--size small|medium|smoke] [--steps 8] [--dtype bfloat16]
                                 [--gradient-checkpointing] [--allow-cpu]

The model is a Llama built here (random weights; nothing is downloaded) with a word-level tokenizer whose
vocabulary is padded to a realistic size (32k), so the vocabulary projection costs what it costs on a real
model: `small` ≈ 0.1B parameters, `medium` ≈ 0.5B, `smoke` a tiny one for checking the script itself on a
CPU (`--allow-cpu`; the test suite runs it so). The data are long rows of random words (prompts of
`--prompt-words`, responses of `--response-words`). Each trainer runs in this process, one after the other,
with the GPU's peak memory reset in between: sft, reward, dpo, kto, then ppo with a value model and grpo
(4 samples per prompt) against a rule reward. The table gives, per trainer: the steps, the training loop's
tokens/s (the trainer's own count, prompt + response tokens of the step's forward passes), the loop's seconds
per step, the peak GPU memory, the attention implementation and the compute dtype. Whole under 5 minutes on one
GPU at `small` (`--steps 8`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, layers, heads, vocabulary
    "smoke": (64, 2, 4, 2_000),
    "small": (768, 12, 12, 32_000),
    "medium": (1024, 24, 16, 32_000),
}


def build_model(root: Path, size: str) -> Path:
    from alignkit.examples import WORDS
    from alignkit.models.tiny import save_tiny_model

    hidden, layers, heads, vocab = SIZES[size]
    words = list(dict.fromkeys(WORDS)) + [f"w{i}" for i in range(vocab)]
    path = save_tiny_model(root / f"model-{size}", words[:vocab], hidden_size=hidden, num_layers=layers,
                           num_heads=heads, max_position_embeddings=4096)
    return path


def write_data(root: Path, vocab: list[str], rows: int, prompt_words: int, response_words: int, seed: int = 0):
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    sft, pairs, prompts = [], [], []
    for _ in range(rows):
        prompt = words(prompt_words)
        sft.append({"prompt": prompt, "completion": words(response_words)})
        pairs.append({"prompt": prompt, "chosen": words(response_words), "rejected": words(response_words)})
        prompts.append({"prompt": prompt})
    out = {}
    for name, data in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--response-words", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=128, help="ppo/grpo: tokens sampled per response")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated trainers (default: all)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to check the script)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print("gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a machine with a GPU, or pass --allow-cpu to check the script.", file=sys.stderr)
        raise SystemExit(2)
    dtype = args.dtype if gpu else "float32"

    from alignkit.config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig
    from alignkit.train.dpo import train_dpo
    from alignkit.train.kto import train_kto
    from alignkit.train.ppo import train_ppo
    from alignkit.train.reward import train_reward
    from alignkit.train.sft import train_sft

    root = Path(tempfile.mkdtemp(prefix="alignkit-gpu-smoke-"))
    began = time.perf_counter()
    model = str(build_model(root, args.size))
    vocab = [w for w in json.loads((Path(model) / "tokenizer.json").read_text())["model"]["vocab"]
             if not w.startswith("<")]
    rows = max(args.batch_size * args.steps, 16)
    data = write_data(root, vocab, rows, args.prompt_words, args.response_words)
    length = args.prompt_words + args.response_words + 8
    common = dict(model=model, max_steps=args.steps, batch_size=args.batch_size, lr=1e-5, dtype=dtype,
                  gradient_checkpointing=args.gradient_checkpointing, max_length=length,
                  max_prompt_length=args.prompt_words + 4, log_every=1, save_every=0)
    rollout = dict(model=model, max_steps=args.steps, rollout_batch_size=args.batch_size, lr=1e-6, dtype=dtype,
                   gradient_checkpointing=args.gradient_checkpointing, max_new_tokens=args.new_tokens,
                   max_length=length, max_prompt_length=args.prompt_words + 4, log_every=1, save_every=0,
                   reward_fn="python:alignkit.examples:good_word_share", data=(str(data["prompts"]),))
    jobs = {
        "sft": lambda out: train_sft(SFTConfig(**common, data=(str(data["sft"]),), output_dir=out)),
        "reward": lambda out: train_reward(RewardConfig(**common, data=(str(data["pairs"]),), output_dir=out)),
        "dpo": lambda out: train_dpo(DPOConfig(**common, data=(str(data["pairs"]),), output_dir=out)),
        "kto": lambda out: train_kto(KTOConfig(**common, data=(str(data["pairs"]),), output_dir=out)),
        "ppo": lambda out: train_ppo(PPOConfig(**rollout, algo="ppo", output_dir=out)),
        "grpo": lambda out: train_ppo(PPOConfig(**{**rollout, "rollout_batch_size": max(1, args.batch_size // 4)},
                                                algo="grpo", samples_per_prompt=4, output_dir=out)),
    }
    only = [j for j in args.only.split(",") if j] or list(jobs)
    built = _load(model)
    attention = built.config._attn_implementation  # what transformers picks here (sdpa where available)
    params = sum(p.numel() for p in built.parameters())
    del built
    table = []
    for name in only:
        out = str(root / name)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        jobs[name](out)
        run = json.loads((Path(out) / "final" / "alignkit_run.json").read_text())
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        speeds = [m["tokens_per_s"] for m in logged if "tokens_per_s" in m][1:] or [logged[-1]["tokens_per_s"]]
        table.append({
            "trainer": name, "steps": run["step"],
            "tokens_per_s": sum(speeds) / len(speeds),  # after the first step (warm-up, allocator, kernels)
            "s_per_step": run["loop_seconds"] / max(run["step"], 1),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan"),
            "attention": attention,
            "dtype": dtype, "gradient_checkpointing": args.gradient_checkpointing,
        })
    device = torch.cuda.get_device_name() if gpu else "CPU (--allow-cpu: a check of the script, not a measurement)"
    config = json.loads((Path(model) / "config.json").read_text())
    print(f"\ngpu_smoke: {device}; model {args.size} ({params / 1e6:.1f}M parameters, vocabulary "
          f"{config['vocab_size']}), batch {args.batch_size}, {args.prompt_words}+{args.response_words} words per row, "
          f"{args.new_tokens} new tokens (ppo/grpo), {dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'trainer':8} {'steps':>5} {'tokens/s':>10} {'s/step':>8} {'peak GPU MiB':>13}  attention")
    for r in table:
        print(f"{r['trainer']:8} {r['steps']:>5} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} "
              f"{r['peak_gpu_mib']:>13.0f}  {r['attention']}")
    print(f"whole script: {time.perf_counter() - began:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


if __name__ == "__main__":
    main()
