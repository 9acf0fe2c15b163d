"""Evaluate a policy on held-out prompts, sampled as in training: the reward models' score, a gold reward where
one exists, the sequence KL to a reference policy, and the response length (SPEC §6–§8).

Every evaluation of a run uses the same sampling seed (common random numbers), so two evaluations differ by
what the policy learned, not by the luck of the draw: each chunk of prompts gets its own generator, seeded by
(seed, chunk), so a policy that stops early in one chunk does not shift the draws of the next. (Draws are
matched for the same `batch_size` and `samples_per_prompt`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import to_device
from alignkit.models.logps import packed_logps
from alignkit.models.precision import autocast_context
from alignkit.rl.responses import sample_responses
from alignkit.rl.rollout import GenerateFn, SharedGenerator, generate


@dataclass
class PolicyEvaluation:
    prompts: list[str]              # plain-text prompt of each sample
    responses: list[str]
    response_ids: list[list[int]]   # the sampled tokens (EOS included when the response finished)
    lengths: torch.Tensor           # (N,) response tokens (EOS included)
    kl: torch.Tensor                # (N,) k1 sequence KL: Σ_t log π(y_t) − log π_ref(y_t) at the sampled tokens
    proxy: torch.Tensor | None      # (N,) the scorer's score (reward models and/or rule)
    gold: torch.Tensor | None       # (N,) the gold reward

    def summary(self) -> dict:
        out = {"kl": float(self.kl.mean()), "response_length": float(self.lengths.float().mean())}
        if self.proxy is not None:
            out["reward/score"] = float(self.proxy.mean())
        if self.gold is not None:
            out["reward/gold"] = float(self.gold.mean())
        return out


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts: list[tuple[object, list[int]]], *, reference=None, scorer=None,
                    gold=None, samples_per_prompt: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
                    top_p: float = 1.0, seed: int = 0, batch_size: int = 256, compute_dtype=None,
                    generate_fn: GenerateFn = generate, procs=None) -> PolicyEvaluation:
    """Sample `samples_per_prompt` responses for each (prompt, prompt_ids) and measure them.

    `reference`: the model the KL is measured against; None = the policy with its LoRA adapters disabled (a
    policy without adapters then has KL 0). `scorer`: an `alignkit.rewards.Scorer` (or None); `gold`:
    f(prompts, responses) -> list[float] (or None). Both sides of the KL come from the same packed forward (not
    the sampler's cached decoding), so that rounding in bfloat16 cannot make a policy differ from itself.
    `batch_size`: samples generated at once; `generate_fn`: the sampling engine (`alignkit.rl.rollout.GenerateFn`).
    `procs` (`alignkit.train.dist.Processes`): several processes each sample a contiguous share of every chunk with
    its rows of the chunk's draws, and every process gets the whole evaluation — the one a single process makes.
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = next(policy.parameters()).device
    chunk = max(1, batch_size // samples_per_prompt)
    was_training = policy.training
    policy.eval()
    records = []  # per chunk: (chunk, prompts, responses, ids, lengths, kl, proxy)
    size = procs.size if procs is not None else 1
    for c, begin in enumerate(range(0, len(prompts), chunk)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + begin)
        share = prompts[begin:begin + chunk]
        if size > 1:  # this process's contiguous share of the chunk, with its rows of the chunk's draws
            start, stop = procs.span(len(share))
            generator = SharedGenerator(generator, start * samples_per_prompt, len(share) * samples_per_prompt)
            share = share[start:stop]
            if not share:
                continue
        sampled = sample_responses(policy, tokenizer, share, samples_per_prompt,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   generator=generator, compute_dtype=compute_dtype, generate_fn=generate_fn)
        batch = to_device(sampled.pack_all(), device)
        with autocast_context(compute_dtype):
            policy_logps = packed_logps(policy, batch, temperature).logps                      # (S,) per sample
            if reference is not None:
                ref_logps = packed_logps(reference, batch, temperature).logps
            elif hasattr(policy, "disable_adapter"):
                with policy.disable_adapter():
                    ref_logps = packed_logps(policy, batch, temperature).logps
            else:
                ref_logps = policy_logps
        proxy = scorer(sampled.prompts, sampled.texts, sampled.finished, sampled.seqs)[0] if scorer is not None else None
        records.append((c, sampled.prompt_texts, sampled.texts, sampled.ids, sampled.lengths,
                        (policy_logps.double() - ref_logps.double()).cpu(), proxy))
    if was_training:
        policy.train()
    if size > 1:  # every process's shares, chunk by chunk in rank order: the order of one process
        records = sorted((r for part in procs.gather(records) for r in part), key=lambda r: r[0])
    texts = [t for r in records for t in r[1]]
    responses = [t for r in records for t in r[2]]
    return PolicyEvaluation(
        prompts=texts, responses=responses, response_ids=[i for r in records for i in r[3]],
        lengths=torch.cat([r[4] for r in records]), kl=torch.cat([r[5] for r in records]),
        proxy=torch.cat([r[6] for r in records]) if scorer is not None else None,
        gold=torch.tensor([float(v) for v in gold(texts, responses)]) if gold is not None else None)

