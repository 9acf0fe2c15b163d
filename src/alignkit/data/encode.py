"""Comparison rows → tokenized examples: a pair (reward, dpo) or a ranking (reward), each response joined to
its prompt by the `Encoder` (chat template, truncation)."""

from __future__ import annotations

from alignkit.data.collate import TokenizedPair, TokenizedRanking
from alignkit.data.rows import PairRow, RankedRow, tie_groups
from alignkit.data.tokenize import Encoder


def encode_pair(encoder: Encoder, row: PairRow) -> TokenizedPair:
    prompt = encoder.prompt_ids(row.prompt, row.source)
    chosen = encoder.join(prompt, encoder.response_ids(row.prompt, row.chosen, row.source))
    rejected = encoder.join(prompt, encoder.response_ids(row.prompt, row.rejected, row.source))
    return TokenizedPair(chosen, rejected, row.margin)


def encode_ranking(encoder: Encoder, row: RankedRow) -> TokenizedRanking:
    prompt = encoder.prompt_ids(row.prompt, row.source)
    responses = tuple(encoder.join(prompt, encoder.response_ids(row.prompt, r, row.source)) for r in row.responses)
    return TokenizedRanking(responses, tuple(tie_groups(row)))
