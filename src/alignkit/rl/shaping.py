"""Reward shaping and critic-free advantages for online RLHF (pure torch; the PPO/RLOO/GRPO trainers use
these, nothing else computes them).

- `shape_rewards`: the per-token reward of RLHF (Ziegler et al. 2019; Ouyang et al. 2022): −β·KL_t at every
  response token, plus the sequence score at the last one.
- `AdaptiveKLController`: Ziegler et al.'s proportional controller for β (SPEC §8).
- `rloo_advantages`: leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).
- `grpo_advantages`: group-normalised advantages (Shao et al. 2024, DeepSeekMath).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.losses.rl import kl_penalty


def adjust_scores(scores: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor, *,
                  missing_eos_penalty: float = 0.0, length_penalty: float = 0.0,
                  reward_clip: float = 0.0) -> torch.Tensor:
    """(B,) scores after the sequence-level shaping options, in this order:
    subtract `missing_eos_penalty` from responses that did not end with EOS; subtract
    `length_penalty` × response length; clip to [−reward_clip, reward_clip] when reward_clip > 0."""
    out = scores - missing_eos_penalty * (~finished).to(scores.dtype) - length_penalty * lengths.to(scores.dtype)
    if reward_clip > 0:
        out = out.clamp(-reward_clip, reward_clip)
    return out


def shape_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T) and per-token KL (B, T), both 0 where `mask` is False.

    r_t = −kl_coef · KL_t(π ‖ ref) at every response token, and r_T += score at the row's last token, where
    KL_t is `alignkit.losses.kl_penalty(logps, ref_logps, estimator)`. `mask` marks response tokens (a prefix
    of each row).
    """
    kl = torch.where(mask, kl_penalty(logps, ref_logps, estimator), 0.0)           # (B, T)
    rewards = -kl_coef * kl
    last = (mask.sum(-1) - 1).clamp(min=0)                                         # (B,)
    has_tokens = mask.any(-1)
    bonus = torch.zeros_like(rewards).scatter(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    rewards = rewards + torch.where(has_tokens.unsqueeze(1), bonus, 0.0)
    return rewards, kl


@dataclass
class AdaptiveKLController:
    """β ← β · (1 + e · n_steps / horizon), e = clip(KL / target − 1, −0.2, 0.2)  (Ziegler et al. 2019).

    `update(kl, n_steps)` is called once per iteration with the iteration's mean sequence KL and the number
    of samples (or steps) it covered; `state_dict`/`load_state_dict` carry β across a resume.
    """

    value: float
    target: float
    horizon: float = 10_000.0

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) leave-one-out advantages: A_i = r_i − mean_{j ≠ i in i's group} r_j.

    `scores` (N,) holds groups of `group_size` consecutive samples of the same prompt; equivalently
    A_i = K/(K−1) · (r_i − mean_group).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = scores.view(-1, group_size)                                                 # (P, K)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(N,) group-normalised advantages: A_i = (r_i − mean_group) / (std_group + eps), std unbiased;
    `scale=False` keeps only the centring (Dr. GRPO, Liu et al. 2025)."""
    if group_size < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    r = scores.view(-1, group_size)                                                 # (P, K)
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)
