"""Reward shaping, the adaptive KL controller and critic-free advantages, against hand-worked values."""

import math

import pytest
import torch

from alignkit.rl.shaping import (
    AdaptiveKLController,
    adjust_scores,
    grpo_advantages,
    rloo_advantages,
    shape_rewards,
)

F64 = torch.float64


def test_shape_rewards_by_hand():
    """Row 0: 3 tokens, logps −1,−2,−1 vs ref −1.5,−2,−0.5 → k1 = logp − ref = 0.5, 0, −0.5; β = 0.1 →
    rewards −0.05, 0, 0.05 + score 2 on the last token. Row 1: 1 token, k1 = 1, reward −0.1 + (−1)."""
    logps = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, 9.0, 9.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-2.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards, kl = shape_rewards(torch.tensor([2.0, -1.0], dtype=F64), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [1.0, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.05], [-1.1, 0.0, 0.0]], dtype=F64))


def test_adjust_scores_order():
    """score 1, unfinished, 4 tokens: 1 − 0.5 (no EOS) − 0.1·4 = 0.1; clip 0.05 → 0.05."""
    s = adjust_scores(torch.tensor([1.0, 1.0]), torch.tensor([False, True]), torch.tensor([4, 4]),
                      missing_eos_penalty=0.5, length_penalty=0.1, reward_clip=0.05)
    torch.testing.assert_close(s, torch.tensor([0.05, 0.05]))
    s = adjust_scores(torch.tensor([1.0, 1.0]), torch.tensor([False, True]), torch.tensor([4, 4]),
                      missing_eos_penalty=0.5, length_penalty=0.1)
    torch.testing.assert_close(s, torch.tensor([0.1, 0.6]))


def test_adaptive_kl_controller_by_hand():
    """β 0.1, target 6, horizon 10000: KL 9 → e = min(0.5, 0.2) = 0.2; 256 samples → β·(1 + 0.2·0.0256) =
    0.1·1.00512; KL 3 → e = −0.5 → −0.2 → β·(1 − 0.00512). It moves towards the target, never past ±20%·n/h."""
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    c2 = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c2.update(3.0, 256) == pytest.approx(0.1 * (1 - 0.00512))
    c3 = AdaptiveKLController(1.0, 1.0)
    c3.load_state_dict(c.state_dict())
    assert c3.value == c.value and c3.target == 6.0


def test_adaptive_kl_controller_moves_both_ways_proportionally_then_clipped():
    """target 1, n/horizon = 1: KL 1.1 → e = 0.1, β·1.1; KL 0.95 → e = −0.05, β·0.95; KL 50 → e clipped to 0.2,
    β·1.2; KL 0 → e clipped to −0.2, β·0.8. KL above the target raises β, below lowers it."""
    for kl, factor in ((1.1, 1.1), (0.95, 0.95), (50.0, 1.2), (0.0, 0.8), (1.0, 1.0)):
        c = AdaptiveKLController(0.5, target=1.0, horizon=100)
        assert c.update(kl, 100) == pytest.approx(0.5 * factor), kl
    c = AdaptiveKLController(0.5, target=1.0, horizon=100)
    assert c.update(2.0, 10) == pytest.approx(0.5 * 1.02) and c.update(2.0, 10) == pytest.approx(0.5 * 1.02**2)


def test_rloo_leave_one_out_by_hand():
    """Group (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 → −3, −1.5, 4.5.
    Identity: A = K/(K−1)·(r − mean) = 1.5·(r − 3)."""
    a = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=F64), group_size=3)
    torch.testing.assert_close(a, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0], dtype=F64))


def test_grpo_group_normalised_by_hand():
    """Group (1, 3): mean 2, unbiased std √2 → ±1/√2 (eps 0); a constant group gives 0, not NaN."""
    a = grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0], dtype=F64), group_size=2, eps=0.0 + 1e-12)
    torch.testing.assert_close(a[:2], torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2)], dtype=F64), rtol=1e-9, atol=1e-9)
    assert a[2:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(grpo_advantages(torch.tensor([1.0, 3.0]), 2, scale=False), torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0]), 1)
