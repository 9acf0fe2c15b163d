"""`alignkit annotate stats`: who did what, how far annotators agree, and how the page may have biased them.

The agreement statistics are pure functions, tested against published or hand-worked examples
(tests/test_annotate_stats.py):

- `krippendorff_alpha`: Krippendorff's α by the coincidence matrix (Krippendorff 2011, "Computing
  Krippendorff's Alpha-Reliability"), any number of annotators, missing values allowed; nominal, ordinal,
  interval or ratio metric.
- `cohen_kappa`: Cohen's κ (1960) for two annotators' categorical answers.
- `kendall_tau_b`: Kendall's τ-b (1945), which corrects τ for ties in either ranking.

How they are applied to rankings (`annotation_stats`):
- α: a unit is one response of one item; an annotator's value for it is the response's rank in their ranking
  of the item, as a mid-rank (ties share the mean of the positions they span: 1, 2.5, 2.5, 4). Metric:
  **ordinal**, because ranks are ordinal — the page asks which response is better, not by how much. On
  untied rankings of one size every rank is used equally often, and the ordinal metric then equals the
  interval metric up to a constant (α is the same); with ties, the ordinal metric spaces values by how often
  they are used instead of assuming mid-ranks are equidistant.
- pairwise agreement and κ: a unit is a pair of responses of an item that two annotators both ranked; the
  answer is "i better", "tie" or "j better". κ counts every pair in both orientations, (i, j) and (j, i), so
  that it does not depend on the order in which the candidate file lists the responses (a file listed best
  first would otherwise make one answer nearly constant and κ near 0 however well people agree: the "κ
  paradox"); each annotator's answer frequencies are then symmetric, as in Scott's π.
- τ-b: per item, between two annotators' rankings, averaged over items and annotator pairs (items where τ-b is
  undefined — one annotator tied everything — are left out).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence

from alignkit.annotate.ranking import midranks, top

METRICS = ("nominal", "ordinal", "interval", "ratio")


# ---------------------------------------------------------------------------------------------- measures
def krippendorff_alpha(units: Iterable[Sequence[float]], metric: str = "ordinal") -> float | None:
    """α = 1 − D_o / D_e over `units`, each the values the annotators gave one unit (missing ones left out;
    a unit with fewer than two values cannot be paired and does not count).

    Coincidences: o_ck = Σ_u (pairs of values c, k from different annotators in u) / (m_u − 1), n_c = Σ_k o_ck,
    n = Σ_c n_c. Then α = 1 − (n − 1) Σ o_ck δ²_ck / Σ n_c n_k δ²_ck, with δ² the metric's squared distance;
    ordinal: δ²_ck = (Σ_{g from c to k} n_g − (n_c + n_k)/2)². None when undefined (fewer than two pairable
    values, or no variation at all)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    coincidences: Counter = Counter()
    for unit in units:
        values = list(unit)
        m = len(values)
        if m < 2:
            continue
        for a, b in itertools.permutations(range(m), 2):
            coincidences[(values[a], values[b])] += 1.0 / (m - 1)
    totals: Counter = Counter()
    for (c, _), weight in coincidences.items():
        totals[c] += weight
    n = sum(totals.values())
    if n <= 1:
        return None
    distance = _distance(metric, totals)
    observed = sum(weight * distance(c, k) for (c, k), weight in coincidences.items())
    expected = sum(totals[c] * totals[k] * distance(c, k) for c in totals for k in totals)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def _distance(metric: str, totals: Counter):
    if metric == "nominal":
        return lambda c, k: float(c != k)
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    if metric == "ratio":
        return lambda c, k: 0.0 if c == k else ((c - k) / (c + k)) ** 2
    ordered = sorted(totals)
    cumulative = dict(zip(ordered, itertools.accumulate(totals[v] for v in ordered)))

    def ordinal(c, k):
        low, high = min(c, k), max(c, k)
        between = cumulative[high] - cumulative[low] + totals[low]  # Σ n_g for g from low to high
        return (between - (totals[c] + totals[k]) / 2) ** 2

    return ordinal


def cohen_kappa(answers: Sequence[tuple[Hashable, Hashable]]) -> float | None:
    """κ = (p_o − p_e) / (1 − p_e) over (annotator 1's answer, annotator 2's answer) pairs: p_o the share that
    agree, p_e = Σ_c p₁(c) p₂(c) the agreement expected from each annotator's own answer frequencies. None when
    there are no answers or p_e = 1 (both always gave one and the same answer)."""
    n = len(answers)
    if n == 0:
        return None
    observed = sum(a == b for a, b in answers) / n
    first, second = Counter(a for a, _ in answers), Counter(b for _, b in answers)
    expected = sum(first[c] * second[c] for c in first) / n**2
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """τ-b = (n_c − n_d) / √((n₀ − n₁)(n₀ − n₂)) over the n₀ = n(n−1)/2 pairs: n_c concordant, n_d discordant,
    n₁ pairs tied in x, n₂ tied in y. None when x or y is all ties (or has fewer than two values)."""
    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        tied_x += dx == 0
        tied_y += dy == 0
        if dx * dy > 0:
            concordant += 1
        elif dx * dy < 0:
            discordant += 1
    pairs = len(x) * (len(x) - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def pair_answers(ranks: Sequence[int]) -> list[int]:
    """For every response pair i < j: 1 if i is ranked better, 0 if tied, −1 if j is."""
    return [(ranks[i] < ranks[j]) - (ranks[i] > ranks[j]) for i, j in itertools.combinations(range(len(ranks)), 2)]


def best_share(ranks: Sequence[int], index: int) -> float:
    """How much of "ranked best" response `index` gets: 1, or 1/t when t responses tie at the top, or 0."""
    best = top(list(ranks))
    return 1.0 / len(best) if index in best else 0.0


# -------------------------------------------------------------------------------------------- the report
def annotation_stats(store, metric: str = "ordinal") -> dict:
    """Everything `annotate stats` prints, as a dict (its --json output)."""
    items = store.all_items()
    names = {a.id: a.name for a in store.all_annotators().values()}
    every = store.judgements_of(("done", "skipped"))
    done = [j for j in every if j.status == "done"]
    by_item: dict[int, list] = defaultdict(list)
    for j in done:
        by_item[j.item_id].append(j)
    overlap = store.setting("overlap")
    return {
        "items": len(items),
        "judgements": len(done),
        "skipped": len(every) - len(done),
        "flagged_unsafe": sum(j.unsafe for j in done),
        "overlap": overlap,
        "items_complete": None if overlap is None else sum(len(js) >= overlap for js in by_item.values()),
        "annotators": _per_annotator(every, names),
        "agreement": _agreement(by_item, names, metric),
        "position_bias": _position_bias(done),
        "label": _label_agreement(done, items, names),
        "scores": _score_agreement(done, items),
    }


def _per_annotator(judgements, names: dict) -> list[dict]:
    rows = []
    for annotator_id, name in names.items():
        mine = [j for j in judgements if j.annotator_id == annotator_id]
        done = [j for j in mine if j.status == "done"]
        seconds = [j.submitted_at - j.shown_at for j in done]
        rows.append({"name": name, "done": len(done), "skipped": len(mine) - len(done),
                     "flagged_unsafe": sum(j.unsafe for j in done), "comments": sum(bool(j.comment) for j in done),
                     "median_seconds": statistics.median(seconds) if seconds else None,
                     "mean_seconds": statistics.fmean(seconds) if seconds else None})
    return rows


def _agreement(by_item: dict, names: dict, metric: str) -> dict:
    shared = {item: js for item, js in by_item.items() if len(js) >= 2}
    units = [[midranks(j.ranks)[r] for j in js] for js in shared.values() for r in range(len(js[0].ranks))]
    answers: dict[tuple[str, str], list] = defaultdict(list)
    taus = []
    for js in shared.values():
        for a, b in itertools.combinations(sorted(js, key=lambda j: names[j.annotator_id]), 2):
            key = (names[a.annotator_id], names[b.annotator_id])
            answers[key].extend(zip(pair_answers(a.ranks), pair_answers(b.ranks)))
            tau = kendall_tau_b(a.ranks, b.ranks)
            if tau is not None:
                taus.append(tau)
    every = [pair for pairs in answers.values() for pair in pairs]
    kappas = [{"annotators": list(key), "pairs": len(pairs), "kappa": cohen_kappa(_both_ways(pairs)),
               "agreement": sum(x == y for x, y in pairs) / len(pairs)} for key, pairs in sorted(answers.items())]
    return {
        "items": len(shared),
        "comparisons": len(every),
        "pairwise_agreement": sum(x == y for x, y in every) / len(every) if every else None,
        "krippendorff_alpha": krippendorff_alpha(units, metric) if units else None,
        "alpha_metric": metric,
        "kendall_tau_b": statistics.fmean(taus) if taus else None,
        "cohen_kappa": kappas,
    }


def _both_ways(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return pairs + [(-a, -b) for a, b in pairs]


def _position_bias(done) -> dict:
    """How often the response shown at each position was ranked best (a top tie shared), against the chance
    share 1/K that a random display order gives when position does not matter."""
    by_position: dict[int, list[float]] = defaultdict(list)
    chance: dict[int, list[float]] = defaultdict(list)
    for j in done:
        for position, index in enumerate(j.order):
            by_position[position].append(best_share(j.ranks, index))
            chance[position].append(1.0 / len(j.order))
    return {"judgements": len(done),
            "first_shown_best": statistics.fmean(by_position[0]) if done else None,
            "chance": statistics.fmean(chance[0]) if done else None,
            "best_by_position": [statistics.fmean(by_position[p]) for p in sorted(by_position)]}


def _label_agreement(done, items: dict, names: dict) -> dict:
    """How often the annotators' best is the candidates' `label` (a top tie shared), overall and per person."""
    labelled = [j for j in done if items[j.item_id].label is not None]
    if not labelled:
        return {"judgements": 0, "agreement": None, "chance": None, "per_annotator": {}}
    shares = defaultdict(list)
    for j in labelled:
        shares[names[j.annotator_id]].append(best_share(j.ranks, items[j.item_id].label))
    every = [s for values in shares.values() for s in values]
    return {"judgements": len(labelled), "agreement": statistics.fmean(every),
            "chance": statistics.fmean(1.0 / len(j.ranks) for j in labelled),
            "per_annotator": {name: statistics.fmean(values) for name, values in sorted(shares.items())}}


def _score_agreement(done, items: dict) -> dict:
    """Kendall's τ-b between each human ranking and the candidates' own `scores` (e.g. an AI judge's)."""
    taus = []
    for j in done:
        scores = items[j.item_id].scores
        if scores is not None:
            tau = kendall_tau_b(j.ranks, [-s for s in scores])  # rank 1 is best; the highest score is best
            if tau is not None:
                taus.append(tau)
    return {"judgements": len(taus), "kendall_tau_b": statistics.fmean(taus) if taus else None}


# ------------------------------------------------------------------------------------------------- text
def format_stats(report: dict) -> str:
    def num(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    lines = [f"{report['items']} items, {report['judgements']} judgements ({report['skipped']} skipped, "
             f"{report['flagged_unsafe']} flagged unsafe)"
             + ("" if report["overlap"] is None else
                f"; overlap {report['overlap']}: {report['items_complete']} items complete"), ""]
    width = max([len("annotator")] + [len(a["name"]) for a in report["annotators"]])
    lines.append(f"{'annotator':<{width}}  done  skipped  unsafe  comments  median s/item  mean s/item")
    for a in report["annotators"]:
        lines.append(f"{a['name']:<{width}}  {a['done']:>4}  {a['skipped']:>7}  {a['flagged_unsafe']:>6}  "
                     f"{a['comments']:>8}  {num(a['median_seconds'], 1):>13}  {num(a['mean_seconds'], 1):>11}")
    g = report["agreement"]
    lines += ["", f"agreement over {g['items']} items ranked by two or more annotators "
                  f"({g['comparisons']} response-pair comparisons):",
              f"  pairwise agreement    {num(g['pairwise_agreement'])}  (share of response pairs two annotators "
              f"order alike; a tie is an answer)",
              f"  Krippendorff's alpha  {num(g['krippendorff_alpha'])}  ({g['alpha_metric']} metric over mid-ranks)",
              f"  Kendall's tau-b       {num(g['kendall_tau_b'])}  (mean over items and annotator pairs)"]
    for k in g["cohen_kappa"]:
        lines.append(f"  Cohen's kappa         {num(k['kappa'])}  ({' and '.join(k['annotators'])}: "
                     f"{k['pairs']} pairs, {pct(k['agreement'])} agree)")
    p = report["position_bias"]
    lines += ["", f"position bias: the first-shown response was ranked best in {pct(p['first_shown_best'])} of "
                  f"{p['judgements']} judgements (chance {pct(p['chance'])}); best by position shown: "
                  + " ".join(pct(x) for x in p["best_by_position"])]
    label = report["label"]
    if label["judgements"]:
        per = ", ".join(f"{name} {pct(v)}" for name, v in label["per_annotator"].items())
        lines.append(f"agreement with label: best = label in {pct(label['agreement'])} of {label['judgements']} "
                     f"judgements (chance {pct(label['chance'])}; {per})")
    if report["scores"]["judgements"]:
        lines.append(f"agreement with the candidates' scores: Kendall's tau-b {num(report['scores']['kendall_tau_b'])} "
                     f"over {report['scores']['judgements']} judgements")
    return "\n".join(lines)


def progress_table(store, overlap: int) -> dict:
    """The admin page's numbers: items complete (k judgements), started, untouched; per annotator."""
    import time

    every = store.judgements_of(("open", "done", "skipped"))
    per_item = Counter(j.item_id for j in every if j.status == "done")
    total = store.count_items()
    complete = sum(n >= overlap for n in per_item.values())
    annotators = []
    for a in store.all_annotators().values():
        mine = [j for j in every if j.annotator_id == a.id]
        done = [j for j in mine if j.status == "done"]
        seconds = [j.submitted_at - j.shown_at for j in done]
        last = max((j.submitted_at or j.shown_at for j in mine), default=None)
        annotators.append({"name": a.name, "admin": a.admin, "done": len(done),
                           "skipped": sum(j.status == "skipped" for j in mine),
                           "on_screen": sum(j.status == "open" for j in mine),
                           "flagged_unsafe": sum(j.unsafe for j in done),
                           "median_seconds": None if not seconds else round(statistics.median(seconds), 1),
                           "last_active": None if last is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(last))})
    return {"overlap": overlap, "total": total, "complete": complete,
            "started": sum(0 < n < overlap for n in per_item.values()), "untouched": total - len(per_item),
            "judgements": sum(per_item.values()), "needed": total * overlap, "annotators": annotators}
