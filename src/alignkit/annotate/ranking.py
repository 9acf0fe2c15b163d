"""One ranking, three spellings, and the conversions between them (pure functions, no I/O).

- groups: what the page sends — lists of *display positions*, best group first; a group of two or more is a
  tie, e.g. ``[[2], [0, 3], [1]]``.
- ranks: what the database stores — per response in *data order*, 1 = best; tied responses share a rank and
  ranks are dense (1, 2, 2, 3).
- wins: per response, how many others it beats, a tie counting half (3, 1.5, 1.5, 0) — the scores of an
  exported ranked row, the same convention as `alignkit label`'s round robins.
"""

from __future__ import annotations


class InvalidRanking(ValueError):
    """A ranking the page should not have sent (the HTTP layer answers 400 and writes nothing)."""


def ranks_from_groups(groups: object, order: list[int]) -> list[int]:
    """Dense ranks per response (data order) from groups of display positions; `order[p]` is the response
    shown at position p. Every position must appear exactly once."""
    k = len(order)
    if not isinstance(groups, list) or not groups:
        raise InvalidRanking("'ranking' must be a non-empty list of groups of response positions")
    ranks: list[int | None] = [None] * k
    for rank, group in enumerate(groups, 1):
        if not isinstance(group, list) or not group:
            raise InvalidRanking("every group of 'ranking' must be a non-empty list of response positions")
        for position in group:
            if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < k:
                raise InvalidRanking(f"'ranking' holds {position!r}; positions are 0 to {k - 1}")
            if ranks[order[position]] is not None:
                raise InvalidRanking(f"position {position} appears twice in 'ranking'")
            ranks[order[position]] = rank
    missing = [p for p in range(k) if ranks[order[p]] is None]
    if missing:
        raise InvalidRanking(f"'ranking' leaves out position(s) {', '.join(map(str, missing))}: rank every response")
    return ranks  # type: ignore[return-value]


def groups_from_ranks(ranks: list[int], order: list[int]) -> list[list[int]]:
    """The inverse of `ranks_from_groups`: groups of display positions, best first."""
    return [[p for p in range(len(order)) if ranks[order[p]] == rank] for rank in sorted(set(ranks))]


def wins(ranks: list[int]) -> list[float]:
    """Per response: the responses ranked below it, plus half of those tied with it."""
    return [sum(1.0 if r < other else 0.5 if r == other else 0.0 for j, other in enumerate(ranks) if j != i)
            for i, r in enumerate(ranks)]


def midranks(ranks: list[int]) -> list[float]:
    """Positions 1..K with tied responses sharing the mean of the positions they span (dense 1, 2, 2, 3 →
    1, 2.5, 2.5, 4): the usual rank scale of rank statistics, the same for every ranking of K responses."""
    out = []
    for r in ranks:
        above = sum(other < r for other in ranks)
        tied = sum(other == r for other in ranks)
        out.append(above + (tied + 1) / 2)
    return out


def top(ranks: list[int]) -> list[int]:
    """The responses ranked best (several when tied)."""
    best = min(ranks)
    return [i for i, r in enumerate(ranks) if r == best]
