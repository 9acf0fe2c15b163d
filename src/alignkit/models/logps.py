"""The one place where log-probabilities and reward scores are computed from a model.

Log-probabilities are only needed at target tokens, so the vocabulary projection runs only there: the
decoder's hidden states at the predicting positions go through the output embedding, never a (N, T, V)
tensor of logits for prompt and padding positions. That shortcut is checked once per model against the
model's own full forward (so architectures that post-process their logits — soft-capping, scaling — fall
back to the full forward automatically).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import PackedBatch, SequenceBatch


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


@dataclass
class SequenceLogps:
    """Summed log-probabilities of whole sequences (no per-token view needed: DPO, KTO)."""

    logps: torch.Tensor    # (N,)
    lengths: torch.Tensor  # (N,) target tokens per sequence

    @property
    def mean_logps(self) -> torch.Tensor:
        return self.logps / self.lengths.clamp(min=1)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fast_path_ok(model, input_ids, attention_mask, position_ids) -> bool:
    """Whether decoder → output-embedding reproduces the model's logits (checked once per model)."""
    base = _unwrap(model)
    if not isinstance(base, torch.nn.Module):
        return False
    cached = getattr(base, "_alignkit_fast_logits", None)
    if cached is not None:
        return cached
    ok = False
    was_training = base.training
    devices = [torch.cuda.current_device()] if input_ids.is_cuda else []
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if decoder is not None and head is not None:
            # eval mode and a forked RNG: the check must not consume randomness (exact resume) or see dropout
            base.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                n = min(2, input_ids.shape[0])
                kwargs = {"input_ids": input_ids[:n], "position_ids": position_ids[:n], "use_cache": False,
                          "attention_mask": attention_mask[:n]}
                full = base(**kwargs).logits
                fast = head(decoder(**kwargs).last_hidden_state)
                ok = full.shape == fast.shape and torch.allclose(full, fast, rtol=1e-4, atol=1e-4)
    except (AttributeError, TypeError, NotImplementedError, ValueError):
        ok = False
    finally:
        base.train(was_training)
    base._alignkit_fast_logits = ok
    return ok


def target_logps(model, input_ids, attention_mask, position_ids, positions, targets, temperature: float = 1.0,
                 entropy: list | None = None) -> torch.Tensor:
    """(M,) log p(targets[m]) from the logits at flat position `positions[m]` (= row · T + t).

    log p = logit[target] − logsumexp(logits), on logits / `temperature` (online RL samples at a temperature
    and must score at the same one), in float32 at least (bf16 logits are upcast), without a log-softmax
    over the whole (N, T, V) logits. Pass a list as `entropy` to receive the (M,) entropies as well.
    """
    base = _unwrap(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False}
    if _fast_path_ok(model, input_ids, attention_mask, position_ids):
        # (PEFT injects its adapters into the base model's layers, so disable_adapter() applies here too)
        hidden = base.get_decoder()(**kwargs).last_hidden_state                                  # (N, T, H)
        logits = base.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[positions])  # (M, V)
    else:
        full = model(**kwargs).logits
        logits = full.reshape(-1, full.shape[-1])[positions]                                     # (M, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    if entropy is not None:
        with torch.no_grad():
            entropy.append(lse - (logits.softmax(-1) * logits).sum(-1))
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - lse


def sequence_logps(model, batch: SequenceBatch, temperature: float = 1.0, entropy: list | None = None) -> LogProbs:
    """Per-token log-probabilities of the target tokens of a padded batch under a causal LM.

    Padding and prompt positions give exactly 0. Left and right padding give the same numbers (position ids
    count real tokens only). With `entropy` (a list), the per-token entropies (N, T-1) are appended to it.
    """
    n, t = batch.input_ids.shape
    mask = batch.loss_mask[:, 1:]                                    # (N, T-1): target t+1 predicted at t
    rows, cols = mask.nonzero(as_tuple=True)
    positions = rows * t + cols
    targets = batch.input_ids[:, 1:][rows, cols]
    flat_entropy = [] if entropy is not None else None
    values = target_logps(model, batch.input_ids, batch.attention_mask, batch.position_ids, positions, targets,
                          temperature, flat_entropy)
    token_logps = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    token_logps = token_logps.index_put((rows, cols), values)
    if entropy is not None:
        entropy.append(torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put(
            (rows, cols), flat_entropy[0]))
    return LogProbs(token_logps, mask)


def token_values(value_model, batch: SequenceBatch) -> torch.Tensor:
    """(N, T-1) values V(s_t) of a value model (a sequence classifier with one output, read at every
    position), aligned with `sequence_logps`: entry t is the value of the state that predicts token t+1;
    0 where the next token is not a target."""
    base = _unwrap(value_model)
    mask = batch.loss_mask[:, 1:]
    hidden = base.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False).last_hidden_state
    values = base.score(hidden[:, :-1])[..., 0]                                        # (N, T-1)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    return torch.where(mask, values, torch.zeros_like(values))


def packed_token_values(value_model, batch: PackedBatch) -> torch.Tensor:
    """(M,) values V(s) of the states that predict each target token of a prefix-shared batch, in the
    order of `batch.positions` (the same states `token_values` reads in a padded batch)."""
    base = _unwrap(value_model)
    hidden = base.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False).last_hidden_state
    values = base.score(hidden.reshape(-1, hidden.shape[-1])[batch.positions])[:, 0]
    return values.to(torch.promote_types(values.dtype, torch.float32))


def packed_target_logps(model, batch: PackedBatch, temperature: float = 1.0, entropy: list | None = None):
    """(M,) log-probs of every target token of a prefix-shared batch, in the order of `batch.positions`."""
    return target_logps(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.positions,
                        batch.targets, temperature, entropy)


def packed_logps(model, batch: PackedBatch, temperature: float = 1.0) -> SequenceLogps:
    """(S,) summed log-probs of every response of a prefix-shared batch (pairs: chosen first, then rejected),
    read at `temperature`."""
    values = packed_target_logps(model, batch, temperature)
    n = batch.num_sequences
    logps = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, batch.owner, values)
    lengths = torch.bincount(batch.owner, minlength=n)
    return SequenceLogps(logps, lengths)


def pair_logps(model, batch) -> SequenceLogps:
    """(2B,) chosen-then-rejected sequence log-probs, for prefix-shared or plainly padded pair batches."""
    if isinstance(batch, PackedBatch):
        return packed_logps(model, batch)
    lp = sequence_logps(model, batch.sequences)
    return SequenceLogps(lp.logps, lp.lengths)


def _score_shortcut_ok(model, batch: PackedBatch) -> bool:
    """Whether backbone → score head at the last token reproduces the classifier's own forward (checked once)."""
    base = _unwrap(model)
    cached = getattr(base, "_alignkit_fast_scores", None)
    if cached is not None:
        return cached
    ok = False
    was_training = base.training
    devices = [torch.cuda.current_device()] if batch.input_ids.is_cuda else []
    try:
        backbone, head = getattr(base, "base_model", None), getattr(base, "score", None)
        if backbone is not None and backbone is not base and isinstance(head, torch.nn.Module):
            base.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                fast = _packed_scores(base, backbone, head, batch)[0]
                # sequence 0 alone (the tokens its last position sees), through the classifier's own forward
                last = int(batch.last_positions[0])
                row, col = divmod(last, batch.input_ids.shape[1])
                seen = batch.attention_mask[row, 0, col, :col + 1]
                ids = batch.input_ids[row, :col + 1][seen].unsqueeze(0)
                full = base(input_ids=ids, use_cache=False).logits[0, 0]
                ok = bool(torch.allclose(fast, full, rtol=1e-4, atol=1e-4))
    except (AttributeError, TypeError, NotImplementedError, ValueError, IndexError):
        ok = False
    finally:
        base.train(was_training)
    base._alignkit_fast_scores = ok
    return ok


def _packed_scores(model, backbone, head, batch: PackedBatch) -> torch.Tensor:
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False).last_hidden_state       # (R, T, H)
    return head(hidden.reshape(-1, hidden.shape[-1])[batch.last_positions])[:, 0]              # (S,)


def reward_scores(model, batch: SequenceBatch | PackedBatch) -> torch.Tensor:
    """(N,) scores of a sequence-classification reward model (num_labels=1) at each sequence's last
    non-padding token — what plain `transformers` computes when it scores the text.

    A padded batch goes through the model's own forward; a prefix-shared batch through its backbone and score
    head (a shortcut verified once against the model's own forward; without it, an error names the fix).
    """
    if isinstance(batch, PackedBatch):
        if not _score_shortcut_ok(model, batch):
            raise ValueError("this reward model's architecture does not support prefix sharing; "
                             "set prefix_sharing: false")
        base = _unwrap(model)
        scores = _packed_scores(model, base.base_model, base.score, batch)
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False)
        scores = out.logits[:, 0]
    return scores.to(torch.promote_types(scores.dtype, torch.float32))
