"""`alignkit ppo`: online RLHF (step 3 of the notes) — PPO, RLOO or GRPO with a KL penalty.

One iteration, CleanRL-style:
  rollout  sample `samples_per_prompt` responses for `rollout_batch_size` prompts (KV cache, seeded)
  score    reward models (one, or an ensemble: mean | min | uwo) + a rule reward, then the shaping options
  measure  old log-probs (policy), reference log-probs (frozen start), values (ppo)
  advantage  ppo: per-token rewards −β·KL_t + score at the end, GAE, whitened
             rloo: leave-one-out on score − β·KL(sequence); grpo: group-normalised scores, KL in the loss
  update   `ppo_epochs` × `num_minibatches`: clipped policy loss (+ clipped value loss, + β·KL for grpo)
`max_steps` counts iterations. Everything random is seeded by (seed, iteration), so a resumed run repeats
the same rollouts.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time

import torch

from alignkit.data.collate import PackedBatch, Tokenized, pack_sequences, to_device
from alignkit.data.rows import plain_text
from alignkit.data.tokenize import Encoder
from alignkit.errors import TrainingError, UserError
from alignkit.losses.rl import gae, kl_penalty, ppo_policy_loss, ppo_value_loss
from alignkit.models.load import (
    default_device,
    disable_dropout,
    load_causal_lm,
    load_reference,
    load_reward_model,
    load_tokenizer,
    prepare_trainable,
    quiet_transformers,
    save_pretrained_atomic,
    training_dtypes,
)
from alignkit.models.logps import packed_target_logps, packed_token_values
from alignkit.rewards import Scorer, load_reward_fn, same_vocabulary
from alignkit.rl.detector import (
    HackingDetector,
    distinct_2,
    pearson,
    repetition_rate,
    rising_tokens,
    token_frequencies,
)
from alignkit.rl.evaluate import evaluate_policy
from alignkit.rl.ops import masked_whiten
from alignkit.rl.rollout import generate
from alignkit.rl.shaping import (
    AdaptiveKLController,
    adjust_scores,
    grpo_advantages,
    rloo_advantages,
    shape_rewards,
)
from alignkit.train.common import load_train_eval
from alignkit.train.loop import (
    DataOrder,
    MetricsLog,
    RunDir,
    autocast_context,
    build_optimizer,
    build_scheduler,
    count_bad_steps,
    seed_everything,
)


def check_same_vocabulary(policy_tokenizer, other_tokenizer, path: str) -> None:
    """The value model reads the policy's token ids, so its tokenizer must give every token the same id."""
    if not same_vocabulary(policy_tokenizer, other_tokenizer):
        raise UserError(f"{path}: the value model's vocabulary differs from the policy's (it reads the policy's "
                        "token ids); set value_model to a model with the policy's tokenizer, e.g. the policy itself")


class RolloutPacker:
    """Packs sequences of a rollout into rows for one forward, padding-free (SPEC §12): the samples of a prompt
    share a block [prompt | response 1 | … | response K] (prompt computed once), and blocks are bin-packed
    into rows no wider than the widest block (so never wider than padding), each isolated by the 4D mask.
    (Measured: wider rows cost more in masked attention than they save in padding.)

    `pack(indices)` takes sorted sequence indices and returns a PackedBatch whose targets run in that order,
    token by token — the row-major order of `response_mask[indices]`, the layout every rollout tensor uses.
    """

    def __init__(self, prompt_ids: list[list[int]], responses: list[list[int]], prompt_of: list[int], pad_id: int,
                 share_prompts: bool = True):
        self.seqs = [Tokenized(p + r, [False] * len(p) + [True] * len(r)) for p, r in zip(prompt_ids, responses)]
        self.prompt_of = prompt_of if share_prompts else list(range(len(responses)))
        self.pad_id = pad_id

    def __call__(self, indices: list[int]) -> PackedBatch:
        return pack_sequences([self.seqs[i] for i in indices], [self.prompt_of[i] for i in indices], self.pad_id)


def scatter_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M,) per-token values in row-major order of `mask` (N, R) → an (N, R) float tensor, 0 elsewhere."""
    if values.shape[0] != int(mask.sum()):
        raise TrainingError(f"{values.shape[0]} token log-probs for {int(mask.sum())} sampled tokens "
                            "(is a prompt empty? every response token needs a position that predicts it)")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask] = values.float()
    return out


def ppo_update(cfg, policy, value, optimizer, pack: RolloutPacker, everything: PackedBatch, mask, old_logps,
               ref_logps, advantages_from, old_values, kl_coef, compute_dtype, step: int) -> dict:
    """`ppo_epochs` × `num_minibatches` clipped updates on one rollout; returns averaged metrics.

    Every rollout tensor is (N, R) in response space (`mask` marks sampled tokens); a minibatch is a set of
    sequences, packed by `pack` (`everything` is the whole rollout, packed) and flattened to its M target
    tokens. `advantages_from(old_values)` gives (advantages, returns); with `old_values` None (ppo with one
    epoch and one minibatch) the rollout-time values are the update's own first value forward, detached.
    """
    advantages, returns = advantages_from(old_values) if old_values is not None or value is None else (None, None)
    device = mask.device
    n = mask.shape[0]
    stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "entropy": [], "grad_norm": []}
    skipped = 0
    params = [p for p in list(policy.parameters()) + (list(value.parameters()) if value is not None else [])
              if p.requires_grad]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=g) if cfg.num_minibatches > 1 else torch.arange(n)
        for chunk in order.tensor_split(cfg.num_minibatches):
            if len(chunk) == 0:
                continue
            idx = chunk.sort().values
            mb = everything if len(idx) == n else to_device(pack(idx.tolist()), device)
            idx = idx.to(device)
            sel = mask[idx]

            def flat(x, idx=idx, sel=sel):
                return x[idx][sel]

            entropy: list = []
            with autocast_context(compute_dtype):
                logps = packed_target_logps(policy, mb, cfg.temperature, entropy).float()
            v = None
            if value is not None:
                with autocast_context(compute_dtype):
                    v = packed_token_values(value, mb)
                if advantages is None:  # the single-update case: these are the rollout-time values
                    old_values = scatter_tokens(v.detach(), mask)
                    advantages, returns = advantages_from(old_values)
            token_pg_loss, clipped = ppo_policy_loss(logps, flat(old_logps), flat(advantages), cfg.clip_range)
            pg_loss = token_pg_loss.mean()  # over the minibatch's response tokens
            loss = pg_loss
            if cfg.algo == "grpo":  # KL to the reference in the loss (k3, as in DeepSeekMath)
                loss = loss + kl_coef * kl_penalty(logps, flat(ref_logps), "k3").mean()
            v_loss = torch.zeros((), device=device)
            if v is not None:
                v_loss = ppo_value_loss(v, flat(old_values), flat(returns), cfg.value_clip_range).mean()
                loss = loss + cfg.vf_coef * v_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if torch.isfinite(norm) and torch.isfinite(loss):
                optimizer.step()
            else:  # a non-finite loss or gradient: this minibatch's step is skipped (the caller counts them)
                skipped += 1
                continue
            stats["policy_loss"].append(float(pg_loss.detach()))
            stats["value_loss"].append(float(v_loss.detach()))
            stats["clipfrac"].append(float(clipped.float().mean()))
            stats["entropy"].append(float(entropy[0].mean()))
            stats["grad_norm"].append(float(norm))
    optimizer.zero_grad(set_to_none=True)
    return {**{k: sum(v) / len(v) if v else float("nan") for k, v in stats.items()}, "skipped_minibatches": skipped}


def measure(cfg, policy, reference, value, everything: PackedBatch, rollout, mask, compute_dtype, single: bool):
    """(old_logps, ref_logps, old_values), each (N, R) in response space; old_values is None for rloo/grpo and,
    with `single` (one update on the rollout), for ppo too: the update's own value forward supplies them.
    With `single` in float32, old_logps are the sampler's."""
    device = mask.device
    with torch.no_grad(), autocast_context(compute_dtype):
        policy.eval()
        # one update on the rollout: the sampler's log-probs are the current weights' numbers, so no forward is
        # needed, in float32; in bf16, cached decoding and a packed forward round differently, and the first
        # ratio must be exactly 1, so old log-probs come from the same kind of forward as the update's
        if single and compute_dtype is None:
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


def compute_advantages(cfg, values, *, scores, old_logps, ref_logps, mask, kl_coef):
    """(advantages, returns) of a rollout, (N, R) each (returns None without a value model).

    ppo:  r_t = −β·KL_t, plus the score at the last token; optional reward whitening; GAE on the
          rollout-time `values`; advantages whitened.
    rloo: leave-one-out baseline on score − β·Σ_t KL_t within each prompt's group, broadcast to its tokens.
    grpo: (score − group mean) / group std, broadcast; its KL goes into the loss instead.
    """
    if cfg.algo == "ppo":
        rewards, _ = shape_rewards(scores, old_logps, ref_logps, mask, kl_coef, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values.float(), mask, cfg.gamma, cfg.gae_lambda)
        return masked_whiten(advantages, mask).detach(), returns.detach()
    if cfg.algo == "rloo":
        token_kl = torch.where(mask, kl_penalty(old_logps, ref_logps, cfg.kl_estimator), 0.0)
        seq_adv = rloo_advantages(scores - kl_coef * token_kl.sum(-1), cfg.group_size)
    else:
        seq_adv = grpo_advantages(scores, cfg.group_size)
    return torch.where(mask, seq_adv.unsqueeze(1).expand_as(mask), 0.0), None


def write_samples(path, step: int, prompts: list[str], responses: list[str], scores, tokenizer, rising) -> None:
    """Append one evaluation to samples.jsonl: eight prompt/response/score samples and the tokens whose share
    rose most since the first rollout (what the policy learned to say more)."""
    samples = [{"prompt": p, "response": r, "score": float(s)} for p, r, s in list(zip(prompts, responses, scores))[:8]]
    learned = [{"token": tokenizer.decode([t]), "rise": round(r, 4)} for t, r in rising]
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "samples": samples, "rising_tokens": learned}) + "\n")


def train_ppo(cfg) -> dict:
    quiet_transformers()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    _, rows, eval_rows = load_train_eval(cfg, "auto")
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    prompts = [(row.prompt, encoder.prompt_ids(row.prompt, row.source)) for row in rows]
    eval_prompts = [(row.prompt, encoder.prompt_ids(row.prompt, row.source)) for row in eval_rows]
    scorer = Scorer(cfg, policy_tokenizer=tokenizer)
    heldout = (Scorer(cfg, list(cfg.heldout_reward_models), use_rule=False, policy_tokenizer=tokenizer)
               if cfg.heldout_reward_models else None)
    gold = load_reward_fn(cfg.gold_fn) if cfg.gold_fn else None
    detector = HackingDetector.from_config(cfg)
    policy = prepare_trainable(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code), cfg, "CAUSAL_LM")
    reference = None if cfg.lora_r > 0 else load_reference(cfg.model, cfg.dtype, cfg.trust_remote_code)
    value = None
    if cfg.algo == "ppo":
        init = cfg.value_model or (list(cfg.reward_models) + [cfg.reward_model])[0] or cfg.model
        value_tokenizer = load_tokenizer(init, cfg.trust_remote_code)
        check_same_vocabulary(tokenizer, value_tokenizer, init)
        value = load_reward_model(init, value_tokenizer, cfg.dtype, cfg.trust_remote_code)
        if cfg.disable_dropout:
            disable_dropout(value)
    modules = torch.nn.ModuleDict({"policy": policy, **({"value": value} if value is not None else {})})
    _, compute_dtype = training_dtypes(cfg.dtype)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(prompts) / cfg.rollout_batch_size))
    order = DataOrder(len(prompts), cfg.rollout_batch_size, cfg.seed)
    optimizer = build_optimizer(modules, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    controller = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else None
    kl_coef = cfg.kl_coef

    run = RunDir(cfg.output_dir)
    resume = cfg.resume or "auto"
    if resume == "auto" and (done := run.completed()) is not None:
        return done
    checkpoint = run.start(cfg, resume)
    state = {"consecutive_bad": 0, "skipped_steps": 0, "kl_coef": kl_coef, "first_length": None,
             "detector": detector.state()}
    start = 0
    if checkpoint is not None:
        state = {**state, **RunDir.load_checkpoint(checkpoint, modules, optimizer, scheduler)}
        start = state.pop("step")
        state.pop("rng", None)
        kl_coef = state["kl_coef"]
        detector.load_state(state["detector"])
        if controller is not None:
            controller.value = kl_coef
    log = MetricsLog(run, cfg.report_to, start)
    device = default_device()
    last: dict = {}
    started = time.perf_counter()
    k = cfg.group_size

    def held_out_evaluation() -> dict:
        """eval/* metrics on the held-out prompts, sampled as in training with the same seed every time."""
        ev = evaluate_policy(policy, tokenizer, eval_prompts, reference=reference, scorer=scorer, gold=gold,
                             samples_per_prompt=cfg.eval_samples_per_prompt or k, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + 999_983,
                             compute_dtype=compute_dtype)
        return {f"eval/{name}": v for name, v in ev.summary().items()}

    if start == 0 and eval_prompts and cfg.eval_every > 0:
        log.log(0, held_out_evaluation())
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"alignkit ppo ({cfg.algo})", unit="it", disable=None,
               dynamic_ncols=True, file=sys.stderr)
    step = start
    for step in range(start + 1, steps + 1):
        batch_prompts = [prompts[i] for i in order.batch(step - 1)]
        texts = [p for p, _ in batch_prompts for _ in range(k)]
        ids = [p for _, p in batch_prompts for _ in range(k)]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with autocast_context(compute_dtype):
            rollout = generate(policy, ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                               generator=generator)
        responses = [r[m].tolist() for r, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
        response_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        prompt_texts = [plain_text(t) if not isinstance(t, str) else t for t in texts]
        finished = rollout.finished.cpu()
        pack = RolloutPacker(ids, responses, [i // k for i in range(len(ids))], tokenizer.pad_token_id,
                             cfg.prefix_sharing)
        raw_scores, spread = scorer(texts, response_texts, finished.tolist(), pack.seqs)
        lengths = torch.tensor([len(r) for r in responses])
        scores = adjust_scores(raw_scores, finished, lengths, missing_eos_penalty=cfg.missing_eos_penalty,
                               length_penalty=cfg.length_penalty, reward_clip=cfg.reward_clip).to(device)
        everything = to_device(pack(list(range(len(ids)))), device)
        mask = rollout.response_mask.to(device)
        # one update on the rollout (1 epoch, 1 minibatch): the old log-probs and values are those of the current
        # weights, so they come from the sampler and from the update's own value forward, not extra passes
        single = cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
        old_logps, ref_logps, old_values = measure(cfg, policy, reference, value, everything, rollout, mask,
                                                   compute_dtype, single)
        seq_kl = torch.where(mask, old_logps - ref_logps, 0.0).sum(-1)                  # (N,) k1 sequence KL
        advantages_from = functools.partial(compute_advantages, cfg, scores=scores, old_logps=old_logps,
                                            ref_logps=ref_logps, mask=mask, kl_coef=kl_coef)
        stats = ppo_update(cfg, policy, value, optimizer, pack, everything, mask, old_logps, ref_logps,
                           advantages_from, old_values, kl_coef, compute_dtype, step)
        scheduler.step()
        count_bad_steps(state, not stats.pop("skipped_minibatches"), step, cfg.max_bad_steps, run, closing=(bar, log),
                        unit="iteration", hint="lower the learning rate; check the reward for NaN")
        mean_kl = float(seq_kl.mean())
        if controller is not None:
            kl_coef = controller.update(mean_kl, len(responses))
        state["kl_coef"] = kl_coef
        mean_len = float(lengths.float().mean())
        if state["first_length"] is None:
            state["first_length"] = max(mean_len, 1e-6)
            state["first_tokens"] = {str(t): f for t, f in token_frequencies(responses).items()}
        last = {**stats, "skipped_steps": state["skipped_steps"],
                "reward/score": float(raw_scores.mean()), "reward/shaped": float(scores.mean()),
                "kl": mean_kl, "kl_coef": kl_coef, "response_length": mean_len,
                "lr": scheduler.get_last_lr()[0],
                "hacking/length_ratio": mean_len / state["first_length"],
                "hacking/reward_length_corr": pearson(raw_scores, lengths.float()),
                "hacking/distinct_2": distinct_2(responses), "hacking/repetition": repetition_rate(responses),
                "eos_rate": float(rollout.finished.float().mean()), "elapsed_s": time.perf_counter() - started}
        if spread is not None:
            last["hacking/ensemble_std"] = float(spread.mean())
        if gold is not None:
            last["reward/gold"] = sum(float(v) for v in gold(prompt_texts, response_texts)) / len(responses)
        heldout_scale = None
        if heldout is not None:
            heldout_scores, _ = heldout(texts, response_texts, finished.tolist(), pack.seqs)
            last["reward/heldout"] = float(heldout_scores.mean())
            heldout_scale = float(heldout_scores.std()) if len(heldout_scores) > 1 else None
        was_flagged = detector.flagged
        detector.update(step, last, heldout_scale)
        last["hacking/flag"] = float(detector.flagged)
        state["detector"] = detector.state()
        stop = False
        if detector.flagged and not was_flagged:
            save_pretrained_atomic(policy, tokenizer, run.path / "best", cfg.lora_save)
            (run.path / "hacking.json").write_text(json.dumps(
                {"flagged": True, "flag_step": step, "reasons": detector.reasons}, indent=1))
            print(f"alignkit ppo: reward hacking flagged at iteration {step}: {'; '.join(detector.reasons)}; "
                  f"the policy at the flag is in {run.path / 'best'}", file=sys.stderr)
            stop = cfg.stop_on_hacking
        if eval_prompts and (step == steps or stop or (cfg.eval_every and step % cfg.eval_every == 0)):
            last.update(held_out_evaluation())
        if step % cfg.log_every == 0 or step == steps or stop or any(key.startswith("eval/") for key in last):
            log.log(step, last)
        if step == 1 or step == steps or stop or (cfg.eval_every and step % cfg.eval_every == 0):
            write_samples(run.path / "samples.jsonl", step, prompt_texts, response_texts, raw_scores, tokenizer,
                          rising_tokens({int(t): f for t, f in state["first_tokens"].items()},
                                        token_frequencies(responses)))
        if cfg.save_every and step % cfg.save_every == 0 and step < steps and state["consecutive_bad"] == 0:
            run.save_checkpoint(step, modules, optimizer, scheduler, state, cfg.keep_checkpoints)
        bar.update(1)
        bar.set_postfix(score=f"{last['reward/score']:.3f}", kl=f"{mean_kl:.3f}")
        if stop:
            print(f"alignkit ppo: stopping at iteration {step} (stop_on_hacking)", file=sys.stderr)
            break
    bar.close()
    log.close()
    save_pretrained_atomic(policy, tokenizer, run.final, cfg.lora_save)
    run.mark_done(step=step, metrics=last, loop_seconds=time.perf_counter() - started,
                  hacking={"flagged": detector.flagged, "flag_step": detector.flag_step, "reasons": detector.reasons})
    print(f"alignkit ppo ({cfg.algo}): done, {step} iterations; final model in {run.final}")
    return last
