"""The one place where log-probabilities and reward scores are computed from a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import SequenceBatch


@dataclass
class LogProbs:
    token_logps: torch.Tensor  # (N, T-1): log p(token t+1 | tokens ≤ t), 0 where mask is False
    mask: torch.Tensor         # (N, T-1) bool: True where the next token is a training target

    @property
    def logps(self) -> torch.Tensor:
        """(N,) summed log-probability of each row's target tokens."""
        return self.token_logps.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) number of target tokens in each row."""
        return self.mask.sum(-1)

    @property
    def mean_logps(self) -> torch.Tensor:
        """(N,) per-token average log-probability (IPO, SimPO)."""
        return self.logps / self.lengths.clamp(min=1)


def forward_logits(model, batch: SequenceBatch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False).logits


def sequence_logps(model, batch: SequenceBatch) -> LogProbs:
    """Log-probabilities of the target tokens of `batch` under `model` (a causal LM).

    Computed as logit[target] − logsumexp(logits), in float32 at least, without materialising a (N, T, V)
    log-softmax. Padding and prompt positions give exactly 0 (torch.where, so nothing leaks from them).
    """
    logits = forward_logits(model, batch)[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, T-1, V); bf16 → fp32
    targets = batch.input_ids[:, 1:]                                 # (N, T-1)
    mask = batch.loss_mask[:, 1:]                                    # (N, T-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)    # (N, T-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return LogProbs(torch.where(mask, token_logps, torch.zeros_like(token_logps)), mask)


def reward_scores(model, batch: SequenceBatch) -> torch.Tensor:
    """(N,) scores of a sequence-classification reward model (num_labels=1).

    The model's own forward picks the last non-padding token, exactly as plain `transformers` does when
    it scores a text, so what we train is what others load.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    scores = out.logits[:, 0]
    return scores.to(torch.promote_types(scores.dtype, torch.float32))
