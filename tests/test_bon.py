"""Best-of-N maths: the KL bound, the unbiased best-of-n estimator against brute force, and the d(α − βd) fit."""

import itertools
import math
import random

import pytest

from alignkit.bon import best_of_n_weights, expected_best_of_n, fit_bon_curve, kl_bound


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert kl_bound(64) == pytest.approx(math.log(64) - 63 / 64, abs=1e-15)
    with pytest.raises(ValueError):
        kl_bound(0)


def test_weights_by_hand():
    # N = 3, n = 2: ranks (ascending) get C(i, 1)/C(3, 2) = 0, 1/3, 2/3
    assert best_of_n_weights([0.5, 0.1, 0.9], 2) == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-15)
    assert best_of_n_weights([3.0, 1.0, 2.0], 1) == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert best_of_n_weights([3.0, 1.0, 2.0], 3) == pytest.approx([1.0, 0.0, 0.0], abs=1e-15)
    # a tie at the top shares its ranks' weight: (1/3 + 2/3)/2 each
    assert best_of_n_weights([0.9, 0.1, 0.9], 2) == pytest.approx([0.5, 0.0, 0.5], abs=1e-15)
    with pytest.raises(ValueError):
        best_of_n_weights([1.0, 2.0], 3)


def _brute_force(proxy, gold, n):
    """Average over every n-subset of the gold of its best (ties: the mean gold of the tied best)."""
    values = []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        best = [gold[i] for i in subset if proxy[i] == top]
        values.append(sum(best) / len(best))
    return sum(values) / len(values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_equals_brute_force(seed):
    rng = random.Random(seed)
    size = 9
    proxy = [rng.choice([0.0, 0.5, 1.0, 1.5]) if seed == 2 else rng.gauss(0, 1) for _ in range(size)]  # seed 2: ties
    gold = [rng.gauss(0, 1) for _ in range(size)]
    for n in range(1, size + 1):
        assert expected_best_of_n(proxy, gold, n) == pytest.approx(_brute_force(proxy, gold, n), abs=1e-12)
    assert sum(best_of_n_weights(proxy, 4)) == pytest.approx(1.0, abs=1e-12)


def test_estimator_is_stable_for_many_samples():
    proxy = list(range(128))
    gold = [float(i) for i in range(128)]
    # E[max of a random 64-subset of 0..127] = 64·128/65 − 1 + ... exactly: n(N+1)/(n+1) − 1 on 0-based values
    assert expected_best_of_n(proxy, gold, 64) == pytest.approx(64 * 129 / 65 - 1, rel=1e-12)


def test_fit_recovers_a_known_curve():
    d = [math.sqrt(kl_bound(n)) for n in (1, 2, 4, 8, 16, 32, 64)]
    gain = [x * (0.8 - 0.3 * x) for x in d]
    fit = fit_bon_curve(d, gain)
    assert fit["alpha"] == pytest.approx(0.8, abs=1e-10) and fit["beta"] == pytest.approx(0.3, abs=1e-10)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    noisy = fit_bon_curve(d, [g + (0.05 if i % 2 else -0.05) for i, g in enumerate(gain)])
    assert 0.5 < noisy["r2"] < 1.0
