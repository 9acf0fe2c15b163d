"""The one place where log-probabilities and reward scores are computed from a model.

Log-probabilities are only needed at target tokens, so the vocabulary projection runs only there: the
decoder's hidden states at the predicting positions go through the output embedding, never a (N, T, V)
tensor of logits for prompt and padding positions. That shortcut is checked once per model against the
model's own full forward (so architectures that post-process their logits — soft-capping, scaling — fall
back to the full forward automatically).

Packed rows (several sequences in one row under a 4D mask, `PackedBatch`) carry the model's attention pattern
(`alignkit.models.attention`) and are checked once per model against the same sequences padded one per row;
an architecture where packing is not exact (ALiBi, an unknown attention) reads padded rows instead, with one
line of notice. Every shortcut falls back to the plain path; none can change a number.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from alignkit.data.collate import PackedBatch, SequenceBatch
from alignkit.models.attention import packed_attention_mask, smallest_window
from alignkit.models.vocab import fusable, head_target_logps


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


@dataclass
class SequenceLogps:
    """Summed log-probabilities of whole sequences (no per-token view needed: DPO, KTO)."""

    logps: torch.Tensor    # (N,)
    lengths: torch.Tensor  # (N,) target tokens per sequence


def per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities averaged over their tokens (IPO, SimPO); a sequence of no tokens gives 0."""
    return logps / lengths.clamp(min=1)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model):
    """The model without its head: the module whose output is `last_hidden_state` (PEFT's adapters live in
    it, so `disable_adapter()` applies). `base_model` for most models; some (Llama 4) name it otherwise."""
    base = _unwrap(model)
    backbone = base.base_model
    if backbone is base:
        for name in ("model", "transformer"):
            if isinstance(getattr(base, name, None), torch.nn.Module):
                return getattr(base, name)
    return backbone


# --------------------------------------------------------------------------------- checked shortcuts
_NOTICES: set[str] = set()


def _notice(message: str) -> None:
    """One line on stderr, once per process for each distinct message."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"alignkit: {message}", file=sys.stderr)


def checked(model, key: str, check, fallback: str) -> bool:
    """Whether the shortcut `key` is exact for `model`, by `check()` -> (ok, why not), run once per model;
    when it is not, one line of notice says why and what is done instead (`fallback`).

    The check runs in eval mode (no dropout), without gradients or autocast (float32 numbers where the
    weights are float32) and on a forked RNG, so it changes neither the run's randomness (exact resume) nor
    its numbers. An exception in the check means "not exact": a fast path that fails falls back, never
    crashes. The answer is stored on the model, so the policy and its disabled-adapter reference share it.
    """
    base = _unwrap(model)
    if not isinstance(base, torch.nn.Module):  # a stand-in forward (tests): the plain path, nothing to check
        return False
    results = base.__dict__.setdefault("_alignkit_checks", {})
    if key in results:
        return results[key]
    was_training = base.training
    first = next(base.parameters(), None)
    devices = [first.device.index or 0] if first is not None and first.is_cuda else []
    try:
        base.eval()
        device_type = first.device.type if first is not None else "cpu"
        with torch.no_grad(), torch.random.fork_rng(devices=devices), torch.autocast(device_type, enabled=False):
            ok, why = check()
    except Exception as e:  # noqa: BLE001  (any failure of a fast path means: use the plain path)
        ok, why = False, f"{key.split('/')[0].replace('_', ' ')} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    finally:
        base.train(was_training)
    results[key] = ok
    if not ok:
        _notice(f"{type(base).__name__}: {why}; {fallback}")
    return ok


def _close(fast: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(agree, largest difference relative to the plain values' scale); 1e-4 in float32, 2e-2 below."""
    if fast.shape != plain.shape:
        return False, float("inf")
    scale = max(1.0, float(plain.abs().max())) if plain.numel() else 1.0
    error = float((fast.float() - plain.float()).abs().max()) / scale if plain.numel() else 0.0
    return error <= (1e-4 if dtype == torch.float32 else 2e-2), error


def _weights_dtype(model) -> torch.dtype:
    first = next(_unwrap(model).parameters(), None)
    return first.dtype if first is not None else torch.float32


def _first_positions(kwargs: dict, rows: int, length: int) -> dict:
    """The first `rows` rows and `length` positions of a causal forward's inputs (4D masks cut on both position
    axes): each of those positions is computed exactly as in the whole forward, at a fraction of its cost."""
    def cut(v):
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        v = v[:rows]
        if v.dim() == 4:                                                  # (N, 1, T, T) attention masks
            return v[..., :length, :length]
        return v[:, :length] if v.dim() >= 2 else v                       # (N, T) ids, positions, masks
    return {k: cut(v) for k, v in kwargs.items()}


POSTPROCESSED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def _fast_logits_ok(model, kwargs: dict) -> bool:
    """Whether backbone → output embedding reproduces the model's logits (soft-capping, logit scaling and the
    like do not: then the full forward is used)."""
    def check():
        base = _unwrap(model)
        head = base.get_output_embeddings()
        if head is None:
            return False, "no output embedding"
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        # post-processing that small test logits can hide (tanh(x/30)·30 ≈ x for |x| ≪ 30): never the shortcut
        for name in POSTPROCESSED_LOGITS:
            if getattr(config, name, None) not in (None, 0, 1, 1.0):
                return False, f"its logits are post-processed ({name})"
        # a few positions suffice to compare two ways of computing the same logits; with a large vocabulary,
        # the full logits of whole rows would cost more than the training step they guard
        part = _first_positions(kwargs, 2, 64)
        full = base(**part).logits
        fast = head(_backbone(model)(**part).last_hidden_state)
        ok, error = _close(fast, full, _weights_dtype(model))
        return ok, f"its logits are not the output layer of its hidden states (diff {error:.2g})"
    return checked(model, "fast_logits", check, "computing full logits (same numbers, slower)")


# ------------------------------------------------------------------------------------- packed rows
def padded_view(batch: PackedBatch) -> PackedBatch:
    """The sequences of a packed batch one per row, right-padded with a 2D attention mask (what plain
    `transformers` computes), with `positions` and `last_positions` pointing at the same tokens there.
    Targets, owners and margins are unchanged, so every function that reads a PackedBatch reads this too."""
    if batch.spans is None:
        raise ValueError("this PackedBatch has no spans (build it with alignkit.data.collate.collate_packed)")
    spans = batch.spans.cpu()
    width_packed = batch.input_ids.shape[1]
    lengths = spans[:, 2] + spans[:, 4]                                               # (S,) prompt + response
    n, width = spans.shape[0], int(lengths.max())
    source = torch.zeros((n, width), dtype=torch.long)                               # flat packed index per slot
    for s, (row, prompt_start, prompt_len, start, length) in enumerate(spans.tolist()):
        cols = list(range(prompt_start, prompt_start + prompt_len)) + list(range(start, start + length))
        source[s, :len(cols)] = torch.tensor(cols, dtype=torch.long) + row * width_packed
    real = torch.arange(width)[None, :] < lengths[:, None]                             # (S, W)
    device = batch.input_ids.device
    source, real = source.to(device), real.to(device)
    input_ids = torch.where(real, batch.input_ids.reshape(-1)[source], batch.pad_id)

    def remap(flat: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        col = flat % width_packed
        row_spans = batch.spans[seq]                                                   # (M, 5)
        prompt_start, prompt_len, start = row_spans[:, 1], row_spans[:, 2], row_spans[:, 3]
        index = torch.where(col < prompt_start + prompt_len, col - prompt_start, prompt_len + col - start)
        return seq * width + index

    return PackedBatch(
        input_ids=input_ids, attention_mask=real.long(), position_ids=(real.long().cumsum(-1) - 1).clamp(min=0),
        positions=remap(batch.positions, batch.owner), targets=batch.targets, owner=batch.owner,
        last_positions=remap(batch.last_positions, torch.arange(n, device=device)), margin=batch.margin,
        num_tokens=batch.num_tokens, spans=None, pad_id=batch.pad_id)


def _some_rows(batch: PackedBatch, rows: list[int]) -> PackedBatch:
    """Rows `rows` of a packed batch as a batch of their own (their sequences renumbered from 0), for a check."""
    width = batch.input_ids.shape[1]
    rows_t = torch.tensor(sorted(set(rows)), dtype=torch.long, device=batch.input_ids.device)
    new_row = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long, device=rows_t.device)
    new_row[rows_t] = torch.arange(len(rows_t), device=rows_t.device)
    seqs = (new_row[batch.spans[:, 0]] >= 0).nonzero().squeeze(-1)                  # (S',) their sequences
    number = torch.full((batch.spans.shape[0],), -1, dtype=torch.long, device=seqs.device)
    number[seqs] = torch.arange(len(seqs), device=seqs.device)
    keep = new_row[batch.positions // width] >= 0

    def moved(flat: torch.Tensor) -> torch.Tensor:  # flat index in the old rows -> in the new ones
        return new_row[flat // width] * width + flat % width

    spans = batch.spans[seqs].clone()
    spans[:, 0] = new_row[spans[:, 0]]
    return PackedBatch(
        input_ids=batch.input_ids[rows_t], attention_mask=batch.attention_mask[rows_t],
        position_ids=batch.position_ids[rows_t], positions=moved(batch.positions[keep]),
        targets=batch.targets[keep], owner=number[batch.owner[keep]],
        last_positions=moved(batch.last_positions[seqs]), margin=None, num_tokens=0, spans=spans,
        pad_id=batch.pad_id)


def _check_rows(batch: PackedBatch) -> list[int]:
    """The rows a packing check runs on: the one with the longest sequence (where windows matter) and the one
    with the most sequences (prompts shared, blocks side by side)."""
    per_row = torch.bincount(batch.spans[:, 0], minlength=batch.input_ids.shape[0])
    return [int(batch.position_ids.max(-1).values.argmax()), int(per_row.argmax())]


def _kwargs(batch: SequenceBatch | PackedBatch, attention_mask=None) -> dict:
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False,
            "attention_mask": batch.attention_mask if attention_mask is None else attention_mask}


def _layer_costs(config) -> tuple[int, int] | None:
    """(matmul weights of one decoder layer, FLOPs per attended (query, key) pair of one layer) read from a
    config (q, k, v, o and a gated MLP; None where the config does not say)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        mlp = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    except (AttributeError, TypeError, ValueError):
        return None
    weights = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * mlp
    return weights, 4 * heads * head_dim


def padding_is_cheaper(config, batch: PackedBatch) -> bool:
    """Whether the sequences of a packed batch, padded one per row, cost clearly fewer FLOPs than the packed
    rows (by the decoder's matmuls and attention; the vocabulary projection is the same either way).

    Packed rows attend under a 4D mask, which attention kernels compute as a full square (they skip the
    causal half only without a mask), while sequences of one length padded one per row need no mask at all.
    So for long sequences of equal length — a long prompt shared by two responses of the same length, say —
    the prompt computed once can cost more attention than it saves: [P | C | R] under a mask is (3L)² pairs
    per layer, two causal rows [P | C], [P | R] are 2 · (2L)² / 2. Both layouts give the same numbers."""
    costs = _layer_costs(config)
    if costs is None or batch.spans is None:
        return False
    per_token, per_pair = costs
    rows, width = batch.input_ids.shape
    packed = rows * width * (2 * per_token + per_pair * width)
    lengths = batch.spans[:, 2] + batch.spans[:, 4]
    longest, n = int(lengths.max()), int(lengths.shape[0])
    # unmasked causal kernels skip the upper half; eager attention computes (and masks) the whole square anyway
    causal_skip = getattr(config, "_attn_implementation", None) != "eager" and bool((lengths == longest).all())
    pairs = longest * (longest + 1) // 2 if causal_skip else longest * longest
    padded = n * (longest * 2 * per_token + pairs * per_pair)
    return padded < 0.9 * packed


def model_batch(model, batch: PackedBatch) -> tuple[PackedBatch, dict]:
    """(the batch the model should read, its forward kwargs): the packed rows with the model's attention
    pattern (sliding windows and chunks included, see `alignkit.models.attention`), or — where packing is not
    exact for this architecture, or costs more than padding (`padding_is_cheaper`) — the same sequences padded
    one per row.

    Packing is checked once per model against the padded forward, separately for batches with a sequence
    longer than the model's narrowest window (where the window matters) and batches without."""
    if batch.attention_mask.dim() == 2:  # already plain
        return batch, _kwargs(batch)
    config = _unwrap(model).config
    if padding_is_cheaper(config, batch):
        plain = padded_view(batch)
        return plain, _kwargs(plain)
    window = smallest_window(config)
    long = window is not None and int(batch.position_ids.max()) >= window
    packed = _kwargs(batch, packed_attention_mask(config, batch.attention_mask, batch.position_ids))

    def check():  # on the rows with the longest sequence and with the most sequences: windows, prompts, blocks
        backbone = _backbone(model)
        row = _some_rows(batch, _check_rows(batch))
        plain = padded_view(row)
        at = torch.cat([row.positions, row.last_positions])
        at_plain = torch.cat([plain.positions, plain.last_positions])
        mask = packed_attention_mask(config, row.attention_mask, row.position_ids)
        fast = backbone(**_kwargs(row, mask)).last_hidden_state.flatten(0, 1)[at]
        slow = backbone(**_kwargs(plain)).last_hidden_state.flatten(0, 1)[at_plain]
        ok, error = _close(fast, slow, _weights_dtype(model))
        return ok, f"packed rows do not reproduce a padded forward (diff {error:.2g})"

    what = f" for sequences longer than its attention window ({window})" if long else ""
    if checked(model, "packing/long" if long else "packing", check,
               f"using padded batches{what} (same numbers, slower)"):
        return batch, packed
    plain = padded_view(batch)
    return plain, _kwargs(plain)


def target_logps(model, kwargs: dict, positions, targets, temperature: float = 1.0,
                 entropy: list | None = None) -> torch.Tensor:
    """(M,) log p(targets[m]) from the logits at flat position `positions[m]` (= row · T + t) of the forward
    on `kwargs`.

    log p = logit[target] − logsumexp(logits), on logits / `temperature` (online RL samples at a temperature
    and must score at the same one), in float32 at least (bf16 logits are upcast), without a log-softmax
    over the whole (N, T, V) logits. Pass a list as `entropy` to receive the (M,) entropies as well.
    """
    base = _unwrap(model)
    if _fast_logits_ok(model, kwargs):
        # (PEFT injects its adapters into the base model's layers, so disable_adapter() applies here too)
        hidden = _backbone(model)(**kwargs).last_hidden_state                                     # (N, T, H)
        head, hidden = base.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1])[positions]  # (M, H)
        if fusable(head):  # the same numbers without a chain of (M, V) temporaries (alignkit.models.vocab)
            return head_target_logps(head, hidden, targets, temperature, entropy)
        logits = head(hidden)                                                                    # (M, V)
    else:
        full = model(**kwargs).logits
        logits = full.reshape(-1, full.shape[-1])[positions]                                     # (M, V)
    return logits_target_logps(logits, targets, temperature, entropy)


def logits_target_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                        entropy: list | None = None) -> torch.Tensor:
    """(M,) log softmax(logits / temperature)[targets] from logits (M, V), upcast to float32 at least; with
    `entropy` (a list), the (M,) entropies (no gradient) are appended. The plain path: `alignkit.models.vocab`
    computes the same numbers from hidden states without the (M, V) temporaries."""
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
    values = target_logps(model, _kwargs(batch), positions, targets, temperature, flat_entropy)
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
    hidden = _backbone(value_model)(**_kwargs(batch)).last_hidden_state
    values = base.score(hidden[:, :-1])[..., 0]                                        # (N, T-1)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    return torch.where(mask, values, torch.zeros_like(values))


def packed_token_values(value_model, batch: PackedBatch) -> torch.Tensor:
    """(M,) values V(s) of the states that predict each target token of a prefix-shared batch, in the
    order of `batch.positions` (the same states `token_values` reads in a padded batch)."""
    base = _unwrap(value_model)
    batch, kwargs = model_batch(value_model, batch)
    hidden = _backbone(value_model)(**kwargs).last_hidden_state
    values = base.score(hidden.reshape(-1, hidden.shape[-1])[batch.positions])[:, 0]
    return values.to(torch.promote_types(values.dtype, torch.float32))


def packed_target_logps(model, batch: PackedBatch, temperature: float = 1.0, entropy: list | None = None):
    """(M,) log-probs of every target token of a prefix-shared batch, in the order of `batch.positions`."""
    batch, kwargs = model_batch(model, batch)
    return target_logps(model, kwargs, batch.positions, batch.targets, temperature, entropy)


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


def _head_scores(model, batch: PackedBatch, kwargs: dict) -> torch.Tensor:
    """(S,) the score head on the backbone's hidden state at each sequence's last token."""
    base = _unwrap(model)
    hidden = _backbone(model)(**kwargs).last_hidden_state                                      # (R, T, H)
    return base.score(hidden.reshape(-1, hidden.shape[-1])[batch.last_positions])[:, 0]      # (S,)


def _score_shortcut_ok(model, batch: PackedBatch) -> bool:
    """Whether backbone → score head at the last token reproduces the classifier's own forward (checked once,
    on the sequences of the batch's first row, padded one per row)."""
    def check():
        plain = padded_view(_some_rows(batch, [0]))
        if not isinstance(getattr(_unwrap(model), "score", None), torch.nn.Module):
            return False, "no score head"
        fast = _head_scores(model, plain, _kwargs(plain))
        full = _unwrap(model)(**_kwargs(plain)).logits[:, 0]
        ok, error = _close(fast, full, _weights_dtype(model))
        return ok, f"its score is not the head at the last token (diff {error:.2g})"
    return checked(model, "fast_scores", check, "scoring padded rows with the classifier's own forward")


def reward_scores(model, batch: SequenceBatch | PackedBatch) -> torch.Tensor:
    """(N,) scores of a sequence-classification reward model (num_labels=1) at each sequence's last
    non-padding token — what plain `transformers` computes when it scores the text.

    A padded batch goes through the model's own forward. A prefix-shared batch goes through the backbone and
    the score head at each sequence's last token (packing and the head shortcut are each checked once per
    model against the plain forward); where either is not exact, through the classifier on padded rows.
    """
    if isinstance(batch, PackedBatch):
        if _score_shortcut_ok(model, batch):
            read, kwargs = model_batch(model, batch)
            scores = _head_scores(model, read, kwargs)
        else:
            plain = padded_view(batch)
            scores = model(**_kwargs(plain)).logits[:, 0]
    else:
        scores = model(**_kwargs(batch)).logits[:, 0]
    return scores.to(torch.promote_types(scores.dtype, torch.float32))
