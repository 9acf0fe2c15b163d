"""`alignkit ppo`: online RLHF (step 3 of the notes) — PPO, RLOO or GRPO with a KL penalty.

One iteration (`PPOTrainer.step`), CleanRL-style, on the shared run loop (`alignkit.train.loop.run`):
  rollout  sample `samples_per_prompt` responses for `rollout_batch_size` prompts (KV cache, seeded)
  score    reward models (one, or an ensemble: mean | min | uwo) + a rule reward, then the shaping options
  measure  old log-probs (policy), reference log-probs (frozen start), values (ppo)
  advantage  ppo: per-token rewards −β·KL_t + score at the end, GAE, whitened
             rloo: leave-one-out on score − β·KL(sequence); grpo: group-normalised scores, KL in the loss
  update   `ppo_epochs` × `num_minibatches`: clipped policy loss (+ clipped value loss, + β·KL for grpo)
`max_steps` counts iterations. Everything random is seeded by (seed, iteration), so a resumed run repeats
the same rollouts. The monitors and the hacking detector are `alignkit.rl.monitors`.
"""

from __future__ import annotations

import functools
import math

import torch

from alignkit.data.collate import PackedBatch, to_device
from alignkit.data.tokenize import Encoder
from alignkit.errors import UserError
from alignkit.losses.rl import gae, kl_penalty, ppo_policy_loss, ppo_value_loss
from alignkit.models.load import (
    default_device,
    load_causal_lm,
    load_reference,
    load_tokenizer,
    load_value_model,
    prepare_trainable,
    quiet_transformers,
    save_pretrained_atomic,
    training_dtypes,
)
from alignkit.models.logps import packed_target_logps, packed_token_values
from alignkit.models.precision import autocast_context
from alignkit.rewards import Scorer, load_reward_fn
from alignkit.rl.detector import HackingDetector
from alignkit.rl.evaluate import evaluate_policy
from alignkit.rl.monitors import Monitors
from alignkit.rl.ops import masked_whiten
from alignkit.rl.responses import RolloutPacker, RolloutView, sample_responses, scatter_tokens
from alignkit.rl.rollout import GenerateFn, SharedGenerator
from alignkit.rl.shaping import (
    AdaptiveKLController,
    adjust_scores,
    grpo_advantages,
    rloo_advantages,
    shape_rewards,
)
from alignkit.train.common import load_train_eval
from alignkit.train.dist import ONE, Processes, launched_size
from alignkit.train.loop import DataOrder, Trainer, run
from alignkit.train.run import seed_everything


def kl_estimator(cfg) -> str:
    """The per-token KL estimator: `kl_estimator`, else k3 for grpo (in the loss, as DeepSeekMath) and k1 for
    ppo and rloo (in the reward, as Ziegler et al.)."""
    return cfg.kl_estimator or ("k3" if cfg.algo == "grpo" else "k1")


def measure(cfg, policy, reference, value, everything: PackedBatch, rollout, mask, compute_dtype, single: bool,
            sampler_logps: bool = True):
    """(old_logps, ref_logps, old_values), each (N, R) in response space; old_values is None for rloo/grpo and,
    with `single` (one update on the rollout), for ppo too: the update's own value forward supplies them.
    With `single` in float32, old_logps are the sampler's — unless the sampler's are not the trainer's numbers
    (`sampler_logps` False: another engine, e.g. vLLM), and then they are recomputed."""
    device = mask.device
    with torch.no_grad(), autocast_context(compute_dtype):
        policy.eval()
        # one update on the rollout: the sampler's log-probs are the current weights' numbers, so no forward is
        # needed, in float32; in bf16, cached decoding and a packed forward round differently, and the first
        # ratio must be exactly 1, so old log-probs come from the same kind of forward as the update's
        if single and compute_dtype is None and sampler_logps:
            old_logps = scatter_tokens(rollout.logps[rollout.response_mask].to(device), mask)
        else:
            old_logps = scatter_tokens(packed_target_logps(policy, everything, cfg.temperature), mask)
        if reference is not None:
            ref_logps = scatter_tokens(packed_target_logps(reference, everything, cfg.temperature), mask)
        else:  # LoRA: the reference is the policy with its adapters disabled
            with policy.disable_adapter():
                ref_logps = scatter_tokens(packed_target_logps(policy, everything, cfg.temperature), mask)
        old_values = None
        if value is not None and not single:
            old_values = scatter_tokens(packed_token_values(value, everything), mask)
        policy.train()
    return old_logps, ref_logps, old_values


def compute_advantages(cfg, values, *, scores, old_logps, ref_logps, mask, kl_coef, procs: Processes = ONE):
    """(advantages, returns) of a rollout, (N, R) each (returns None without a value model).

    ppo:  r_t = −β·KL_t, plus the score at the last token; optional reward whitening; GAE on the
          rollout-time `values`; advantages whitened (over the whole rollout: every process's samples).
    rloo: leave-one-out baseline on score − β·Σ_t KL_t within each prompt's group, broadcast to its tokens.
    grpo: (score − group mean) / group std, broadcast; its KL goes into the loss instead.
    (A prompt's group is always on one process.)
    """
    if cfg.algo == "ppo":
        across = procs.sum if procs.size > 1 else None
        rewards, _ = shape_rewards(scores, old_logps, ref_logps, mask, kl_coef, kl_estimator(cfg))
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, across=across)
        advantages, returns = gae(rewards, values.float(), mask, cfg.gamma, cfg.gae_lambda)
        return masked_whiten(advantages, mask, across=across).detach(), returns.detach()
    if cfg.algo == "rloo":
        token_kl = torch.where(mask, kl_penalty(old_logps, ref_logps, kl_estimator(cfg)), 0.0)
        seq_adv = rloo_advantages(scores - kl_coef * token_kl.sum(-1), cfg.group_size)
    else:
        seq_adv = grpo_advantages(scores, cfg.group_size)
    return torch.where(mask, seq_adv.unsqueeze(1).expand_as(mask), 0.0), None


def ppo_update(cfg, policy, value, optimizer, pack: RolloutPacker, everything: PackedBatch, mask, old_logps,
               ref_logps, advantages_from, old_values, kl_coef, compute_dtype, step: int,
               procs: Processes = ONE, offset: int = 0, total: int | None = None) -> dict:
    """`ppo_epochs` × `num_minibatches` clipped updates on one rollout; returns averaged metrics.

    Every rollout tensor is (N, R) in response space (`mask` marks sampled tokens); a minibatch is a set of
    sequences, packed by `pack` (`everything` is the whole rollout, packed) and flattened to its M target
    tokens. `advantages_from(old_values)` gives (advantages, returns); with `old_values` None (ppo with one
    epoch and one minibatch) the rollout-time values are the update's own first value forward, detached.

    Several processes (`procs`): this one holds samples `offset … offset + N` of the rollout's `total`. The
    minibatches are drawn over all `total` samples; each process computes the losses of its members, summed
    over tokens and divided by the minibatch's token count across processes, and the gradients are summed, so
    the update is the one a single process holding the whole rollout makes.
    """
    advantages, returns = advantages_from(old_values) if old_values is not None or value is None else (None, None)
    device, n = mask.device, mask.shape[0]
    total = n if total is None else total
    names = ["loss", "policy_loss", "clipfrac", "entropy"] + (["value_loss"] if value is not None else [])
    stats: dict[str, list] = {name: [] for name in [*names, "grad_norm"]}
    skipped = 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(total, generator=g) if cfg.num_minibatches > 1 else torch.arange(total)
        for chunk in order.tensor_split(cfg.num_minibatches):
            if len(chunk) == 0:
                continue
            idx = (chunk[(chunk >= offset) & (chunk < offset + n)] - offset).sort().values  # this process's members
            tokens = int(procs.sum([float(mask[idx.to(device)].sum())])[0]) if procs.size > 1 else None
            optimizer.zero_grad(set_to_none=True)
            parts = [0.0] * len(names)  # this process's shares of the minibatch's means
            if len(idx):
                parts = _minibatch_loss(cfg, policy, value, pack, everything, mask, idx, old_logps, ref_logps,
                                        advantages, returns, old_values, advantages_from, kl_coef, compute_dtype,
                                        tokens)
                if parts[-1] is not None:  # the single-update case computed the advantages from its values
                    advantages, returns, old_values = parts[-1]
                parts = parts[:-1]
            procs.sum_grads(params)
            parts = procs.sum(parts)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if not (torch.isfinite(norm) and math.isfinite(parts[0])):  # skipped (the loop counts bad iterations)
                skipped += 1
                continue
            optimizer.step()
            for name, v in zip(names, parts):
                stats[name].append(v)
            stats["grad_norm"].append(float(norm))
    optimizer.zero_grad(set_to_none=True)
    return {**{k: sum(v) / len(v) if v else float("nan") for k, v in stats.items()}, "skipped_minibatches": skipped}


def _minibatch_loss(cfg, policy, value, pack, everything, mask, idx, old_logps, ref_logps, advantages, returns,
                    old_values, advantages_from, kl_coef, compute_dtype, tokens: int | None) -> list:
    """Backward of one minibatch's loss (its members `idx`, sorted; `tokens`: the minibatch's response tokens
    over all processes, None = these are all of them); returns [loss, policy loss, clip fraction, entropy,
    (value loss,) this process's share of each, and (advantages, returns, old_values) when it computed them]."""
    device, n = mask.device, mask.shape[0]
    mb = everything if len(idx) == n else to_device(pack(idx.tolist()), device)
    idx = idx.to(device)
    mb_mask = mask[idx]
    flat = lambda x: x[idx][mb_mask]  # noqa: E731  (N, R) → the minibatch's (M,)
    mean = (lambda x: x.sum() / tokens) if tokens is not None else (lambda x: x.mean())  # noqa: E731

    entropy: list = []
    with autocast_context(compute_dtype):
        logps = packed_target_logps(policy, mb, cfg.temperature, entropy).float()       # (M,)
        v = packed_token_values(value, mb) if value is not None else None             # (M,)
    computed = None
    if v is not None and advantages is None:  # the single-update case: these are the rollout-time values
        old_values = scatter_tokens(v.detach(), mask)
        advantages, returns = advantages_from(old_values)
        computed = (advantages, returns, old_values)
    token_pg_loss, clipped = ppo_policy_loss(logps, flat(old_logps), flat(advantages), cfg.clip_range)
    pg_loss = mean(token_pg_loss)  # over the minibatch's response tokens
    loss = pg_loss
    if cfg.algo == "grpo":  # KL to the reference in the loss (k3 by default, as in DeepSeekMath)
        loss = loss + kl_coef * mean(kl_penalty(logps, flat(ref_logps), kl_estimator(cfg)))
    out = []
    if v is not None:
        v_loss = mean(ppo_value_loss(v, flat(old_values), flat(returns), cfg.value_clip_range))
        loss = loss + cfg.vf_coef * v_loss
        out = [float(v_loss.detach())]
    loss.backward()
    return [float(loss.detach()), float(pg_loss.detach()), float(mean(clipped.float())),
            float(mean(entropy[0].float())), *out, computed]


def _std(x: torch.Tensor) -> float | None:
    """The spread of a rollout's scores (None for one sample): the detector's unit for changes of their mean."""
    return float(x.float().std()) if len(x) > 1 else None


class PPOTrainer(Trainer):
    """The policy, reference, value and reward models of an online run, and one iteration as a step."""

    unit = "iteration"
    latest = ("kl_coef", "hacking/flag")
    nan_hint = "lower the learning rate; check the reward for NaN"

    def __init__(self, cfg, generate_fn: GenerateFn | None = None):
        quiet_transformers()
        seed_everything(cfg.seed)
        if generate_fn is None:
            from alignkit.rl.vllm_backend import generate_fn_for

            generate_fn = generate_fn_for(cfg, cfg.model)
        self.cfg, self.generate_fn, self.name = cfg, generate_fn, f"ppo ({cfg.algo})"
        self.tokenizer = tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        _, rows, eval_rows = load_train_eval(cfg, "auto")
        encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
        self.prompts = [(row.prompt, encoder.prompt_ids(row.prompt, row.source)) for row in rows]
        self.eval_prompts = [(row.prompt, encoder.prompt_ids(row.prompt, row.source)) for row in eval_rows]
        self.scorer = Scorer(cfg, policy_tokenizer=tokenizer)
        self.heldout = (Scorer(cfg, list(cfg.heldout_reward_models), use_rule=False, policy_tokenizer=tokenizer)
                        if cfg.heldout_reward_models else None)
        self.gold = load_reward_fn(cfg.gold_fn) if cfg.gold_fn else None
        self.measures = load_reward_fn(cfg.eval_fn) if cfg.eval_fn else None
        self.policy = prepare_trainable(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code), cfg, "CAUSAL_LM")
        self.reference = None if cfg.lora_r > 0 else load_reference(cfg.model, cfg.dtype, cfg.trust_remote_code)
        self.value = None
        if cfg.algo == "ppo":
            init = cfg.value_model or (list(cfg.reward_models) + [cfg.reward_model])[0] or cfg.model
            self.value = load_value_model(init, tokenizer, cfg)
        trained = {"policy": self.policy} if self.value is None else {"policy": self.policy, "value": self.value}
        self.modules = torch.nn.ModuleDict(trained)
        self.compute_dtype = training_dtypes(cfg.dtype)[1]
        # rollout_batch_size is per process: an iteration's prompts are the next rollout_batch_size × processes of
        # the seeded order, split among the processes (`PPOTrainer.share`)
        self.processes = launched_size()
        self.supports_processes = True
        self.sharding_reason = ("sampling under FSDP needs every process to run the same number of forward "
                                "passes, which generation does not yet")
        prompts_per_step = cfg.rollout_batch_size * self.processes
        self.order = DataOrder(len(self.prompts), prompts_per_step, cfg.seed)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.prompts) / prompts_per_step))
        self._check_shares()
        self.kl_coef = cfg.kl_coef
        self.controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                           if cfg.kl_target > 0 else None)
        self.monitors = Monitors(HackingDetector.from_config(cfg), tokenizer, self.save_final)
        self.evaluates = bool(self.eval_prompts)
        # what fixes the prompts, the rollouts and the schedule: a checkpoint only resumes a run with the same
        # (rollout_batch_size: the iteration's, over all processes, so a checkpoint resumes under another process
        # count when the product is the same)
        self.settings = {k: getattr(cfg, k) for k in (
            "seed", "algo", "samples_per_prompt", "ppo_epochs", "num_minibatches", "lr",
            "lr_schedule", "warmup_steps", "kl_coef", "kl_target")}
        self.settings.update(rollout_batch_size=prompts_per_step, num_examples=len(self.prompts),
                             total_steps=self.total_steps)

    def _check_shares(self) -> None:
        """Under several processes every process needs a prompt in every iteration: refuse a run whose epoch ends
        in a batch of fewer prompts than processes."""
        last = len(self.prompts) % self.order.batch_size
        reached = self.total_steps >= self.order.batches_per_epoch
        if self.processes > 1 and 0 < last < self.processes and reached:
            raise UserError(f"{len(self.prompts)} prompts in batches of {self.order.batch_size} "
                            f"(rollout_batch_size {self.cfg.rollout_batch_size} × {self.processes} processes) leave "
                            f"a last batch of {last}, fewer than the processes; change rollout_batch_size or "
                            "max_steps, or drop a few prompts")

    def share(self, step: int) -> tuple[list[int], int, int]:
        """(this process's prompt indices, its first prompt's position in the iteration's batch, the batch's
        size): a contiguous share, sizes differing by at most one."""
        batch = self.order.batch(step - 1)
        start, stop = self.procs.span(len(batch))
        return batch[start:stop], start, len(batch)

    def step(self, step: int, optimizer) -> dict:
        cfg, device, procs, k = self.cfg, default_device(), self.procs, self.cfg.group_size
        # rollout: K samples per prompt, drawn from a generator seeded by the iteration (under several processes,
        # each samples its share of the batch with its rows of the same draws)
        mine, start, size = self.share(step)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if procs.size > 1:
            generator = SharedGenerator(generator, start * k, size * k)
        batch = sample_responses(
            self.policy, self.tokenizer, [self.prompts[i] for i in mine], k,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            generator=generator, compute_dtype=self.compute_dtype,
            share_prompts=cfg.prefix_sharing, generate_fn=self.generate_fn)
        # score
        raw_scores, spread = self.scorer(batch.prompts, batch.texts, batch.finished, batch.seqs)      # (N,)
        scores = adjust_scores(raw_scores, batch.rollout.finished.cpu(), batch.lengths,
                               missing_eos_penalty=cfg.missing_eos_penalty, length_penalty=cfg.length_penalty,
                               reward_clip=cfg.reward_clip).to(device)
        # measure: with one update on the rollout (1 epoch, 1 minibatch) the old log-probs and values are those
        # of the current weights, so they come from the sampler and from the update's own value forward
        everything = to_device(batch.pack_all(), device)
        mask = batch.rollout.response_mask.to(device)                                              # (N, R)
        single = cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
        old_logps, ref_logps, old_values = measure(cfg, self.policy, self.reference, self.value, everything,
                                                   batch.rollout, mask, self.compute_dtype, single,
                                                   getattr(self.generate_fn, "sampler_logps", True))
        seq_kl = torch.where(mask, old_logps - ref_logps, 0.0).sum(-1)                  # (N,) k1 sequence KL
        # advantages (from the rollout-time values, which the single-update case gets inside the update), update
        advantages_from = functools.partial(compute_advantages, cfg, scores=scores, old_logps=old_logps,
                                            ref_logps=ref_logps, mask=mask, kl_coef=self.kl_coef, procs=procs)
        stats = ppo_update(cfg, self.policy, self.value, optimizer, batch.pack, everything, mask, old_logps,
                           ref_logps, advantages_from, old_values, self.kl_coef, self.compute_dtype, step,
                           procs, start * k, size * k)
        finite = not stats.pop("skipped_minibatches")
        if hasattr(self.generate_fn, "weights_changed"):  # an engine with its own copy of the weights (vLLM)
            self.generate_fn.weights_changed()
        heldout = self.heldout(batch.prompts, batch.texts, batch.finished, batch.seqs)[0] if self.heldout else None
        # the rollout's measures, over every process's samples (gathered: each process then computes them alike)
        seen = RolloutView.gather(procs, batch, raw_scores, scores, seq_kl, spread=spread, heldout=heldout)
        metrics = {**stats, "reward/score": float(seen.scores.mean()), "reward/shaped": float(seen.shaped.mean()),
                   "kl": float(seen.kl.mean()), "kl_coef": self.kl_coef,
                   "eos_rate": float(seen.finished.float().mean()),
                   **self.monitors.measure(seen, seen.scores, seen.spread)}
        if (score_std := _std(seen.scores)) is not None:
            metrics["reward/score_std"] = score_std
        if self.controller is not None:  # β for the next iteration
            self.kl_coef = self.controller.update(metrics["kl"], len(seen.ids))
        if self.gold is not None:
            metrics["reward/gold"] = sum(float(v) for v in self.gold(seen.prompt_texts, seen.texts)) / len(seen.ids)
        heldout_scale = None
        if seen.heldout is not None:
            metrics["reward/heldout"] = float(seen.heldout.mean())
            heldout_scale = _std(seen.heldout)
            if heldout_scale is not None:
                metrics["reward/heldout_std"] = heldout_scale
            # the held-out score of the training reward's favourites (its top tenth): where the policy is heading
            top = seen.scores >= torch.quantile(seen.scores.float(), 0.9)
            metrics["hacking/heldout_of_top"] = float(seen.heldout[top].mean())
        self.should_stop = (self.monitors.update(step, metrics, heldout_scale) or self.should_stop) and cfg.stop_on_hacking
        if step in (1, self.total_steps) or self.should_stop or (cfg.eval_every and step % cfg.eval_every == 0):
            self.monitors.write_samples(step, seen, seen.scores)
        return {**metrics, "finite": finite, "tokens": int(procs.sum([float(batch.num_tokens)])[0])}

    def evaluate(self) -> dict:
        """eval/* metrics on the held-out prompts, sampled as in training with the same seed every time."""
        cfg = self.cfg
        ev = evaluate_policy(self.policy, self.tokenizer, self.eval_prompts, reference=self.reference,
                             scorer=self.scorer, gold=self.gold,
                             samples_per_prompt=cfg.eval_samples_per_prompt or cfg.group_size,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             seed=cfg.seed * 1_000_003 + 999_983, batch_size=cfg.eval_batch_size or 256,
                             compute_dtype=self.compute_dtype, generate_fn=self.generate_fn, procs=self.procs)
        measures = self.measures(ev.prompts, ev.responses) if self.measures else {}
        if "audit_n" in measures:  # a spot check by people (eval_fn): the detector's `audit` signal, which may flag
            self.monitors.detector.audit(measures["audit_approved"], measures["audit_n"])  # this iteration's policy
            if self.monitors.update(self.monitors.detector.last_step, {}) and self.cfg.stop_on_hacking:
                self.should_stop = True
        return {f"eval/{name}": float(v) for name, v in {**ev.summary(), **measures}.items()}

    def prepare(self, run) -> None:
        self.monitors.writes = self.procs.main
        self.monitors.start(run.path)

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "monitors": self.monitors.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = state["kl_coef"]
        if self.controller is not None:
            self.controller.value = self.kl_coef
        self.monitors.load_state_dict(state["monitors"])

    def save_final(self, path) -> None:
        save_pretrained_atomic(self.policy, self.tokenizer, path, self.cfg.lora_save)

    def summary(self) -> dict:
        return {"hacking": self.monitors.summary()}


def train_ppo(cfg, generate_fn: GenerateFn | None = None) -> dict:
    """Train as `cfg` says; `generate_fn` samples the rollouts and the evaluations (default: the engine of
    `cfg.generation_backend` — the KV-cache sampler `alignkit.rl.rollout.generate`, or vLLM; anything with its
    signature)."""
    return run(cfg, PPOTrainer(cfg, generate_fn))
