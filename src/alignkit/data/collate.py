"""Tokenized examples → padded batch dataclasses (never positional tuples).

Masks are bool and True means "takes part". `loss_mask[i, t]` is True when token t of row i is a training
target (a response token); its log-probability is read from the logits at t − 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.tokenize import Tokenized


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor       # (N, T) long
    attention_mask: torch.Tensor  # (N, T) long, 1 = real token
    loss_mask: torch.Tensor       # (N, T) bool, True = trained-on target token
    position_ids: torch.Tensor    # (N, T) long, counts real tokens only (so left padding changes nothing)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Target tokens: loss-mask positions after the first (the first token is never predicted)."""
        return int(self.loss_mask[:, 1:].sum())


def collate_sequences(seqs: list[Tokenized], pad_id: int, padding_side: str = "right") -> SequenceBatch:
    """Pad sequences to the longest one. Position ids restart at 0 on each row's first real token."""
    n, width = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        input_ids[i, span] = torch.tensor(s.ids, dtype=torch.long)
        attention_mask[i, span] = 1
        loss_mask[i, span] = torch.tensor(s.loss_mask, dtype=torch.bool)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attention_mask, loss_mask, position_ids)


@dataclass(frozen=True)
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    margin: float | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass(frozen=True)
class TokenizedRanking:
    responses: tuple[Tokenized, ...]  # best first
    ties: tuple[int, ...]             # non-decreasing tie-group ids (equal = tied)

    def __len__(self) -> int:
        return sum(len(r) for r in self.responses)


@dataclass
class PairBatch:
    sequences: SequenceBatch     # (2B, T): the B chosen rows first, then the B rejected rows
    margin: torch.Tensor | None  # (B,) or None when no row has a margin

    @property
    def size(self) -> int:
        return self.sequences.input_ids.shape[0] // 2


@dataclass
class RankedBatch:
    sequences: SequenceBatch  # (N, T): every response of every ranking, flattened
    index: torch.Tensor       # (B, K) long: row of `sequences` holding response k of ranking b (0 if absent)
    mask: torch.Tensor        # (B, K) bool: True = response present
    ties: torch.Tensor        # (B, K) long: tie-group ids, non-decreasing along K

    @property
    def size(self) -> int:
        return self.index.shape[0]


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, padding_side: str = "right") -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    margins = [p.margin for p in pairs]
    margin = None
    if any(m is not None for m in margins):
        margin = torch.tensor([m if m is not None else 0.0 for m in margins], dtype=torch.float32)
    return PairBatch(collate_sequences(seqs, pad_id, padding_side), margin)


def collate_rankings(rankings: list[TokenizedRanking], pad_id: int, padding_side: str = "right") -> RankedBatch:
    k = max(len(r.responses) for r in rankings)
    index = torch.zeros((len(rankings), k), dtype=torch.long)
    mask = torch.zeros((len(rankings), k), dtype=torch.bool)
    ties = torch.zeros((len(rankings), k), dtype=torch.long)
    seqs: list[Tokenized] = []
    for b, r in enumerate(rankings):
        n = len(r.responses)
        index[b, :n] = torch.arange(len(seqs), len(seqs) + n)
        mask[b, :n] = True
        ties[b, :n] = torch.tensor(r.ties)
        ties[b, n:] = r.ties[-1] + 1 if n else 0
        seqs.extend(r.responses)
    return RankedBatch(collate_sequences(seqs, pad_id, padding_side), index, mask, ties)


def to_device(batch, device):
    """Move every tensor of a batch dataclass (nested dataclasses included) to `device`."""
    import dataclasses

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if dataclasses.is_dataclass(batch):
        return type(batch)(**{f.name: to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)})
    return batch


@dataclass
class PackedPairBatch:
    """Pairs with a shared prompt, one row each: [prompt | chosen | rejected], computed in one forward.

    A 4D attention mask lets chosen tokens see the prompt and earlier chosen tokens, and rejected tokens see
    the prompt and earlier rejected tokens (never the chosen ones); rejected position ids continue from the
    prompt. So the prompt is computed once per pair instead of twice, and the log-probs equal those of two
    separate sequences.
    """

    input_ids: torch.Tensor       # (B, T) long
    attention_mask: torch.Tensor  # (B, 1, T, T) bool: True = query row may attend to key column
    position_ids: torch.Tensor    # (B, T) long
    positions: torch.Tensor       # (M,) flat index b·T + t of the logits that predict each target token
    targets: torch.Tensor         # (M,) the target token ids
    owner: torch.Tensor           # (M,) which sequence a target belongs to: b (chosen) or B + b (rejected)
    margin: torch.Tensor | None   # (B,) or None
    num_tokens: int

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def prompt_length(pair: TokenizedPair) -> int:
    """Length of the prompt shared by chosen and rejected (their common, non-target prefix)."""
    n = 0
    limit = min(len(pair.chosen), len(pair.rejected))
    while (n < limit and not pair.chosen.loss_mask[n] and not pair.rejected.loss_mask[n]
           and pair.chosen.ids[n] == pair.rejected.ids[n]):
        n += 1
    return n


def collate_packed_pairs(pairs: list[TokenizedPair], pad_id: int) -> PackedPairBatch:
    b = len(pairs)
    spans = []
    for pair in pairs:
        p = prompt_length(pair)
        spans.append((p, len(pair.chosen) - p, len(pair.rejected) - p))
    width = max(p + c + r for p, c, r in spans)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    positions, targets, owner = [], [], []
    for i, (pair, (p, c, r)) in enumerate(zip(pairs, spans)):
        input_ids[i, :p + c] = torch.tensor(pair.chosen.ids, dtype=torch.long)
        input_ids[i, p + c:p + c + r] = torch.tensor(pair.rejected.ids[p:], dtype=torch.long)
        position_ids[i, :p + c] = torch.arange(p + c)
        position_ids[i, p + c:p + c + r] = torch.arange(p, p + r)
        causal = torch.ones((p + c + r, p + c + r), dtype=torch.bool).tril()
        causal[p + c:, p:p + c] = False  # rejected tokens never see the chosen response
        mask[i, 0, :p + c + r, :p + c + r] = causal
        if p + c + r < width:  # padding rows attend to themselves only (keeps softmax finite)
            idx = torch.arange(p + c + r, width)
            mask[i, 0, idx, idx] = True
        row = i * width
        for seq, start, length, who in ((pair.chosen, p, c, i), (pair.rejected, p + c, r, b + i)):
            ids = seq.ids[p:]
            keep = seq.loss_mask[p:]
            for k in range(length):
                if not keep[k]:
                    continue
                prev = (p - 1) if k == 0 else (start + k - 1)  # the position whose logits predict token k
                positions.append(row + prev)
                targets.append(ids[k])
                owner.append(who)
    margins = [pair.margin for pair in pairs]
    margin = None
    if any(m is not None for m in margins):
        margin = torch.tensor([m if m is not None else 0.0 for m in margins], dtype=torch.float32)
    return PackedPairBatch(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
        positions=torch.tensor(positions, dtype=torch.long), targets=torch.tensor(targets, dtype=torch.long),
        owner=torch.tensor(owner, dtype=torch.long), margin=margin,
        num_tokens=sum(p + c + r for p, c, r in spans))
