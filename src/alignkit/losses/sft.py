"""Supervised fine-tuning loss: per-token negative log-likelihood."""

import torch


def sft_token_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−log π(y_t | x, y_<t) per token, (B, T), with 0 where `mask` is False.

    The maximum-likelihood objective of supervised fine-tuning (Ouyang et al. 2022, step 1 of RLHF). It takes
    the per-token log-probabilities from `alignkit.models.logps.sequence_logps` — the one place they are
    computed — so SFT and the preference losses read the same numbers. Reduce with
    `alignkit.rl.ops.masked_sum` / `masked_mean` (the trainer divides the sum by the target tokens of the
    whole accumulated batch).
    """
    return torch.where(mask, -token_logps, torch.zeros_like(token_logps))
