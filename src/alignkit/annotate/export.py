"""`alignkit annotate export`: judgements as a dataset the trainers read as it is (SPEC §4).

First every item gets scores per response (higher is better, equal = tied), either
- ``none``: one set per judgement — the response's wins in that ranking, a tie counting half (`ranking.wins`);
- ``majority``: one set per item — Copeland's rule: each pair of responses goes to the one most annotators
  ranked higher (a split vote, or a tie, is half to each), and a response's score is its pairs won;
- ``plackett-luce``: one set per item — the log-worths θ of a Plackett–Luce model fitted to all the item's
  rankings (see `plackett_luce_fit`).

Then each scored item becomes rows of `kind`, through the data layer's own conversions:
- ranked: ``prompt``, ``responses`` best first, ``scores`` (ties kept as equal scores; `reward` fits them with
  Breslow's tied Plackett–Luce);
- pairwise: every pair of responses the scores order (`ranked_to_pairwise`, mode ``all``; tied pairs none);
- unary: the best response desirable, the worst undesirable (`ranked_to_unary`; an all-tied item none).

Rows carry ``_item`` (the item's id) and ``_annotator`` (per judgement) or ``_judgements`` (aggregated); the
trainers ignore fields they do not read. The file is written whole and then renamed into place.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from alignkit.annotate.ranking import wins
from alignkit.data.convert import ranked_to_pairwise, ranked_to_unary
from alignkit.data.rows import RankedRow
from alignkit.errors import UserError

KINDS = ("ranked", "pairwise", "unary")
AGGREGATES = ("none", "majority", "plackett-luce")
PRIOR = 0.1          # Plackett–Luce: Gaussian prior precision on θ, which keeps the fit finite (see below)
DECIMALS = 4         # fitted scores are rounded, so that responses the data cannot tell apart come out tied


def copeland_scores(rankings: list[list[int]]) -> list[float]:
    """Majority per pair: for each pair (i, j), +1 to the response more rankings put above the other, +½ each
    when as many put it above as below (ties count for neither)."""
    k = len(rankings[0])
    scores = [0.0] * k
    for i in range(k):
        for j in range(i + 1, k):
            above = sum(r[i] < r[j] for r in rankings)
            below = sum(r[i] > r[j] for r in rankings)
            if above == below:
                scores[i] += 0.5
                scores[j] += 0.5
            else:
                scores[i if above > below else j] += 1.0
    return scores


def plackett_luce_fit(rankings: list[list[int]], prior: float = PRIOR, steps: int = 100) -> list[float]:
    """Log-worths θ (mean 0) maximising Σ log PL(ranking | θ) − prior/2 · |θ|², by Newton's method.

    A ranking with tie groups G₁ ≻ G₂ ≻ … (dense ranks, 1 = best) has Breslow's (1974) likelihood, the one the
    reward trainer's `plackett_luce_loss` uses with ties: Π_g Π_{i∈G_g} e^{θ_i} / Σ_{j∈R_g} e^{θ_j}, where
    R_g = G_g ∪ G_{g+1} ∪ … is everything not yet placed. Tied responses thus share one denominator; an
    all-tied ranking pulls their worths together. Without the prior a response that always wins would get
    θ = +∞; the prior (a N(0, 1/prior) belief) keeps the estimate finite and shrinks it a little toward
    "no difference". The objective is strictly concave, so Newton converges to the one maximum."""
    k = len(rankings[0])
    terms = []  # (response i, its risk set R) for every factor of every ranking
    for ranks in rankings:
        for i, r in enumerate(ranks):
            terms.append((i, np.array([other >= r for other in ranks])))
    theta = np.zeros(k)
    for _ in range(steps):
        gradient, hessian = -prior * theta, -prior * np.eye(k)
        for i, risk in terms:
            p = np.where(risk, np.exp(theta - theta[risk].max()), 0.0)
            p /= p.sum()
            gradient[i] += 1.0
            gradient -= p
            hessian -= np.diag(p) - np.outer(p, p)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return [float(t) for t in theta - theta.mean()]


def scored_items(store, aggregate: str = "none", skip_flagged: bool = False,
                 min_judgements: int = 1) -> list[tuple]:
    """(item, scores per response in data order, extra fields) for each row set to export."""
    if aggregate not in AGGREGATES:
        raise UserError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    items = store.all_items()
    names = {a.id: a.name for a in store.all_annotators().values()}
    by_item = defaultdict(list)
    for j in store.judgements_of(("done",)):
        by_item[j.item_id].append(j)
    out = []
    for item_id, judgements in sorted(by_item.items()):
        if len(judgements) < min_judgements or (skip_flagged and any(j.unsafe for j in judgements)):
            continue
        item = items[item_id]
        if aggregate == "none":
            out += [(item, wins(j.ranks), {"_item": item_id, "_annotator": names[j.annotator_id]})
                    for j in judgements]
            continue
        rankings = [j.ranks for j in judgements]
        scores = copeland_scores(rankings) if aggregate == "majority" else plackett_luce_fit(rankings)
        out.append((item, [round(float(s), DECIMALS) + 0.0 for s in scores],
                    {"_item": item_id, "_judgements": len(judgements)}))
    return out


def rows_of(kind: str, item, scores: list[float], extra: dict) -> list[dict]:
    """One scored item as rows of `kind`."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the data's order
    row = RankedRow(item.prompt, [item.responses[i] for i in order], [scores[i] for i in order], f"item {item.id}")
    if kind == "ranked":
        return [{"prompt": row.prompt, "responses": row.responses, "scores": row.scores, **extra}]
    if kind == "pairwise":
        return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **extra}
                for p in ranked_to_pairwise([row], "all")]
    return [{"prompt": u.prompt, "completion": u.completion, "label": u.label, **extra}
            for u in ranked_to_unary([row])]


def export(store, kind: str, output: str, aggregate: str = "none", skip_flagged: bool = False,
           min_judgements: int = 1) -> dict:
    """Write the dataset; returns {rows, items, judgements}."""
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if min_judgements < 1:
        raise UserError(f"--min-judgements must be at least 1, got {min_judgements}")
    scored = scored_items(store, aggregate, skip_flagged, min_judgements)
    if not scored:
        raise UserError(f"{store.shown}: no judgements to export yet"
                        + (f" (with at least {min_judgements} per item)" if min_judgements > 1 else ""))
    rows = [r for item, scores, extra in scored for r in rows_of(kind, item, scores, extra)]
    if not rows:
        raise UserError(f"no {kind} rows: every judgement exported ties all its responses")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return {"rows": len(rows), "items": len({item.id for item, _, _ in scored}),
            "judgements": sum(extra.get("_judgements", 1) for _, _, extra in scored)}
