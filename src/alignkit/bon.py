"""Best-of-N maths (SPEC §11): the KL bound of best-of-n sampling, the unbiased estimate of best-of-n's expected
gold reward from N ≥ n scored samples, and Gao et al.'s d(α − βd) curve.

- Stiennon et al. 2020 / Gao et al. 2022: KL(best-of-n ‖ base) ≤ log n − (n − 1)/n (exact for distinct samples).
- Nakano et al. 2021 (WebGPT) / Gao et al. 2022: with N samples sorted by proxy score, sample i (0-based rank
  in ascending order) is the best of a uniformly random n-subset with probability C(i, n−1) / C(N, n), so
  Σ_i C(i, n−1)/C(N, n) · gold_i is an unbiased estimate of E[gold(best-of-n)]. Ties in the proxy share the
  weight of their ranks equally (the best-of-n picks one of them at random).
- Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization": for best-of-n, gold ≈ d(α − β d) with
  d = √KL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
