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
    sequences: SequenceBatch | PackedBatch  # every response of every ranking (N sequences)
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


def ranking_layout(rankings: list[TokenizedRanking]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, mask, ties), each (B, K), of rankings whose responses are numbered in order (ranking 0's
    first): index[b, k] numbers response k of ranking b (0 if absent), mask marks present responses, and an
    absent response gets a tie group of its own after the ranking's last."""
    k = max(len(r.responses) for r in rankings)
    index = torch.zeros((len(rankings), k), dtype=torch.long)
    mask = torch.zeros((len(rankings), k), dtype=torch.bool)
    ties = torch.zeros((len(rankings), k), dtype=torch.long)
    first = 0
    for b, r in enumerate(rankings):
        n = len(r.responses)
        index[b, :n] = torch.arange(first, first + n)
        mask[b, :n] = True
        ties[b, :n] = torch.tensor(r.ties)
        ties[b, n:] = r.ties[-1] + 1 if n else 0
        first += n
    return index, mask, ties


def collate_rankings(rankings: list[TokenizedRanking], pad_id: int, padding_side: str = "right") -> RankedBatch:
    seqs = [s for r in rankings for s in r.responses]
    return RankedBatch(collate_sequences(seqs, pad_id, padding_side), *ranking_layout(rankings))


def to_device(batch, device):
    """Move every tensor of a batch dataclass (nested dataclasses included) to `device`."""
    import dataclasses

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if dataclasses.is_dataclass(batch):
        return type(batch)(**{f.name: to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)})
    return batch


@dataclass
class PackedBatch:
    """Responses that share a prompt, one row per prompt: [prompt | response 1 | … | response K], one forward.

    A 4D attention mask lets each response's tokens see the prompt and their own earlier tokens, never another
    response; position ids of every response continue from the prompt. So the prompt is computed once instead
    of K times, and log-probs and scores equal those of the K separate sequences.
    """

    input_ids: torch.Tensor       # (R, T) long
    attention_mask: torch.Tensor  # (R, 1, T, T) bool: True = query row may attend to key column
    position_ids: torch.Tensor    # (R, T) long
    positions: torch.Tensor       # (M,) flat index r·T + t of the logits that predict each target token
    targets: torch.Tensor         # (M,) the target token ids
    owner: torch.Tensor           # (M,) the sequence (response) each target belongs to, in [0, S)
    last_positions: torch.Tensor  # (S,) flat index of each sequence's last non-padding token (reward scores)
    margin: torch.Tensor | None   # (G,) one per group (pair), or None
    num_tokens: int
    spans: torch.Tensor | None = None  # (S, 5) long: row, prompt start, prompt length, response start, length
    pad_id: int = 0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.last_positions.shape[0]


def prompt_length(seqs: tuple[Tokenized, ...]) -> int:
    """Length of the prompt the sequences share (their common, non-target prefix)."""
    n, limit = 0, min(len(s) for s in seqs)
    while n < limit and all(not s.loss_mask[n] and s.ids[n] == seqs[0].ids[n] for s in seqs):
        n += 1
    return n


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin-pack items of the given lengths into rows of at most `capacity` tokens (first fit, longest first;
    an item longer than `capacity` gets a row of its own). Returns the item indices of each row, each row in
    ascending order, rows ordered by their first item."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def group_length(group: tuple[Tokenized, ...]) -> int:
    """Tokens a group takes in a packed row: the shared prompt once, then every response."""
    p = prompt_length(group)
    return p + sum(len(s) - p for s in group)


def collate_packed(groups: list[tuple[Tokenized, ...]], pad_id: int, seq_ids: list[list[int]],
                   margins: list[float | None] | None = None, rows: list[list[int]] | None = None) -> PackedBatch:
    """Pack each group (sequences sharing a prompt) into a row; `seq_ids[g][k]` numbers the sequences.

    `rows` (default: one group per row) lists the groups of each row: several groups in one row are
    independent blocks of the 4D mask with their own position ids (padding-free packing). Targets are listed
    by sequence number, then token order, wherever the rows put them.
    """
    rows = rows if rows is not None else [[g] for g in range(len(groups))]
    spans = []
    for group in groups:
        p = prompt_length(group)
        spans.append((p, [len(s) - p for s in group]))
    used_by_row = [sum(spans[g][0] + sum(spans[g][1]) for g in row) for row in rows]
    width = max(used_by_row)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    n_seq = 1 + max(i for ids in seq_ids for i in ids)
    last = torch.zeros(n_seq, dtype=torch.long)
    where = torch.zeros((n_seq, 5), dtype=torch.long)  # each sequence's columns, to unpack it (models.logps)
    positions, targets, owner = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for g in row:
            group, (p, lens) = groups[g], spans[g]
            used = p + sum(lens)
            base = r * width + offset
            input_ids[r, offset:offset + p] = torch.tensor(group[0].ids[:p], dtype=torch.long)
            position_ids[r, offset:offset + p] = torch.arange(p)
            block = torch.zeros((used, used), dtype=torch.bool)
            block[:, :p] = True
            start = p
            for seq, length, sid in zip(group, lens, seq_ids[g]):
                end = start + length
                where[sid] = torch.tensor([r, offset, p, offset + start, length])
                input_ids[r, offset + start:offset + end] = torch.tensor(seq.ids[p:], dtype=torch.long)
                position_ids[r, offset + start:offset + end] = torch.arange(p, p + length)
                block[start:end, start:end] = True
                for k in range(length):
                    prev = (p - 1) if k == 0 else (start + k - 1)  # the position whose logits predict token k
                    if seq.loss_mask[p + k] and prev >= 0:  # (a first token with no prompt is never predicted)
                        positions.append(base + prev)
                        targets.append(seq.ids[p + k])
                        owner.append(sid)
                # as a classifier reads a standalone sequence: its last token that is not padding
                real = [i for i in range(length) if seq.ids[p + i] != pad_id]
                last[sid] = base + (start + real[-1] if real else max(p - 1, 0))
                start = end
            mask[r, 0, offset:offset + used, offset:offset + used] = block.tril()
            offset += used
        if offset < width:  # padding attends to itself only (keeps the softmax finite)
            idx = torch.arange(offset, width)
            mask[r, 0, idx, idx] = True
    margin = None
    if margins is not None and any(m is not None for m in margins):
        margin = torch.tensor([m if m is not None else 0.0 for m in margins], dtype=torch.float32)
    owner_t = torch.tensor(owner, dtype=torch.long)
    order = torch.argsort(owner_t, stable=True)
    return PackedBatch(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
        positions=torch.tensor(positions, dtype=torch.long)[order], targets=torch.tensor(targets, dtype=torch.long)[order],
        owner=owner_t[order], last_positions=last, margin=margin, num_tokens=sum(used_by_row), spans=where,
        pad_id=pad_id)


def pack_sequences(seqs: list[Tokenized], prompt_of: list, pad_id: int) -> PackedBatch:
    """Sequences numbered 0..N-1 in one padding-free PackedBatch: consecutive sequences of the same prompt
    (`prompt_of`) share a block, and blocks are bin-packed into rows no wider than the widest block."""
    groups: list[list[int]] = []
    for i, prompt in enumerate(prompt_of):
        if groups and prompt_of[groups[-1][-1]] == prompt:
            groups[-1].append(i)
        else:
            groups.append([i])
    blocks = [tuple(seqs[i] for i in g) for g in groups]
    lengths = [group_length(b) for b in blocks]
    rows = first_fit_rows(lengths, max(lengths))
    return collate_packed(blocks, pad_id, groups, rows=rows)


def collate_packed_pairs(pairs: list[TokenizedPair], pad_id: int) -> PackedBatch:
    """Pairs packed one per row; sequences numbered chosen 0..B-1, then rejected B..2B-1."""
    b = len(pairs)
    return collate_packed([(p.chosen, p.rejected) for p in pairs], pad_id, [[i, b + i] for i in range(b)],
                          [p.margin for p in pairs])


def collate_packed_rankings(rankings: list[TokenizedRanking], pad_id: int) -> RankedBatch:
    """Rankings packed one per row; `RankedBatch.sequences` is then a PackedBatch."""
    index, mask, ties = ranking_layout(rankings)
    seq_ids = [index[b, :len(r.responses)].tolist() for b, r in enumerate(rankings)]
    return RankedBatch(collate_packed([r.responses for r in rankings], pad_id, seq_ids), index, mask, ties)
