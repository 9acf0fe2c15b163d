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
from alignkit.rl.rollout import GenerateFn, generate


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
                    generate_fn: GenerateFn = generate) -> PolicyEvaluation:
    """Sample `samples_per_prompt` responses for each (prompt, prompt_ids) and measure them.

    `reference`: the model the KL is measured against; None = the policy with its LoRA adapters disabled (a
    policy without adapters then has KL 0). `scorer`: an `alignkit.rewards.Scorer` (or None); `gold`:
    f(prompts, responses) -> list[float] (or None). Both sides of the KL come from the same packed forward (not
    the sampler's cached decoding), so that rounding in bfloat16 cannot make a policy differ from itself.
    `batch_size`: samples generated at once; `generate_fn`: the sampling engine (`alignkit.rl.rollout.GenerateFn`).
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = next(policy.parameters()).device
    chunk = max(1, batch_size // samples_per_prompt)
    was_training = policy.training
    policy.eval()
    texts, responses, response_ids, lengths, kls, proxies = [], [], [], [], [], []
    for begin in range(0, len(prompts), chunk):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + begin)
        sampled = sample_responses(policy, tokenizer, prompts[begin:begin + chunk], samples_per_prompt,
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
        kls.append((policy_logps.double() - ref_logps.double()).cpu())
        if scorer is not None:
            proxies.append(scorer(sampled.prompts, sampled.texts, sampled.finished, sampled.seqs)[0])
        texts += sampled.prompt_texts
        responses += sampled.texts
        response_ids += sampled.ids
        lengths.append(sampled.lengths)
    if was_training:
        policy.train()
    return PolicyEvaluation(
        prompts=texts, responses=responses, response_ids=response_ids, lengths=torch.cat(lengths), kl=torch.cat(kls),
        proxy=torch.cat(proxies) if scorer is not None else None,
        gold=torch.tensor([float(v) for v in gold(texts, responses)]) if gold is not None else None)
