"""Preference losses: Bradley–Terry, Plackett–Luce, the DPO family and KTO.

Pure functions: tensors in, unreduced per-example (B,) losses out. Sequence log-probabilities are `logps`
(summed over the response tokens), as computed once elsewhere in alignkit.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise reward-model loss, −log σ(r_c − r_r − m)  (Bradley & Terry 1952; Ouyang et al. 2022).

    `margin` m (B,) or scalar is optional (Llama 2's preference-strength margin, Touvron et al. 2023).
    """
    logits = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def plackett_luce_loss(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, ties: torch.Tensor | None = None
) -> torch.Tensor:
    """Listwise ranking loss, −Σ_i [r_i − logsumexp_{j ≥ i, present} r_j] over present i
    (Plackett 1975, Luce 1959; the K-wise loss of Zhu et al. 2023). With K = 2 it is Bradley–Terry.

    rewards: (B, K) ordered best first. mask: (B, K) bool, True = present (present entries first); without
    ties the last present item's term is 0. ties: optional (B, K) long tie-group ids, non-decreasing along K
    (equal id = tied). With ties, Breslow's (1974) approximation: the denominator of item i runs over the
    present j whose group id ≥ i's, so tied items share one denominator. Without ties the group id is
    the position, which gives the plain formula above.
    """
    B, K = rewards.shape
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    if ties is None:
        ties = torch.arange(K, device=rewards.device).expand(B, K)
    # finfo.min instead of -inf keeps logsumexp and its gradient finite when a row is all padding
    r = torch.where(mask, rewards, torch.finfo(rewards.dtype).min)  # (B, K)
    # in_risk_set[b, i, j]: item j is still "in the running" when item i is picked
    in_risk_set = mask[:, None, :] & (ties[:, None, :] >= ties[:, :, None])  # (B, K, K)
    denominators = torch.where(in_risk_set, r[:, None, :], torch.finfo(r.dtype).min).logsumexp(-1)
    terms = torch.where(mask, r - denominators, torch.zeros_like(r))  # (B, K)
    return -terms.sum(-1)


# ---- DPO family. h = (π_c − ref_c) − (π_r − ref_r), ε = label_smoothing. Each variant takes keywords
# and ignores the ones it does not use, so dpo_loss can call them all the same way.


def dpo_sigmoid(*, h, beta, label_smoothing=0.0, **_):
    """−(1−ε)·log σ(βh) − ε·log σ(−βh)  (Rafailov et al. 2023; cDPO, Mitchell 2023, when ε > 0)."""
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def dpo_robust(*, h, beta, label_smoothing=0.0, **_):
    """[−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε), unbiased under label-flip rate ε
    (rDPO, Chowdhury et al. 2024)."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def dpo_hinge(*, h, beta, **_):
    """max(0, 1 − βh)  (SLiC, Zhao et al. 2023)."""
    return torch.relu(1 - beta * h)


def dpo_ipo(*, h, beta, **_):
    """(h − 1/(2β))², on the log-probabilities as given (IPO, Azar et al. 2024)."""
    return (h - 1 / (2 * beta)) ** 2


def dpo_simpo(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
              gamma=0.0, **_):
    """−log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ); reference-free (SimPO, Meng et al. 2024)."""
    margin = policy_chosen_logps / chosen_lengths - policy_rejected_logps / rejected_lengths  # (B,)
    return -F.logsigmoid(beta * margin - gamma)


def dpo_rdpo(*, h, beta, chosen_lengths, rejected_lengths, alpha=0.0, **_):
    """−log σ(βh + α·(|y_c| − |y_r|))  (R-DPO, Park et al. 2024), lengths in response tokens.

    α > 0 regularises length: the loss is minimal (for a pair preferred with probability p) at
    βh = logit p − α·(|y_c| − |y_r|), so a chosen response that is longer by Δ tokens earns αΔ less implicit
    reward than plain DPO gives it, and a shorter one αΔ more. α < 0 would reward length instead.
    """
    length_gap = (chosen_lengths - rejected_lengths).to(h.dtype)  # (B,)
    return -F.logsigmoid(beta * h + alpha * length_gap)


DPO_VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "robust": dpo_robust,
    "hinge": dpo_hinge,
    "ipo": dpo_ipo,
    "simpo": dpo_simpo,
    "rdpo": dpo_rdpo,
}
_NEEDS_LENGTHS = {"simpo", "rdpo"}
_REFERENCE_FREE = {"simpo"}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Direct preference optimisation and its variants, dispatched through `DPO_VARIANTS`; returns (B,).

    h = (π_c − ref_c) − (π_r − ref_r), with π and ref summed sequence log-probs (B,). See each variant's
    function for its formula. `simpo` ignores the reference (pass None); `simpo` and `rdpo` need
    `chosen_lengths` and `rejected_lengths` (response token counts, (B,)).
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; valid: {', '.join(sorted(DPO_VARIANTS))}")
    if variant in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"DPO variant {variant!r} needs chosen_lengths and rejected_lengths")
    if variant not in _REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"DPO variant {variant!r} needs ref_chosen_logps and ref_rejected_logps")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = None
    if variant not in _REFERENCE_FREE:
        h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return DPO_VARIANTS[variant](
        h=h,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=gamma,
        alpha=alpha,
    )


def dpo_implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward β(π − ref), detached: for metrics (reward accuracy, margins), not for loss."""
    return (beta * (policy_logps - ref_logps)).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Kahneman–Tversky optimisation (Ethayarajh et al. 2024) on unpaired examples; returns (B,).

    r = π − ref, z = max(kl_ref, 0) with no gradient (the reference point; kl_ref scalar or (B,));
    desirable rows w_D·(1 − σ(β(r − z))), undesirable rows w_U·(1 − σ(β(z − r))).
    `desirable` is a bool (B,) tensor. 1 − σ(x) is computed as σ(−x), exact for large x.
    """
    r = policy_logps - ref_logps  # (B,)
    z = kl_ref.detach().clamp(min=0)
    desirable_loss = desirable_weight * torch.sigmoid(-beta * (r - z))
    undesirable_loss = undesirable_weight * torch.sigmoid(-beta * (z - r))
    return torch.where(desirable, desirable_loss, undesirable_loss)
