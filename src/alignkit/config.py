"""Config: one frozen dataclass per command; every field carries a one-line doc that becomes `--help`.

A config is resolved from three layers, later ones winning: the dataclass defaults, a YAML file
(`--config FILE.yaml`), and command-line options (`--max-steps 10` sets `max_steps`). Unknown fields are
errors that name the closest valid ones. Validation happens on construction (`__post_init__`), so a
config object that exists is a valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import UserError


def option(default, doc: str, choices: tuple | None = None):
    """A config field with its one-line doc (and allowed values, checked on construction)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices})


def hidden(default):
    """An inherited field a command does not use: kept at `default`, and not an option, a YAML key or a line of
    `--help` of that command (so setting it is an unknown-field error, not silently ignored)."""
    return dataclasses.field(default=default, init=False, metadata={"doc": "", "choices": None})


@dataclass(frozen=True)
class TrainConfig:
    """Fields common to every training command (SPEC §5)."""

    model: str = option("", "Starting model: a Hugging Face checkpoint folder (or hub id where a hub is reachable).")
    data: tuple[str, ...] = option((), "Training data: one or more JSONL, JSON, Parquet files or save_to_disk folders.")
    eval_data: tuple[str, ...] = option((), "Held-out data in the same formats (optional).")
    eval_fraction: float = option(0.0, "Share of the training rows held out for evaluation when eval_data is not given.")
    output_dir: str = option("runs/run", "Run folder: config.yaml, metrics.jsonl, checkpoints/, final/.")
    seed: int = option(0, "Seed for initialisation, data order and sampling.")
    max_steps: int = option(0, "Optimizer steps to take; 0 = run for `epochs`.")
    epochs: float = option(1.0, "Passes over the training data (used when max_steps is 0).")
    batch_size: int = option(8, "Examples per micro-batch, per process.")
    eval_batch_size: int = option(0, "Examples per evaluation batch; 0 = batch_size.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    lr: float = option(1e-5, "Peak learning rate (AdamW).")
    lr_schedule: str = option("linear", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "Steps of linear warmup from 0 to lr.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    max_length: int = option(1024, "Longest prompt + response in tokens; longer responses are cut at the end.")
    max_prompt_length: int = option(0, "Longest prompt in tokens; longer prompts keep their last tokens. "
                                    "0 = half of max_length.")
    eval_every: int = option(0, "Evaluate every N steps (and at the start and the end); 0 = only at the end.")
    save_every: int = option(0, "Checkpoint every N steps for resume; 0 = keep no intermediate checkpoints.")
    group_by_length: bool = option(True, "Batch examples of similar length together (less padding); order stays seeded.")
    keep_checkpoints: int = option(2, "How many of the newest checkpoints to keep.")
    log_every: int = option(1, "Write metrics every N optimizer steps.")
    lora_r: int = option(0, "LoRA rank; 0 = full fine-tuning.")
    lora_alpha: float = option(16.0, "LoRA scaling alpha.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    lora_targets: tuple[str, ...] = option(("all-linear",), "Module names LoRA adapts ('all-linear' = every linear layer).")
    lora_save: str = option("merged", "final/ holds the merged model or only the adapter.", ("merged", "adapter"))
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    dtype: str = option("auto", "Compute precision: auto = float32 on CPU, bfloat16 autocast on GPU (trained weights stay float32).", ("auto", "float32", "bfloat16"))
    report_to: str = option("none", "Where metrics also go.", ("none", "tensorboard", "wandb", "mlflow"))
    resume: str = option("auto", "auto (or empty) = continue from the newest complete checkpoint; never = start over; or a checkpoint folder.")
    on_bad_row: str = option("error", "error = stop at the first bad row; skip = skip bad rows and report how many.", ("error", "skip"))
    max_bad_steps: int = option(5, "Stop after this many non-finite (NaN/Inf) steps in a row.")
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint folder to run (off by default).")
    disable_dropout: bool = option(False, "Turn the model's dropout off (default true for reward, dpo, kto, ppo, as in TRL).")
    num_threads: int = option(0, "CPU threads for torch; 0 = leave torch's default.")

    def __post_init__(self):
        check_fields(self)
        if not self.model:
            raise UserError('field "model" is required (a checkpoint folder)')
        if not self.data:
            raise UserError('field "data" is required (one or more data files)')
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise UserError(f'field "{name}" must be at least 1, got {getattr(self, name)}')
        if self.max_length < 2:
            raise UserError(f'field "max_length" must be at least 2 (a prompt token and a response token), '
                            f'got {self.max_length}')
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "lora_r", "eval_batch_size", "num_threads",
                     "max_prompt_length"):
            if getattr(self, name) < 0:
                raise UserError(f'field "{name}" must be 0 or more, got {getattr(self, name)}')
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f'field "lr" must be a positive number, got {self.lr}')
        if self.max_steps == 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise UserError('set "max_steps" or a positive, finite "epochs"')
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f'field "eval_fraction" must be in [0, 1), got {self.eval_fraction}')
        if self.max_prompt_length >= self.max_length:  # 0 (half of max_length, see data.tokenize) always fits
            raise UserError(f'"max_prompt_length" ({self.max_prompt_length}) must be less than "max_length" '
                            f'({self.max_length}) so that a response fits; or leave it at 0 = half of max_length')


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """`alignkit sft`: supervised fine-tuning on demonstrations."""

    lr: float = option(2e-5, "Peak learning rate (AdamW).")
    completion_only_loss: bool = option(True, "Loss on completion (assistant) tokens only; false = on every token.")


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    """`alignkit reward`: a reward model from pairwise (Bradley–Terry) or ranked (Plackett–Luce) data."""

    lr: float = option(1e-5, "Peak learning rate (AdamW).")
    eval_fraction: float = option(0.1, "Share of the training rows held out for eval/accuracy when eval_data is not given.")
    ranked_loss: str = option("plackett_luce", "Loss on ranked data: the full ranking, or every pair of it.",
                              ("plackett_luce", "pairs"))
    use_margin: bool = option(True, "Use the rows' `margin` field in the Bradley–Terry loss when present.")
    disable_dropout: bool = option(True, "Turn the model's dropout off (on by default here, as in TRL), so that scores are deterministic.")
    center_rewards: float = option(0.0, "Coefficient c of a c·(Σ_k r_k)² penalty (pairs: c·(r_c + r_r)²) that keeps rewards centred at 0.")
    prefix_sharing: bool = option(True, "One forward per row: [prompt | response 1 | … | response K] with a 4D mask.")


@dataclass(frozen=True)
class PreferenceConfig(TrainConfig):
    """Fields shared by the direct preference methods (dpo, kto)."""

    lr: float = option(1e-6, "Peak learning rate (AdamW).")
    beta: float = option(0.1, "β: strength of the implicit KL constraint to the reference policy.")
    ref_model: str = option("", "Reference model folder; empty = the starting model (with LoRA: adapters disabled).")
    precompute_ref: bool = option(True, "Compute reference log-probs once before training (stored with the run).")
    disable_dropout: bool = option(True, "Turn the model's dropout off (as in TRL), so the policy starts equal to its reference (h = 0).")
    reference_free: bool = option(False, "Use no reference model (reference log-probs = 0).")
    prefix_sharing: bool = option(True, "One forward per example row: [prompt | response A | response B] with a 4D mask.")

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise UserError(f'field "beta" must be positive, got {self.beta}')


@dataclass(frozen=True)
class DPOConfig(PreferenceConfig):
    """`alignkit dpo`: the DPO family on pairwise (or ranked, converted to pairs) data."""

    loss: str = option("sigmoid", "Objective (SPEC §11): sigmoid = DPO (cDPO with label_smoothing), robust, hinge, ipo, "
                       "simpo, rdpo.", ("sigmoid", "ipo", "hinge", "robust", "simpo", "rdpo"))
    label_smoothing: float = option(0.0, "ε: assumed share of flipped labels (cDPO / robust DPO).")
    ipo_average: bool = option(True, "IPO on per-token averaged log-probs (as in TRL) instead of sums.")
    simpo_gamma: float = option(0.5, "γ: SimPO's target reward margin.")
    rdpo_alpha: float = option(0.01, "α in −log σ(βh + α(|y_c| − |y_r|)), per token of length gap; > 0 takes length "
                               "out of the implicit reward (at the optimum βh = logit p − αΔ).")
    pairs_from_ranked: str = option("all", "How ranked rows become pairs.", ("all", "adjacent", "best_worst"))

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f'field "label_smoothing" must be in [0, 0.5), got {self.label_smoothing}')


@dataclass(frozen=True)
class KTOConfig(PreferenceConfig):
    """`alignkit kto`: Kahneman–Tversky optimisation on unary (thumbs up/down) or converted pairwise data."""

    desirable_weight: float = option(1.0, "λ_D: weight of desirable examples.")
    undesirable_weight: float = option(1.0, "λ_U: weight of undesirable examples.")

    def __post_init__(self):
        super().__post_init__()
        if not (self.desirable_weight > 0 and self.undesirable_weight > 0):
            raise UserError('"desirable_weight" and "undesirable_weight" must be positive')


@dataclass(frozen=True)
class GenerationFields:
    """The generation engine of the commands that sample from a policy (ppo, bon, label, eval, serve)."""

    generation_backend: str = option("hf", "Engine that samples: hf = alignkit's KV-cache sampler; vllm = a vLLM "
                                     "engine colocated in this process (needs a GPU and `pip install "
                                     "'alignkit[vllm]'`; docs/scaling.md).", ("hf", "vllm"))
    vllm_gpu_memory_utilization: float = option(0.3, "vllm: share of the GPU's memory the engine may take while "
                                                "it generates (it sleeps, freeing it, between generations).")


@dataclass(frozen=True)
class PPOConfig(TrainConfig, GenerationFields):
    """`alignkit ppo`: online RLHF — PPO with a value model, or the critic-free RLOO and GRPO — on prompts,
    against reward models, a rule reward, or both, with a KL penalty to the frozen starting policy."""

    algo: str = option("ppo", "ppo (value model, GAE) | rloo (leave-one-out) | grpo (group-normalised).",
                       ("ppo", "rloo", "grpo"))
    lr: float = option(1e-6, "Peak learning rate (AdamW).")
    lr_schedule: str = option("constant", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    max_steps: int = option(0, "Iterations to run (one rollout and its update each); 0 = run for `epochs`.")
    epochs: float = option(1.0, "Passes over the prompts (used when max_steps is 0).")
    eval_batch_size: int = option(0, "Held-out samples generated at once in each evaluation; 0 = 256.")
    # a step is one iteration: rollout_batch_size and num_minibatches set its sizes, and prompts are not grouped
    batch_size: int = hidden(8)
    grad_accum: int = hidden(1)
    group_by_length: bool = hidden(False)
    reward_models: tuple[str, ...] = option((), "Reward model folder(s); several form an ensemble.")
    reward_model: str = option("", "One reward model folder (same as reward_models with one entry).")
    reward_fn: str = option("", "A rule reward python:module:function, f(prompts, responses) -> list[float]; added to the reward models.")
    reward_judge: str = option("", "A judge that can score (rm:PATH or python:module:function, SPEC §9) as the reward or added to it (direct RLAIF).")
    gold_fn: str = option("", "A gold reward python:module:function, logged as reward/gold and never trained on (the lab uses it).")
    eval_fn: str = option("", "Measures of the held-out samples at each evaluation: python:module:function, "
                          "f(prompts, responses) -> {name: number}, logged as eval/NAME (e.g. a share of flattering answers); "
                          "audit_approved and audit_n (a spot check by people: approved of checked) feed the "
                          "hacking detector's audit signal.")
    ensemble: str = option("mean", "How several reward models combine.", ("mean", "min", "uwo"))
    uwo_lambda: float = option(1.0, "λ in uwo = mean − λ·variance across the ensemble.")
    value_model: str = option("", "Value model initialisation: a folder; empty = the first reward model, else the policy.")
    kl_coef: float = option(0.05, "β: KL penalty coefficient (the starting value when kl_target is set).")
    kl_target: float = option(0.0, "Target sequence KL; > 0 turns on Ziegler et al.'s adaptive controller.")
    kl_horizon: float = option(10000.0, "Horizon of the adaptive KL controller, in samples.")
    kl_estimator: str = option("", "Per-token KL estimator (SPEC §11); empty = k3 for grpo (in the loss), k1 for ppo "
                               "and rloo (in the reward).", ("", "k1", "k2", "k3"))
    length_penalty: float = option(0.0, "Subtracted from the score per response token.")
    missing_eos_penalty: float = option(0.0, "Subtracted from the score of responses that did not end with EOS.")
    reward_clip: float = option(0.0, "Clip scores to [−c, c]; 0 = no clipping.")
    whiten_rewards: bool = option(False, "Whiten the shaped per-token rewards over the rollout (ppo).")
    gamma: float = option(1.0, "Discount γ for GAE.")
    gae_lambda: float = option(0.95, "λ for GAE.")
    clip_range: float = option(0.2, "PPO ratio clip ε.")
    value_clip_range: float = option(0.2, "Value clip around the rollout-time values.")
    disable_dropout: bool = option(True, "Turn dropout off in policy and value model (as in TRL), so the first ratio is 1 and the KL starts at 0.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    ppo_epochs: int = option(1, "Passes over each rollout.")
    num_minibatches: int = option(1, "Minibatches per pass.")
    rollout_batch_size: int = option(16, "Prompts per iteration, per process (under `accelerate launch` an iteration takes rollout_batch_size × processes).")
    samples_per_prompt: int = option(0, "Completions per prompt (the group for rloo/grpo; at least 2 there); "
                                     "0 = by algo: 1 for ppo, 4 for rloo and grpo.")
    eval_samples_per_prompt: int = option(0, "Completions per held-out prompt (eval_data or eval_fraction) at each evaluation; 0 = as in training (samples_per_prompt, by algo when 0).")
    heldout_reward_models: tuple[str, ...] = option((), "Reward models scored but never trained on (reward/heldout); the detector flags when they disagree with the training reward.")
    stop_on_hacking: bool = option(False, "Stop the run when the reward-hacking detector flags (best/ keeps the policy at the flag either way).")
    hacking_kl_budget: float = option(0.0, "Detector: flag when the mean sequence KL exceeds this (nats); 0 = no budget.")
    hacking_length_ratio: float = option(1.5, "Detector: flag when mean response length leaves [1/r, r] × its start; 0 = off.")
    hacking_distinct_ratio: float = option(0.7, "Detector: flag when distinct-2 falls below this × its start (repetition); 0 = off.")
    hacking_ensemble_ratio: float = option(2.0, "Detector: flag when the ensemble's disagreement rises above this × its start; 0 = off.")
    hacking_heldout_drop: float = option(0.5, "Detector: flag when the held-out reward (of all samples, or of the training reward's top tenth) falls this many start spreads below its best while the training reward rises; 0 = off.")
    hacking_stall_kl: float = option(0.5, "Detector (with heldout_reward_models): flag when the KL to the reference grew by this many nats since the held-out reward's best (and to hacking_stall_ratio × its value then) while the training reward rose: the policy moves for nothing the held-out models value; 0 = off.")
    hacking_stall_ratio: float = option(1.5, "Detector: the stall signal also needs the KL at this multiple of its value at the held-out reward's best.")
    hacking_stall_patience: int = option(2, "Detector: consecutive iterations the stall signal must trip before the flag (it reads two moving averages, smoother than the other signals); 0 = hacking_patience.")
    hacking_window: int = option(5, "Detector: iterations in each moving average (and in the baseline).")
    hacking_patience: int = option(3, "Detector: consecutive tripping iterations before the flag.")
    max_new_tokens: int = option(32, "Longest response to sample.")
    prefix_sharing: bool = option(True, "One forward per prompt for its samples: [prompt | response 1 | … | response K] with a 4D mask.")
    temperature: float = option(1.0, "Sampling temperature (log-probs are read at the same temperature).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    max_length: int = option(512, "Longest prompt + response in tokens.")

    @property
    def group_size(self) -> int:
        """Completions sampled per prompt: `samples_per_prompt`, or the algorithm's default when it is 0 —
        1 for ppo, 4 for rloo and grpo (a group to compare against, as TRL's num_generations)."""
        return self.samples_per_prompt or (1 if self.algo == "ppo" else 4)

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt < 0:
            raise UserError(f'field "samples_per_prompt" must be 0 (by algo) or more, got {self.samples_per_prompt}')
        if self.algo in ("rloo", "grpo") and self.group_size < 2:
            raise UserError(f'algo "{self.algo}" needs samples_per_prompt of at least 2 (or 0 = 4), '
                            f'got {self.samples_per_prompt}')
        if not (self.reward_models or self.reward_model or self.reward_fn or self.reward_judge):
            raise UserError('give reward_models (or reward_model), reward_fn and/or reward_judge')
        from alignkit.train.dist import launched_size

        processes = launched_size()  # the minibatches are of the whole rollout, every process's samples
        if self.rollout_batch_size * processes * self.group_size % self.num_minibatches:
            raise UserError(f'"num_minibatches" must divide rollout_batch_size × samples_per_prompt '
                            f'({self.rollout_batch_size} × {self.group_size})'
                            + (f' × {processes} processes' if processes > 1 else ''))
        if not self.temperature > 0:
            raise UserError(f'field "temperature" must be positive, got {self.temperature}')
        for name in ("hacking_kl_budget", "hacking_length_ratio", "hacking_distinct_ratio", "hacking_ensemble_ratio",
                     "hacking_heldout_drop", "hacking_stall_kl", "hacking_stall_ratio"):
            if not getattr(self, name) >= 0:
                raise UserError(f'field "{name}" must be 0 (off) or positive, got {getattr(self, name)}')
        if self.hacking_length_ratio and self.hacking_length_ratio <= 1:
            raise UserError(f'field "hacking_length_ratio" must be above 1 (or 0 = off), got {self.hacking_length_ratio}')
        if self.hacking_stall_patience < 0:
            raise UserError(f'field "hacking_stall_patience" must be 0 or positive, got {self.hacking_stall_patience}')
        if self.hacking_window < 1 or self.hacking_patience < 1:
            raise UserError('fields "hacking_window" and "hacking_patience" must be at least 1')


@dataclass(frozen=True)
class BonConfig(GenerationFields):
    """`alignkit bon`: Best-of-N — sample n responses per prompt, score them with reward models (an ensemble)
    and/or a rule reward, keep the best (SPEC §10)."""

    model: str = option("", "Policy to sample from: a Hugging Face checkpoint folder.")
    data: tuple[str, ...] = option((), "Prompts: files of rows with a `prompt` (any row kind that has one).")
    output: str = option("bon.jsonl", "Output JSONL: {prompt, best, best_score, candidates: [{text, score}]} per prompt.")
    n: int = option(8, "Samples per prompt; the best by score is kept.")
    reward_models: tuple[str, ...] = option((), "Reward model folder(s); several form an ensemble.")
    reward_model: str = option("", "One reward model folder (same as reward_models with one entry).")
    reward_fn: str = option("", "A rule reward python:module:function, f(prompts, responses) -> list[float]; added to the reward models.")
    reward_judge: str = option("", "A judge (SPEC §9): one that scores (rm:, python:) adds its score; a pairwise one (lm:, openai:) alone picks the best by a knockout.")
    ensemble: str = option("mean", "How several reward models combine.", ("mean", "min", "uwo"))
    uwo_lambda: float = option(1.0, "λ in uwo = mean − λ·variance across the ensemble.")
    max_new_tokens: int = option(64, "Longest response to sample.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    seed: int = option(0, "Seed of the sampling (each chunk of prompts draws from its own generator).")
    batch_size: int = option(64, "Samples per generation call (prompts per call = batch_size // n, at least 1).")
    max_prompt_length: int = option(1024, "Longest prompt in tokens; longer prompts keep their last tokens.")
    prefix_sharing: bool = option(True, "Reward models score a prompt's samples in one packed row.")
    dtype: str = option("auto", "Precision: auto = float32 on CPU, bfloat16 on GPU.", ("auto", "float32", "bfloat16"))
    on_bad_row: str = option("error", "error = stop at the first bad row; skip = skip bad rows and report how many.", ("error", "skip"))
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint folder to run (off by default).")

    def __post_init__(self):
        check_fields(self)
        if not self.model:
            raise UserError('field "model" is required (a checkpoint folder)')
        if not self.data:
            raise UserError('field "data" is required (one or more prompt files)')
        if not (self.reward_models or self.reward_model or self.reward_fn or self.reward_judge):
            raise UserError('give reward_models (or reward_model), reward_fn and/or reward_judge')
        for name in ("n", "max_new_tokens", "batch_size", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise UserError(f'field "{name}" must be at least 1, got {getattr(self, name)}')
        if not self.temperature > 0:
            raise UserError(f'field "temperature" must be positive, got {self.temperature}')


@dataclass(frozen=True)
class JudgeFields(GenerationFields):
    """Fields of the commands that use a judge (label, eval); not a training config."""

    judge: str = option("", "The judge (SPEC §9): rm:PATH[,PATH2…][#mean|min|uwo], lm:PATH, openai:URL#MODEL or "
                        "python:module:function.")
    principles: str = option("", "A file of principles (one a line) placed in the lm/openai judging prompt.")
    judge_template: str = option("", "A file that replaces the lm/openai judging prompt; placeholders {question}, "
                                 "{answer_a}, {answer_b}, {principles}.")
    cache_dir: str = option("", "Where the openai judge caches its replies; empty = next to the output.")
    data: tuple[str, ...] = option((), "Input rows: JSONL, JSON, Parquet files or save_to_disk folders.")
    seed: int = option(0, "Seed for sampling.")
    batch_size: int = option(16, "Rows (prompts) generated and judged at once.")
    max_new_tokens: int = option(64, "Longest response to sample.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    max_length: int = option(1024, "Longest prompt + response in tokens when generating.")
    max_prompt_length: int = option(0, "Longest prompt in tokens (longer keep their last tokens); 0 = half of max_length.")
    dtype: str = option("auto", "Weights of the generating and judging models: auto = float32 on CPU, bfloat16 on GPU.",
                        ("auto", "float32", "bfloat16"))
    trust_remote_code: bool = option(False, "Allow model code from checkpoint folders to run (off by default).")
    num_threads: int = option(0, "CPU threads for torch; 0 = leave torch's default.")

    def __post_init__(self):
        check_fields(self)
        if not self.judge:
            raise UserError('field "judge" is required (e.g. python:module:function, rm:PATH, lm:PATH)')
        if not self.data:
            raise UserError('field "data" is required (one or more data files)')
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError('fields "batch_size" and "max_new_tokens" must be at least 1')
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise UserError('"temperature" must be positive and "top_p" in (0, 1]')
        if self.max_prompt_length >= self.max_length:
            raise UserError(f'"max_prompt_length" ({self.max_prompt_length}) must be less than "max_length" '
                            f'({self.max_length})')


@dataclass(frozen=True)
class LabelConfig(JudgeFields):
    """`alignkit label`: a judge labels candidate responses (RLAIF) into pairwise rows (two candidates) or ranked
    rows with scores (more); with `policy`, the candidates are generated. Resumes where it stopped."""

    data: tuple[str, ...] = option((), "Input rows {prompt, responses: [two or more], label?}; with policy, prompts "
                                   "alone will do.")
    output: str = option("", "Output JSONL (appended row by row); ties and failures of pairs go to OUTPUT's "
                         ".skipped.jsonl, the closing report to .report.json.")
    policy: str = option("", "A model that generates n candidates for rows without responses.")
    n: int = option(2, "Candidates generated per prompt with policy (2 = pairwise output, more = ranked).")
    resume: str = option("auto", "auto = skip rows already in the output; never = start the output over.",
                         ("auto", "never"))
    on_bad_row: str = option("error", "error = stop at the first bad row; skip = skip bad rows and count them.",
                             ("error", "skip"))

    def __post_init__(self):
        super().__post_init__()
        if not self.output:
            raise UserError('field "output" is required (a .jsonl file)')
        if self.n < 2:
            raise UserError(f'field "n" must be at least 2 (candidates to compare), got {self.n}')


@dataclass(frozen=True)
class EvalConfig(JudgeFields):
    """`alignkit eval`: the win rate of a model against a baseline under a judge, raw and length-controlled, with
    the KL of the model to the baseline where both are local models with one vocabulary."""

    model: str = option("", "The model evaluated (a checkpoint folder).")
    baseline: str = option("", "The model it is compared with (a checkpoint folder).")
    data: tuple[str, ...] = option((), "Prompts: rows with a prompt field (other fields are ignored).")
    output_dir: str = option("runs/eval", "Where eval.json and verdicts.jsonl go.")
    max_prompts: int = option(0, "Evaluate on the first N prompts; 0 = all.")

    def __post_init__(self):
        super().__post_init__()
        if not self.model or not self.baseline:
            raise UserError('fields "model" and "baseline" are required (checkpoint folders)')
        if self.max_prompts < 0:
            raise UserError(f'field "max_prompts" must be 0 or more, got {self.max_prompts}')


@dataclass(frozen=True)
class ServeConfig(GenerationFields):
    """`alignkit serve`: an OpenAI-compatible HTTP server for a policy, optionally answering with the best of
    n samples under reward models or a rule (SPEC §10). Concurrent requests are generated together."""

    model: str = option("", "The policy to serve: a Hugging Face checkpoint folder.")
    host: str = option("127.0.0.1", "Address to bind; the default accepts local clients only.")
    port: int = option(8000, "TCP port to listen on.")
    api_key: str = option("", "Key clients must send as `Authorization: Bearer KEY`; empty = the ALIGNKIT_API_KEY "
                          "environment variable (preferred: a command line is visible to other users), else no key.")
    served_model_name: str = option("", "Model id in /v1/models and in responses; empty = the model folder's name.")
    reward_models: tuple[str, ...] = option((), "Reward model folder(s) for Best-of-N (R1 R2 or R1,R2); several "
                                            "form an ensemble.")
    reward_model: str = option("", "One reward model folder (same as reward_models with one entry).")
    reward_fn: str = option("", "A rule reward python:module:function, f(prompts, responses) -> list[float]; "
                            "added to the reward models.")
    reward_judge: str = option("", "A judge that scores (rm:PATH or python:module:function, SPEC §9) for Best-of-N, "
                               "alone or added to the reward models.")
    ensemble: str = option("mean", "How several reward models combine.", ("mean", "min", "uwo"))
    uwo_lambda: float = option(1.0, "λ in uwo = mean − λ·variance across the ensemble.")
    n: int = option(1, "Best-of-N: samples scored per returned choice (the best is returned); > 1 needs a reward. "
                    "A request may set its own `best_of` up to max_best_of.")
    max_best_of: int = option(16, "Largest `best_of` a request may ask for.")
    max_n: int = option(8, "Largest `n` (choices per request) a request may ask for.")
    max_tokens: int = option(256, "Largest `max_tokens` a request may ask for (and what it gets when it does not say).")
    max_prompt_tokens: int = option(0, "Longest prompt in tokens; 0 = the model's context length. A prompt plus "
                                    "max_tokens must fit the context either way.")
    max_body_bytes: int = option(1_000_000, "Largest request body in bytes; larger ones get 413.")
    batch_window_ms: float = option(10.0, "How long the generator waits after a request for others to batch with it.")
    max_batch_size: int = option(64, "Most sequences (prompts × n × best_of) generated in one call.")
    seed: int = option(0, "Seed of the sampler for requests that give no `seed`.")
    dtype: str = option("auto", "Weights' precision: auto = float32 on CPU, bfloat16 on GPU.",
                        ("auto", "float32", "bfloat16"))
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint folder to run (off by default).")
    prefix_sharing: bool = option(True, "Reward models score a prompt's candidates in one packed row.")
    num_threads: int = option(0, "CPU threads for torch; 0 = leave torch's default.")

    def __post_init__(self):
        check_fields(self)
        if not self.model:
            raise UserError('field "model" is required (a checkpoint folder)')
        if not 0 <= self.port <= 65535:
            raise UserError(f'field "port" must be in 0..65535, got {self.port}')
        for name in ("n", "max_best_of", "max_n", "max_tokens", "max_body_bytes", "max_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f'field "{name}" must be at least 1, got {getattr(self, name)}')
        for name in ("max_prompt_tokens", "num_threads"):
            if getattr(self, name) < 0:
                raise UserError(f'field "{name}" must be 0 or more, got {getattr(self, name)}')
        if not (self.batch_window_ms >= 0 and math.isfinite(self.batch_window_ms)):
            raise UserError(f'field "batch_window_ms" must be 0 or more, got {self.batch_window_ms}')
        if self.n > 1 and not (self.reward_models or self.reward_model or self.reward_fn or self.reward_judge):
            raise UserError(f'"n" {self.n} (Best-of-N) needs reward_models (or reward_model), reward_fn and/or '
                            'reward_judge')
        if self.n > self.max_best_of:
            raise UserError(f'"n" ({self.n}) must not exceed "max_best_of" ({self.max_best_of})')
        if self.n > self.max_batch_size:
            raise UserError(f'"n" ({self.n}) must not exceed "max_batch_size" ({self.max_batch_size})')

    @property
    def reward_paths(self) -> list[str]:
        """The reward model folders: reward_models (comma-separated entries split) and reward_model."""
        paths = [p.strip() for entry in self.reward_models for p in entry.split(",")]
        return [p for p in paths + [self.reward_model] if p]


# ---------------------------------------------------------------------------------------------------------
# Introspection, parsing and validation shared by every config class.

def config_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """(kind, inner) for the annotations configs use: int, float, str, bool, tuple[str, ...], X | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return ("optional", args[0])
    if origin is tuple:
        return ("list", typing.get_args(tp)[0])
    return ("scalar", tp)


def coerce(value, tp, name: str, where: str = ""):
    """Turn a YAML or command-line value into the field's type, or raise a UserError naming the field."""
    prefix = f"{where}: " if where else ""
    kind, inner = _base_type(tp)
    if kind == "optional":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, inner, name, where)
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f'{prefix}field "{name}" must be a list, got {type(value).__name__}')
        return tuple(coerce(v, inner, name, where) for v in value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f'{prefix}field "{name}" must be true or false, got {value!r}')
    if inner is int:
        if isinstance(value, bool):
            raise UserError(f'{prefix}field "{name}" must be an integer, got {value!r}')
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            pass
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise UserError(f'{prefix}field "{name}" must be an integer, got {value!r}') from None
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise UserError(f'{prefix}field "{name}" must be an integer, got {value!r}')
        return int(as_float)
    if inner is float:
        if isinstance(value, bool):
            raise UserError(f'{prefix}field "{name}" must be a number, got {value!r}')
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f'{prefix}field "{name}" must be a number, got {value!r}') from None
    if inner is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise UserError(f'{prefix}field "{name}" must be a string, got {type(value).__name__}')
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {name}")


def check_fields(cfg) -> None:
    """Validate `choices` for every field of a config instance."""
    for f in config_fields(type(cfg)):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise UserError(f'field "{f.name}" must be one of {", ".join(choices)}; got {value!r}')


def unknown_field_error(name: str, valid: list[str], where: str = "") -> UserError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; run with --help for the {len(valid)} fields"
    prefix = f"{where}: " if where else ""
    return UserError(f'{prefix}unknown field "{name}"{hint}')


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}" if mark is not None else "1"
        raise UserError(f"{path}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls, file_values: dict | None = None, cli_values: dict | None = None, config_path: str = ""):
    """Resolve defaults ← YAML ← command line into a validated `cls` instance."""
    hints = _hints(cls)
    valid = [f.name for f in config_fields(cls)]
    values = {}
    for layer, where in ((file_values or {}, config_path), (cli_values or {}, "")):
        for name, raw in layer.items():
            if name not in valid:
                raise unknown_field_error(name, valid, where)
            values[name] = coerce(raw, hints[name], name, where)
    return cls(**values)


SECRET_FIELDS = ("api_key", "token", "secret", "password", "hf_token", "openai_api_key")


def is_secret(name: str) -> bool:
    return name in SECRET_FIELDS or name.endswith(("_api_key", "_secret", "_password", "_auth_token"))


def to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data; fields that hold secrets are never written."""
    out = {}
    for f in config_fields(type(cfg)):
        if is_secret(f.name):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
