"""Examples and batches shared by the direct preference trainers (dpo, kto).

Both train on rows of one prompt and two responses — DPO: (chosen, rejected); KTO: (the completion, a
mismatched completion for the KL reference point) — so both use one example type, one collate, and the same
prefix-shared forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import (
    PackedBatch,
    PairBatch,
    TokenizedPair,
    collate_packed_pairs,
    collate_pairs,
)


@dataclass(frozen=True)
class PrefExample:
    pair: TokenizedPair
    ref_logps: tuple[float, float] | None = None  # reference log-probs of the two responses, once precomputed
    label: bool | None = None                     # KTO: the first response is desirable

    def __len__(self) -> int:
        return len(self.pair)


@dataclass
class PrefBatch:
    pairs: PackedBatch | PairBatch  # responses A (first B rows of its log-probs) and B (last B)
    ref_logps: torch.Tensor | None     # (2B,) precomputed reference log-probs, A then B; None = compute
    labels: torch.Tensor | None        # (B,) bool, KTO only

    @property
    def size(self) -> int:
        return self.pairs.size

    @property
    def num_tokens(self) -> int:
        p = self.pairs
        return p.num_tokens if isinstance(p, PackedBatch) else p.sequences.num_tokens


def collate_preference(examples: list[PrefExample], pad_id: int, prefix_sharing: bool = True) -> PrefBatch:
    pairs = [e.pair for e in examples]
    batch = collate_packed_pairs(pairs, pad_id) if prefix_sharing else collate_pairs(pairs, pad_id)
    ref = None
    if all(e.ref_logps is not None for e in examples):
        ref = torch.tensor([e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples])
    labels = None
    if examples[0].label is not None:
        labels = torch.tensor([bool(e.label) for e in examples])
    return PrefBatch(batch, ref, labels)
