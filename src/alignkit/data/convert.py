"""Conversions between row kinds: ranked → pairwise, pairwise → ranked (a ranking of two), pairwise → unary
(for KTO), ranked → unary.

Each new row keeps the ``source`` of the row it came from, so later errors still point into the file.
"""

from __future__ import annotations

from itertools import combinations

from alignkit.data.rows import PairRow, RankedRow, UnaryRow, tie_groups
from alignkit.errors import UserError

PAIR_MODES = ("all", "adjacent", "best_worst")


def ranked_to_pairwise(rows: list[RankedRow], mode: str = "all") -> list[PairRow]:
    """Preference pairs (better, worse) from ranked rows; tied responses never make a pair.

    - ``all``: every pair i < j that is not tied.
    - ``adjacent``: every response with every response of the next tie group down.
    - ``best_worst``: the best against the worst, one pair per row.
    """
    if mode not in PAIR_MODES:
        raise UserError(f"mode must be one of {', '.join(PAIR_MODES)}, got {mode!r}")
    pairs = []
    for row in rows:
        groups = tie_groups(row)
        for i, j in _pair_indices(groups, mode):
            pairs.append(PairRow(row.prompt, row.responses[i], row.responses[j], None, row.source))
    return pairs


def _pair_indices(groups: list[int], mode: str) -> list[tuple[int, int]]:
    if mode == "best_worst":
        candidates = [(0, len(groups) - 1)]
    elif mode == "adjacent":
        candidates = [(i, j) for i, j in combinations(range(len(groups)), 2) if groups[j] == groups[i] + 1]
    else:
        candidates = list(combinations(range(len(groups)), 2))
    return [(i, j) for i, j in candidates if groups[i] != groups[j]]


def pairwise_to_ranked(rows: list[PairRow]) -> list[RankedRow]:
    """A pair is a ranking of two: (chosen, rejected), best first, untied. The margin has no place in a
    ranking and is dropped."""
    return [RankedRow(row.prompt, [row.chosen, row.rejected], None, row.source) for row in rows]


def comparisons_as(rows: list[PairRow | RankedRow], kind: str) -> list[PairRow | RankedRow]:
    """Pairwise or ranked rows as rows of `kind` ("pairwise" or "ranked"), so that any comparison data can
    evaluate a model trained on either: a pair becomes a ranking of two, a ranking every pair it orders
    (``all``). Either way the ordered pairs are the same, so pair accuracy means the same thing."""
    if kind not in ("pairwise", "ranked"):
        raise ValueError(f"kind must be pairwise or ranked, got {kind!r}")
    out: list[PairRow | RankedRow] = []
    for row in rows:
        if isinstance(row, RankedRow):
            out.extend([row] if kind == "ranked" else ranked_to_pairwise([row]))
        elif isinstance(row, PairRow):
            out.extend([row] if kind == "pairwise" else pairwise_to_ranked([row]))
        else:
            raise TypeError(f"{row.source}: not a comparison row ({type(row).__name__})")
    return out


def pairwise_to_unary(rows: list[PairRow]) -> list[UnaryRow]:
    """Each pair gives two rows: chosen is desirable, rejected undesirable."""
    unary = []
    for row in rows:
        unary.append(UnaryRow(row.prompt, row.chosen, True, row.source))
        unary.append(UnaryRow(row.prompt, row.rejected, False, row.source))
    return unary


def ranked_to_unary(rows: list[RankedRow]) -> list[UnaryRow]:
    """The best response is desirable, the worst undesirable; a row whose best and worst tie is skipped."""
    unary = []
    for row in rows:
        groups = tie_groups(row)
        if groups[0] == groups[-1]:
            continue
        unary.append(UnaryRow(row.prompt, row.responses[0], True, row.source))
        unary.append(UnaryRow(row.prompt, row.responses[-1], False, row.source))
    return unary
