"""Best-of-N (SPEC §10, §11): sampling N responses and keeping the best (`best_of_n`, `alignkit bon`), and its
maths: the KL bound of best-of-n sampling, the unbiased estimate of best-of-n's expected gold reward from
N ≥ n scored samples, and Gao et al.'s d(α − βd) curve.

- Stiennon et al. 2020 / Gao et al. 2022: KL(best-of-n ‖ base) ≤ log n − (n − 1)/n (exact for distinct samples).
- Nakano et al. 2021 (WebGPT) / Gao et al. 2022: with N samples sorted by proxy score, sample i (0-based rank
  in ascending order) is the best of a uniformly random n-subset with probability C(i, n−1) / C(N, n), so
  Σ_i C(i, n−1)/C(N, n) · gold_i is an unbiased estimate of E[gold(best-of-n)]. Ties in the proxy share the
  weight of their ranks equally (the best-of-n picks one of them at random).
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": for best-of-n, gold ≈ d(α − β d) with
  d = √KL.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def kl_bound(n: int) -> float:
    """log n − (n − 1)/n: the KL divergence of best-of-n from the sampling policy (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(proxy: Sequence[float], n: int) -> list[float]:
    """For each sample, the probability that it is the one best-of-n keeps from a random n-subset of the N
    samples (ties in `proxy` split equally). The weights sum to 1."""
    size = len(proxy)
    if not 1 <= n <= size:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {size}")
    order = sorted(range(size), key=lambda i: proxy[i])
    log_total = _log_comb(size, n)
    by_rank = [math.exp(_log_comb(rank, n - 1) - log_total) if rank >= n - 1 else 0.0 for rank in range(size)]
    weights = [0.0] * size
    start = 0
    while start < size:  # a run of equal proxy scores shares the weight of its ranks
        end = start
        while end + 1 < size and proxy[order[end + 1]] == proxy[order[start]]:
            end += 1
        share = sum(by_rank[start:end + 1]) / (end - start + 1)
        for rank in range(start, end + 1):
            weights[order[rank]] = share
        start = end + 1
    return weights


def expected_best_of_n(proxy: Sequence[float], gold: Sequence[float], n: int) -> float:
    """Unbiased estimate of E[gold of the sample with the highest proxy among n], from N ≥ n samples of one
    prompt scored by both rewards."""
    if len(proxy) != len(gold):
        raise ValueError(f"{len(proxy)} proxy scores but {len(gold)} gold scores")
    return sum(w * g for w, g in zip(best_of_n_weights(proxy, n), gold))


def fit_bon_curve(d: Sequence[float], gold_gain: Sequence[float]) -> dict:
    """Least-squares fit of gold_gain ≈ d·(α − β·d) (no intercept: zero gain at d = 0).

    Returns {"alpha", "beta", "r2"}, with R² = 1 − SS_res / SS_tot around the mean gain."""
    if len(d) != len(gold_gain) or len(d) < 2:
        raise ValueError("need at least two (d, gain) points of equal count")
    # normal equations for y = α·x1 − β·x2 with x1 = d, x2 = d²
    s11 = sum(x * x for x in d)
    s12 = sum(x ** 3 for x in d)
    s22 = sum(x ** 4 for x in d)
    s1y = sum(x * y for x, y in zip(d, gold_gain))
    s2y = sum(x * x * y for x, y in zip(d, gold_gain))
    det = s11 * s22 - s12 * s12
    if det <= 0:
        raise ValueError("d needs at least two distinct non-zero values")
    alpha = (s1y * s22 - s2y * s12) / det
    beta = -(s11 * s2y - s12 * s1y) / det
    fitted = [x * (alpha - beta * x) for x in d]
    mean = sum(gold_gain) / len(gold_gain)
    ss_tot = sum((y - mean) ** 2 for y in gold_gain)
    ss_res = sum((y - f) ** 2 for y, f in zip(gold_gain, fitted))
    return {"alpha": alpha, "beta": beta, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def fit_rl_curve(d: Sequence[float], gold_gain: Sequence[float]) -> dict:
    """Least-squares fit of Gao et al. (2022)'s RL form gold_gain ≈ d·(α − β·log d), d = √KL, over the points
    with d > 0 (no intercept: zero gain at d = 0). Returns {"alpha", "beta", "r2", "points"}.

    Linear in (α, β) with regressors x1 = d and x2 = −d·log d, solved by the 2×2 normal equations; R² is
    1 − SS_res / SS_tot around the mean gain of the fitted points."""
    pts = [(x, y) for x, y in zip(d, gold_gain, strict=True) if x > 0]
    if len(pts) < 2:
        raise ValueError("need at least two points with d > 0")
    x1 = [x for x, _ in pts]
    x2 = [-x * math.log(x) for x, _ in pts]
    ys = [y for _, y in pts]
    s11, s12, s22 = sum(a * a for a in x1), sum(a * b for a, b in zip(x1, x2)), sum(b * b for b in x2)
    s1y, s2y = sum(a * y for a, y in zip(x1, ys)), sum(b * y for b, y in zip(x2, ys))
    det = s11 * s22 - s12 * s12
    if det <= 1e-12 * max(1.0, s11 * s22):
        raise ValueError("d needs at least two distinct values other than 0 and 1")
    alpha = (s1y * s22 - s2y * s12) / det
    beta = (s11 * s2y - s12 * s1y) / det
    fitted = [x * (alpha - beta * math.log(x)) for x in x1]
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted))
    return {"alpha": alpha, "beta": beta, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
            "points": len(pts)}


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# ------------------------------------------------------------------------------------------- sampling
@dataclass
class BestOfN:
    """One prompt's best-of-n: every candidate with its score, and the one kept (the highest score; the first
    of equals)."""

    prompt: object             # as in the data: a string or a list of chat messages
    candidates: list[str]
    scores: list[float]
    finished: list[bool]       # each candidate ended with EOS (else it hit max_new_tokens)

    @property
    def best_index(self) -> int:
        return max(range(len(self.scores)), key=lambda i: self.scores[i])

    @property
    def best(self) -> str:
        return self.candidates[self.best_index]

    @property
    def best_score(self) -> float:
        return self.scores[self.best_index]

    def row(self) -> dict:
        """The output row of SPEC §10: {prompt, best, best_score, candidates: [{text, score}]}."""
        return {"prompt": self.prompt, "best": self.best, "best_score": self.best_score,
                "candidates": [{"text": t, "score": s} for t, s in zip(self.candidates, self.scores)]}


def best_of_n(model, tokenizer, prompts: list[tuple[object, list[int]]], scorer, n: int, *,
              max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
              batch_size: int = 64, compute_dtype=None, generate_fn=None, progress=None) -> list[BestOfN]:
    """Sample `n` responses to each (prompt, prompt_ids) and score them; returns one `BestOfN` per prompt.

    Generation is batched across prompts (`batch_size` samples per call), and the n samples of a prompt share
    one prefill of it (the rollout engine copies a repeated prompt's KV cache). `scorer` is an
    `alignkit.rewards.Scorer` or anything with its call: (prompts, responses, finished, sampled) → (scores,
    spread); or a pairwise judge (an object with `compare_batch` and `can_score` false, see `alignkit.judges`),
    which picks the best by a knockout (`knockout`). Each chunk of prompts draws from its own generator seeded
    by (seed, chunk), so a result does not depend on how many prompts came before it in another run.
    `progress(k)` is called after k more prompts.
    """
    from alignkit.rl.responses import sample_responses
    from alignkit.rl.rollout import generate

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    chunk = max(1, batch_size // n)
    was_training = model.training
    model.eval()
    results: list[BestOfN] = []
    for begin in range(0, len(prompts), chunk):
        part = prompts[begin:begin + chunk]
        batch = sample_responses(model, tokenizer, part, n, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, generator=_generator(seed, begin), compute_dtype=compute_dtype,
                                 generate_fn=generate_fn or generate)
        if getattr(scorer, "can_score", True):
            scores, _ = scorer(batch.prompts, batch.texts, batch.finished, batch.seqs)              # (len(part)·n,)
            scores = [float(v) for v in scores]
        else:  # a pairwise judge: rounds survived in a knockout
            scores = [float(w) for wins in knockout(scorer, [p for p, _ in part],
                                                        [batch.texts[j * n:(j + 1) * n] for j in range(len(part))])
                      for w in wins]
        for j, (prompt, _) in enumerate(part):
            rows = slice(j * n, (j + 1) * n)
            results.append(BestOfN(prompt, batch.texts[rows], scores[rows], batch.finished[rows]))
        if progress is not None:
            progress(len(part))
    model.train(was_training)
    return results


def knockout(judge, prompts: list, candidates: list[list[str]]) -> list[list[int]]:
    """The best of each prompt's candidates by a pairwise judge: a single-elimination knockout, each round's
    matches of every prompt in one `judge.compare_batch` call. Returns the rounds each candidate survived (a
    bye counts), so the champion alone has the most. A tie or a failed verdict sends the first of the pair
    through."""
    survived = [[0] * len(c) for c in candidates]
    alive = [list(range(len(c))) for c in candidates]
    while any(len(a) > 1 for a in alive):
        matches = [(b, a[i], a[i + 1]) for b, a in enumerate(alive) for i in range(0, len(a) - 1, 2)]
        verdicts = judge.compare_batch([(prompts[b], candidates[b][x], candidates[b][y]) for b, x, y in matches])
        through: list[list[int]] = [a[-1:] if len(a) % 2 else [] for a in alive]  # the byes
        for (b, x, y), verdict in zip(matches, verdicts):
            through[b].insert(len(through[b]) - (len(alive[b]) % 2), y if verdict.winner == 1 else x)
        for b, a in enumerate(alive):
            if len(a) > 1:
                alive[b] = through[b]
                for i in through[b]:
                    survived[b][i] += 1
    return survived


def _generator(seed: int, begin: int):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + begin)


def run_bon(cfg) -> dict:
    """`alignkit bon`: best-of-n over a prompts file; writes cfg.output (JSON lines, atomically) and returns
    (and prints) the summary: n, prompts, mean best score, mean candidate score, the KL bound."""
    from tqdm.auto import tqdm

    from alignkit.data.formats import load_rows
    from alignkit.data.tokenize import Encoder
    from alignkit.errors import UserError
    from alignkit.models.load import load_causal_lm, load_tokenizer, quiet_transformers, training_dtypes
    from alignkit.rewards import Scorer

    quiet_transformers()
    result = load_rows(list(cfg.data), kind="auto", on_bad_row=cfg.on_bad_row)
    if result.skipped:
        print(f"warning: skipped {result.skipped} bad rows (on_bad_row: skip)", file=sys.stderr)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    encoder = Encoder(tokenizer, cfg.max_prompt_length + cfg.max_new_tokens, cfg.max_prompt_length)
    prompts = [(row.prompt, encoder.prompt_ids(row.prompt, row.source)) for row in result.rows
               if getattr(row, "prompt", None)]
    if not prompts:
        raise UserError(f"{cfg.data[0]}: no rows with a prompt")
    judge = None
    if cfg.reward_judge:
        from alignkit.judges import build_judge

        judge = build_judge(cfg.reward_judge, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
    if judge is not None and not judge.can_score:  # a pairwise judge: the knockout decides alone
        if cfg.reward_models or cfg.reward_model or cfg.reward_fn:
            raise UserError(f"reward_judge {cfg.reward_judge!r} compares pairs and picks the best by a knockout "
                            "alone; give it without reward models or reward_fn")
        scorer = judge
    else:
        scorer = Scorer(cfg, policy_tokenizer=tokenizer, judge=judge)
    model = load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code, for_training=False).eval()
    bar = tqdm(total=len(prompts), desc=f"alignkit bon (n={cfg.n})", unit="prompt", disable=None, file=sys.stderr)
    from alignkit.rl.vllm_backend import generate_fn_for

    picked = best_of_n(model, tokenizer, prompts, scorer, cfg.n, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                       compute_dtype=training_dtypes(cfg.dtype)[1], progress=bar.update,
                       generate_fn=generate_fn_for(cfg, cfg.model))
    bar.close()
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in picked:
            f.write(json.dumps(r.row(), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    candidates = [s for r in picked for s in r.scores]
    summary = {"n": cfg.n, "prompts": len(picked), "mean_best_score": sum(r.best_score for r in picked) / len(picked),
               "mean_candidate_score": sum(candidates) / len(candidates), "kl_bound": kl_bound(cfg.n)}
    print(f"alignkit bon: {len(picked)} prompts × {cfg.n} samples → {out}; mean best score "
          f"{summary['mean_best_score']:.4f}, mean candidate score {summary['mean_candidate_score']:.4f}; "
          f"KL(best-of-{cfg.n} ‖ policy) ≤ log n − (n−1)/n = {summary['kl_bound']:.4f} nats")
    return summary
