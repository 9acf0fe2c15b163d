"""RL math for RLHF: per-token KL estimators and generalised advantage estimation."""

from collections.abc import Callable

import torch


def kl_k1(u: torch.Tensor) -> torch.Tensor:
    """k1 = −u = log π − log ref: unbiased, high variance, can be negative."""
    return -u


def kl_k2(u: torch.Tensor) -> torch.Tensor:
    """k2 = u²/2: biased, low variance, ≥ 0."""
    return u**2 / 2


def kl_k3(u: torch.Tensor) -> torch.Tensor:
    """k3 = eᵘ − 1 − u: unbiased, low variance, ≥ 0 (expm1 keeps it exact for small u)."""
    return torch.expm1(u) - u


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ ref) from tokens sampled from π, with u = ref_logps − logps
    (Schulman, "Approximating KL divergence", 2020). Inputs and output have the same shape, e.g. (B, T).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}")
    return KL_ESTIMATORS[estimator](ref_logps - logps)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, T) token rewards and values.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns = A + V.
    `mask` (B, T) bool marks real response tokens, a prefix of each row. The episode ends at the last valid
    token: the value beyond it is 0 (no bootstrap), and padded positions get advantage and return 0.
    Pass rollout-time (old) values; the result is as differentiable as its inputs.
    """
    zeros = torch.zeros_like(values)
    rewards = torch.where(mask, rewards, zeros)  # (B, T)
    values = torch.where(mask, values, zeros)  # (B, T)
    T = values.shape[1]
    next_value = values.new_zeros(values.shape[0])  # (B,)
    next_advantage = values.new_zeros(values.shape[0])  # (B,)
    advantages = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0.0)
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate of PPO (Schulman et al. 2017, eq. 7), per token, as a loss to minimise:

        ρ = exp(logps − old_logps),  L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))

    Returns (L, clipped) with the input's shape; `clipped` (bool) marks tokens where |ρ − 1| > ε.
    Reduce L with the caller's mask (a mean over response tokens).
    """
    ratio = torch.exp(logps - old_logps)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return loss, (ratio.detach() - 1).abs() > clip_range


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_range: float = 0.2) -> torch.Tensor:
    """Clipped value loss of PPO as in OpenAI's baselines and the RLHF implementations (Ziegler et al. 2019),
    per token:  V_clip = V_old + clip(V − V_old, −ε_v, ε_v),  L = ½·max((V − R)², (V_clip − R)²).
    """
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
