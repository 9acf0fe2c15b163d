"""One benchmark job per process: `python benchmarks/jobs.py JOB WORLD_DIR STEPS DATA OUT_DIR`.

Prints one JSON line: wall seconds of the whole job (model loading, tokenization, reference pass, training),
seconds of the training loop alone (alignkit: its step loop; TRL: `train_runtime`; a precomputed reference
pass is outside both), the process's peak resident memory, and the first logged training loss. Settings shared by both libraries:
batch 8, constant learning rate 1e-5, β 0.1, no warmup, no weight decay, gradient clipping at 1.0, seed 0.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

BATCH, LR, BETA, SEED = 8, 1e-5, 0.1, 0
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256  # longer than every benchmark row: nothing is truncated
CHECKPOINTING = False  # alignkit's gradient checkpointing (sweep.py's alignkit-checkpointing side)
STEP_SECONDS: list[float] = []  # each training step's wall time, by the hooks below
GENERATE_SECONDS: list[float] = []  # each generation call's wall time (online jobs: alignkit's rollout, TRL's generate)
RSS_AT_FIRST_STEP: list[float] = []


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(inner, into: list[float], first=None):
    """`inner`, appending each call's wall time to `into` (and calling `first()` before the first call)."""
    def timed(*args, **kwargs):
        if first is not None and not into:
            first()
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - began)
    return timed


def _rss_at_first_step() -> None:
    if not RSS_AT_FIRST_STEP:
        RSS_AT_FIRST_STEP.append(rss_mb())


def time_alignkit_steps() -> None:
    """Time each step of alignkit's loop (offline trainers and ppo/grpo/rloo alike)."""
    from alignkit.train import loop, ppo

    for cls in (loop.BatchTrainer, ppo.PPOTrainer):
        cls.step = _timed(cls.step, STEP_SECONDS, _rss_at_first_step)


def trl_step_timer():
    """A callback that times each optimizer step of a TRL trainer (generation included for GRPO and RLOO)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not RSS_AT_FIRST_STEP:
                RSS_AT_FIRST_STEP.append(rss_mb())
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            STEP_SECONDS.append(time.perf_counter() - self.began)

    return StepTimer()


def alignkit_dpo(world, steps, data, out, precompute=True):
    from alignkit.config import DPOConfig
    from alignkit.train.dpo import train_dpo

    train_dpo(DPOConfig(model=world["policy"], ref_model=world["reference"], data=(data,), output_dir=out,
                        max_steps=steps, batch_size=BATCH, lr=LR, beta=BETA, lr_schedule="constant",
                        max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, seed=SEED, resume="never",
                        log_every=1, gradient_checkpointing=CHECKPOINTING))
    return _first_loss(out), _loop_seconds(out)


def alignkit_reward(world, steps, data, out):
    from alignkit.config import RewardConfig
    from alignkit.train.reward import train_reward

    train_reward(RewardConfig(model=world["policy"], data=(data,), output_dir=out, max_steps=steps,
                              batch_size=BATCH, lr=LR, lr_schedule="constant", max_length=MAX_LENGTH,
                              max_prompt_length=MAX_PROMPT_LENGTH, seed=SEED, resume="never", eval_fraction=0.0, log_every=1))
    return _first_loss(out), _loop_seconds(out)


def alignkit_sft(world, steps, data, out):
    from alignkit.config import SFTConfig
    from alignkit.train.sft import train_sft

    train_sft(SFTConfig(model=world["policy"], data=(data,), output_dir=out, max_steps=steps, batch_size=BATCH,
                        lr=LR, lr_schedule="constant", max_length=MAX_LENGTH, seed=SEED, resume="never", log_every=1,
                        gradient_checkpointing=CHECKPOINTING))
    return _first_loss(out), _loop_seconds(out)


def _loop_seconds(out):
    with open(os.path.join(out, "final", "alignkit_run.json")) as f:
        return json.load(f)["loop_seconds"]


def _first_loss(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return next(json.loads(line)["loss"] for line in f if '"loss"' in line)


def _trl_common(out, steps, checkpointing=True):
    # TRL's DPOConfig and RewardConfig turn gradient checkpointing on by default; alignkit's default is off
    return dict(gradient_checkpointing=checkpointing, output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=SEED,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, bf16=False)


def trl_dpo(world, steps, data, out, precompute=False, checkpointing=True):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    model = AutoModelForCausalLM.from_pretrained(world["policy"])
    ref = AutoModelForCausalLM.from_pretrained(world["reference"])
    args = DPOConfig(**_trl_common(out, steps, checkpointing), beta=BETA, max_length=MAX_LENGTH,
                     precompute_ref_log_probs=precompute)
    dataset = load_dataset("json", data_files=data, split="train")
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[trl_step_timer()])
    result = trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h), result.metrics["train_runtime"]


def trl_sft(world, steps, data, out, checkpointing=True):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    model = AutoModelForCausalLM.from_pretrained(world["policy"])
    # prompt-completion rows: TRL's loss is on the completion only, like alignkit's default
    args = SFTConfig(**_trl_common(out, steps, checkpointing), max_length=MAX_LENGTH)
    dataset = load_dataset("json", data_files=data, split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[trl_step_timer()])
    result = trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h), result.metrics["train_runtime"]


def trl_reward(world, steps, data, out, checkpointing=True):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    model = AutoModelForSequenceClassification.from_pretrained(world["policy"], num_labels=1)
    args = RewardConfig(**_trl_common(out, steps, checkpointing), max_length=MAX_LENGTH)
    dataset = load_dataset("json", data_files=data, split="train")
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[trl_step_timer()])
    result = trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h), result.metrics["train_runtime"]


PROMPTS, SAMPLES, NEW_TOKENS, KL = 4, 4, 16, 0.05


def even_word_share(prompts, completions, **_):
    """The rule reward of the online benchmark: the share of words w<n> with even n."""
    out = []
    for c in completions:
        words = c.split() if isinstance(c, str) else []
        out.append(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


def alignkit_online(world, steps, data, out, algo="grpo"):
    from alignkit.config import PPOConfig
    from alignkit.rl.rollout import generate
    from alignkit.train.ppo import train_ppo

    train_ppo(PPOConfig(model=world["policy"], data=(data,), output_dir=out, algo=algo, max_steps=steps,
                        reward_fn="python:jobs:even_word_share", rollout_batch_size=PROMPTS,
                        samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS, lr=LR, kl_coef=KL, seed=SEED,
                        resume="never", max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH),
              generate_fn=_timed(generate, GENERATE_SECONDS))
    with open(os.path.join(out, "final", "alignkit_run.json")) as f:
        return json.load(f)["metrics"].get("policy_loss", float("nan")), _loop_seconds(out)


def trl_online(world, steps, data, out, algo="grpo"):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.utils import GenerationMixin

    GenerationMixin.generate = _timed(GenerationMixin.generate, GENERATE_SECONDS)  # what TRL's trainers sample with
    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    model = AutoModelForCausalLM.from_pretrained(world["policy"])
    dataset = load_dataset("json", data_files=data, split="train").select_columns(["prompt"])
    common = dict(_trl_common(out, steps), per_device_train_batch_size=PROMPTS * SAMPLES,
                  num_generations=SAMPLES, max_completion_length=NEW_TOKENS, beta=KL, temperature=1.0)
    if algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    args = Config(**common)
    trainer = Trainer(model=model, reward_funcs=[even_word_share], args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[trl_step_timer()])
    result = trainer.train()
    return float("nan"), result.metrics["train_runtime"]


PPO_ROLLOUTS = 16


def alignkit_ppo(world, steps, data, out):
    from alignkit.config import PPOConfig
    from alignkit.train.ppo import train_ppo

    train_ppo(PPOConfig(model=world["policy"], data=(data,), output_dir=out, algo="ppo", max_steps=steps,
                        reward_model=world["reward"], rollout_batch_size=PPO_ROLLOUTS, samples_per_prompt=1,
                        max_new_tokens=NEW_TOKENS, ppo_epochs=1, num_minibatches=1, lr=LR, kl_coef=KL,
                        temperature=1.0, seed=SEED, resume="never", max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH))
    with open(os.path.join(out, "final", "alignkit_run.json")) as f:
        return json.load(f)["metrics"].get("policy_loss", float("nan")), _loop_seconds(out)


def trl_ppo(world, steps, data, out, checkpointing=False):
    """TRL 0.29's PPOTrainer (`trl.experimental.ppo`, the last TRL with PPO; it needs transformers < 5.3, so
    this job runs in its own virtual environment: see benchmarks/README.md)."""
    import os as _os

    _os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(world["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(world["policy"])
    ref = AutoModelForCausalLM.from_pretrained(world["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(world["reward"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(world["reward"], num_labels=1)
    dataset = load_dataset("json", data_files=data, split="train")
    dataset = dataset.map(lambda row: {"input_ids": tokenizer(row["prompt"])["input_ids"]},
                          remove_columns=dataset.column_names)
    common = {**_trl_common(out, steps, checkpointing), "max_steps": -1, "per_device_train_batch_size": PPO_ROLLOUTS}
    args = PPOConfig(**common, gradient_accumulation_steps=1,
                     total_episodes=steps * PPO_ROLLOUTS, num_mini_batches=1, num_ppo_epochs=1,
                     response_length=NEW_TOKENS, temperature=1.0, kl_coef=KL, stop_token="eos",
                     local_rollout_forward_batch_size=PPO_ROLLOUTS, num_sample_generations=0)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    return float("nan"), time.perf_counter() - start


JOBS = {
    "alignkit-ppo": alignkit_ppo,
    "trl-ppo": trl_ppo,
    "trl-ppo-checkpointing": lambda *a: trl_ppo(*a, checkpointing=True),
    "alignkit-grpo": lambda *a: alignkit_online(*a, algo="grpo"),
    "trl-grpo": lambda *a: trl_online(*a, algo="grpo"),
    "alignkit-rloo": lambda *a: alignkit_online(*a, algo="rloo"),
    "trl-rloo": lambda *a: trl_online(*a, algo="rloo"),
    "alignkit-dpo": alignkit_dpo,
    "trl-dpo": trl_dpo,
    "trl-dpo-precompute": lambda *a: trl_dpo(*a, precompute=True),
    "trl-dpo-no-checkpointing": lambda *a: trl_dpo(*a, checkpointing=False),
    "trl-dpo-precompute-no-checkpointing": lambda *a: trl_dpo(*a, precompute=True, checkpointing=False),
    "alignkit-sft": alignkit_sft,
    "trl-sft": trl_sft,
    "trl-sft-no-checkpointing": lambda *a: trl_sft(*a, checkpointing=False),
    "alignkit-reward": alignkit_reward,
    "trl-reward": trl_reward,
    "trl-reward-no-checkpointing": lambda *a: trl_reward(*a, checkpointing=False),
}


def main():
    job, world_dir, steps, data, out = sys.argv[1:6]
    globals().update(json.loads(os.environ.get("BENCH_SETTINGS", "{}")))  # sweep.py's shapes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    with open(os.path.join(world_dir, "world.json")) as f:
        world = json.load(f)
    if job.startswith("alignkit"):
        time_alignkit_steps()
    start = time.perf_counter()
    first_loss, loop_seconds = JOBS[job](world, int(steps), data, out)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"job": job, "seconds": seconds, "loop_seconds": loop_seconds, "peak_rss_mb": peak_mb,
                      "first_loss": first_loss, "step_seconds": STEP_SECONDS, "generate_seconds": GENERATE_SECONDS,
                      "rss_first_step_mb": RSS_AT_FIRST_STEP[0] if RSS_AT_FIRST_STEP else float("nan")}))


if __name__ == "__main__":
    main()
