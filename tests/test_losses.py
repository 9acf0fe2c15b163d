"""alignkit.losses: hand-worked values (working in each docstring), identities and gradient checks.

Everything runs in float64, so tolerances are tight (rtol 1e-12).
"""

import math
import subprocess
import sys

import pytest
import torch

from alignkit.losses import (
    DPO_VARIANTS,
    KL_ESTIMATORS,
    bradley_terry_loss,
    dpo_implicit_rewards,
    dpo_loss,
    gae,
    kl_penalty,
    kto_loss,
    plackett_luce_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_token_loss,
)

F64 = torch.float64
LOG2 = math.log(2)


def t(*values, **kwargs):
    return torch.tensor(values, dtype=F64, **kwargs)


def close(actual, expected, rtol=1e-12, atol=1e-14):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected.expand_as(actual), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_hand_value():
    """r_c = 1, r_r = 0: −log σ(1) = log(1 + e⁻¹) = 0.31326168751822286.
    With a margin, r_c = 2, r_r = 0.5, m = 0.5: −log σ(1), the same number.
    r_c = r_r: −log σ(0) = log 2."""
    close(bradley_terry_loss(t(1.0), t(0.0)), 0.31326168751822286)
    close(bradley_terry_loss(t(2.0), t(0.5), margin=t(0.5)), 0.31326168751822286)
    close(bradley_terry_loss(t(3.0), t(3.0)), LOG2)


def test_bradley_terry_is_stable_for_large_gaps():
    """log(1 + e^(−x)) written naively overflows; −log σ(−1000) = 1000 and −log σ(1000) = e⁻¹⁰⁰⁰ ≈ 0."""
    loss = bradley_terry_loss(t(0.0, 1000.0), t(1000.0, 0.0))
    close(loss, t(1000.0, 0.0))


def test_bradley_terry_gradcheck():
    chosen = torch.randn(5, dtype=F64, requires_grad=True)
    rejected = torch.randn(5, dtype=F64, requires_grad=True)
    margin = torch.rand(5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(bradley_terry_loss, (chosen, rejected, margin))


# ---------------------------------------------------------------- Plackett–Luce


def test_plackett_luce_hand_value():
    """r = (2, 1, 0): lse(2,1,0) = 2 + log(1 + e⁻¹ + e⁻²) = 2.4076059644443806,
    lse(1,0) = 1 + log(1 + e⁻¹) = 1.3132616875182228, last term 0 − 0 = 0.
    loss = (2.4076… − 2) + (1.3132… − 1) = 0.7208676519626034."""
    close(plackett_luce_loss(t([2.0, 1.0, 0.0])), 0.7208676519626034)


def test_plackett_luce_k2_equals_bradley_terry():
    """K = 2: −[r₁ − lse(r₁, r₂)] = log(1 + e^(r₂ − r₁)) = −log σ(r₁ − r₂)."""
    rewards = torch.randn(8, 2, dtype=F64) * 3
    close(plackett_luce_loss(rewards), bradley_terry_loss(rewards[:, 0], rewards[:, 1]))


def test_plackett_luce_mask_equals_truncated_list_and_padding_cannot_leak():
    """Masked-out entries take no part: each row equals PL on its present prefix, even with NaN in the
    padding, and the padding gets exactly zero gradient."""
    torch.manual_seed(0)
    lengths = [5, 3, 2, 1]
    rewards = torch.randn(4, 5, dtype=F64)
    mask = torch.arange(5) < torch.tensor(lengths)[:, None]  # (4, 5)
    rewards = torch.where(mask, rewards, torch.nan).requires_grad_()
    loss = plackett_luce_loss(rewards, mask)
    for b, n in enumerate(lengths):
        close(loss[b], plackett_luce_loss(rewards[b : b + 1, :n].detach())[0])
    close(loss[3], 0.0)  # a single present item is picked with certainty
    loss.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    assert (rewards.grad[~mask] == 0).all()


def test_plackett_luce_ties_k2():
    """Both items tied (same group id): they share the denominator lse = log(e^r₁ + e^r₂), so
    loss = −[r₁ − lse] − [r₂ − lse]. With r = (0.3, −1.2): lse = 0.3 + log(1 + e^−1.5) = 0.5014132779827524,
    loss = 2·0.5014132779827524 − (0.3 − 1.2) = 1.9028265559655048."""
    rewards = t([0.3, -1.2])
    ties = torch.tensor([[0, 0]])
    lse = 0.3 + math.log1p(math.exp(-1.5))
    expected = -(0.3 - lse) - (-1.2 - lse)
    close(plackett_luce_loss(rewards, ties=ties), expected)
    close(plackett_luce_loss(rewards, ties=ties), 1.9028265559655048)


def test_plackett_luce_ties_hand_value_and_distinct_groups_equal_plain():
    """r = (2, 1, 0), groups (0, 0, 1): items 1 and 2 share lse(2,1,0) = 2.4076059644443806, item 3 alone
    gives 0: loss = 2·2.4076059644443806 − 3 = 1.8152119288887612. All-distinct groups = the plain loss."""
    rewards = t([2.0, 1.0, 0.0])
    close(plackett_luce_loss(rewards, ties=torch.tensor([[0, 0, 1]])), 1.8152119288887612)
    scores = torch.randn(3, 4, dtype=F64)
    distinct = torch.tensor([[0, 1, 2, 3], [0, 2, 5, 9], [3, 4, 5, 6]])
    close(plackett_luce_loss(scores, ties=distinct), plackett_luce_loss(scores))


def test_plackett_luce_ties_with_mask_equals_truncated():
    rewards = torch.randn(1, 4, dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    ties = torch.tensor([[0, 0, 1, 2]])
    close(plackett_luce_loss(rewards, mask, ties), plackett_luce_loss(rewards[:, :3], ties=ties[:, :3]))


def test_plackett_luce_gradcheck():
    rewards = torch.randn(3, 4, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
    ties = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 2], [0, 1, 2, 3]])
    assert torch.autograd.gradcheck(lambda r: plackett_luce_loss(r, mask), (rewards,))
    assert torch.autograd.gradcheck(lambda r: plackett_luce_loss(r, mask, ties), (rewards,))


# ---------------------------------------------------------------- DPO family


def logps_with_margin(h):
    """Four (B,) log-prob tensors π_c = h − 5, π_r = −7, ref_c = −5, ref_r = −7, so the DPO margin
    (π_c − ref_c) − (π_r − ref_r) is exactly h."""
    h = torch.as_tensor(h, dtype=F64)
    return h - 5.0, torch.full_like(h, -7.0), torch.full_like(h, -5.0), torch.full_like(h, -7.0)


def test_dpo_sigmoid_at_zero_margin_is_log2():
    """h = 0: −log σ(0) = log 2 for every β and every ε (cDPO: (1−ε)·log 2 + ε·log 2)."""
    for beta in (0.1, 1.0, 5.0):
        for eps in (0.0, 0.1, 0.3):
            close(dpo_loss(*logps_with_margin([0.0, 0.0]), beta=beta, label_smoothing=eps), LOG2)


def test_dpo_sigmoid_and_cdpo_hand_values():
    """β = 0.5, h = 1 → βh = 0.5. sigmoid: log(1 + e^−0.5) = 0.4740769841801067.
    cDPO ε = 0.1: 0.9·log(1 + e^−0.5) + 0.1·log(1 + e^0.5); since log(1+e^x) − log(1+e^−x) = x,
    = 0.4740769841801067 + 0.1·0.5 = 0.5240769841801067."""
    close(dpo_loss(*logps_with_margin([1.0]), beta=0.5), 0.4740769841801067)
    close(dpo_loss(*logps_with_margin([1.0]), beta=0.5, label_smoothing=0.1), 0.5240769841801067)


def test_dpo_variants_with_zero_smoothing_equal_sigmoid():
    """cDPO with ε = 0, robust with ε = 0, and R-DPO with α = 0 are all plain DPO."""
    h = torch.randn(6, dtype=F64) * 4
    lengths = torch.tensor([3, 9, 1, 20, 7, 7])
    base = dpo_loss(*logps_with_margin(h), beta=0.3)
    close(dpo_loss(*logps_with_margin(h), beta=0.3, label_smoothing=0.0), base)
    close(dpo_loss(*logps_with_margin(h), beta=0.3, variant="robust"), base)
    rdpo = dpo_loss(*logps_with_margin(h), beta=0.3, variant="rdpo", alpha=0.0,
                    chosen_lengths=lengths, rejected_lengths=lengths.flip(0))
    close(rdpo, base)


def test_dpo_robust_hand_value():
    """β = 0.5, h = 1, ε = 0.1: [0.9·log(1+e^−0.5) − 0.1·log(1+e^0.5)] / 0.8
    = (0.42666928576209603 − 0.09740769841801067) / 0.8 = 0.41157698418010663."""
    loss = dpo_loss(*logps_with_margin([1.0]), beta=0.5, variant="robust", label_smoothing=0.1)
    close(loss, 0.41157698418010663)


def test_dpo_hinge_hand_values_and_zero_beyond_margin():
    """β = 0.5, h = (1, 2, 4, −2) → βh = (0.5, 1, 2, −1) → max(0, 1 − βh) = (0.5, 0, 0, 2);
    once βh ≥ 1 the loss and its gradient are 0."""
    pc, pr, rc, rr = logps_with_margin([1.0, 2.0, 4.0, -2.0])
    pc.requires_grad_()
    loss = dpo_loss(pc, pr, rc, rr, beta=0.5, variant="hinge")
    close(loss, t(0.5, 0.0, 0.0, 2.0))
    loss.sum().backward()
    close(pc.grad, t(-0.5, 0.0, 0.0, -0.5))


def test_dpo_ipo_hand_value_and_minimum():
    """β = 0.25 → target 1/(2β) = 2. h = 3: (3 − 2)² = 1; h = 0: 4. At h = 2 the loss is 0 with zero
    gradient (the minimum), and h = 2 ± 0.1 both give 0.01."""
    close(dpo_loss(*logps_with_margin([3.0, 0.0, 1.9, 2.1]), beta=0.25, variant="ipo"), t(1.0, 4.0, 0.01, 0.01))
    pc, pr, rc, rr = logps_with_margin([2.0])
    pc.requires_grad_()
    loss = dpo_loss(pc, pr, rc, rr, beta=0.25, variant="ipo")
    close(loss, 0.0)
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    close(grad, 0.0)


def test_dpo_simpo_hand_value_and_reference_free():
    """π_c = −6 over 3 tokens = −2 per token; π_r = −12 over 4 = −3. β = 2, γ = 0.5:
    −log σ(2·(−2 + 3) − 0.5) = log(1 + e^−1.5) = 0.2014132779827524. The ref arguments are ignored."""
    kwargs = {"beta": 2.0, "gamma": 0.5, "variant": "simpo",
              "chosen_lengths": torch.tensor([3]), "rejected_lengths": torch.tensor([4])}
    loss = dpo_loss(t(-6.0), t(-12.0), None, None, **kwargs)
    close(loss, 0.2014132779827524)
    close(dpo_loss(t(-6.0), t(-12.0), t(-100.0), t(3.0), **kwargs), loss)


def test_dpo_rdpo_hand_value():
    """h = 1, β = 0.5, α = 0.1, |y_c| = 3, |y_r| = 8: βh + α(|y_c| − |y_r|) = 0.5 − 0.5 = 0 → log 2."""
    loss = dpo_loss(*logps_with_margin([1.0]), beta=0.5, variant="rdpo", alpha=0.1,
                    chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([8]))
    close(loss, LOG2)


def _optimal_margin(variant, alpha, beta=0.1, p=0.8, long=30, short=10):
    """β·h* minimising the expected loss of one pair of responses, the long one (`long` tokens) preferred with
    probability p: p·ℓ(long ≻ short) + (1 − p)·ℓ(short ≻ long), h = log-ratio(long) − log-ratio(short)."""
    h = torch.zeros(1, dtype=F64, requires_grad=True)
    zero = torch.zeros(1, dtype=F64)
    lengths = torch.tensor([long]), torch.tensor([short])

    def expected_loss():
        kwargs = {"beta": beta, "variant": variant, "alpha": alpha}
        won = dpo_loss(h, zero, zero, zero, chosen_lengths=lengths[0], rejected_lengths=lengths[1], **kwargs)
        lost = dpo_loss(zero, h, zero, zero, chosen_lengths=lengths[1], rejected_lengths=lengths[0], **kwargs)
        return (p * won + (1 - p) * lost).sum()

    for _ in range(30):  # Newton's method: the expected loss is smooth and convex in h
        (grad,) = torch.autograd.grad(expected_loss(), h, create_graph=True)
        (curvature,) = torch.autograd.grad(grad.sum(), h)
        with torch.no_grad():
            h -= grad / curvature
    return beta * float(h.detach())


def test_rdpo_default_alpha_takes_length_out_of_the_implicit_reward():
    """The long response (30 tokens) beats the short one (10) with probability p = 0.8. DPO's optimum is
    βh* = logit 0.8 = log 4 = 1.3862943611198906; R-DPO's is βh* = logit p − αΔ with Δ = 20, so with the
    default α = 0.01 the long response's implicit-reward margin is 0.2 lower: length is taken out. (With α < 0,
    the old default, it would be 0.2 higher: length rewarded twice.)"""
    from dataclasses import fields

    from alignkit.config import DPOConfig

    alpha = next(f.default for f in fields(DPOConfig) if f.name == "rdpo_alpha")
    assert alpha > 0
    dpo = _optimal_margin("sigmoid", alpha)
    rdpo = _optimal_margin("rdpo", alpha)
    assert dpo == pytest.approx(math.log(4), abs=1e-8)
    assert rdpo == pytest.approx(math.log(4) - alpha * 20, abs=1e-8)
    assert rdpo < dpo
    # a shorter preferred response gets the length gap back: the same pair seen from the short side
    assert _optimal_margin("rdpo", alpha, long=10, short=30) == pytest.approx(math.log(4) + alpha * 20, abs=1e-8)


def test_dpo_errors():
    args = logps_with_margin([1.0])
    with pytest.raises(ValueError, match="hinge.*ipo.*rdpo.*robust.*sigmoid.*simpo"):
        dpo_loss(*args, variant="orpo")
    for variant in ("simpo", "rdpo"):
        with pytest.raises(ValueError, match="lengths"):
            dpo_loss(*args, variant=variant)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(args[0], args[1], None, None)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, variant="robust", label_smoothing=0.5)
    assert set(DPO_VARIANTS) == {"sigmoid", "robust", "hinge", "ipo", "simpo", "rdpo"}


def test_dpo_sigmoid_gradcheck():
    inputs = tuple(torch.randn(4, dtype=F64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.7, label_smoothing=0.1), inputs)


def test_dpo_implicit_rewards():
    """β(π − ref) = 0.1·(−3 + 5) = 0.2, detached."""
    policy = t(-3.0, requires_grad=True)
    rewards = dpo_implicit_rewards(policy, t(-5.0), beta=0.1)
    close(rewards, 0.2)
    assert not rewards.requires_grad


# ---------------------------------------------------------------- KTO


def test_kto_hand_values():
    """β = 0.1, kl_ref = 0.5 (z = 0.5).
    Desirable row: r = −10 + 12 = 2, w_D = 2: 2·(1 − σ(0.1·1.5)) = 2·σ(−0.15) = 0.9251403093125009.
    Undesirable row: r = −3, w_U = 0.5: 0.5·(1 − σ(0.1·3.5)) = 0.5·σ(−0.35) = 0.206691210541335."""
    loss = kto_loss(t(-10.0, -8.0), t(-12.0, -5.0), torch.tensor([True, False]), t(0.5),
                    beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    close(loss, t(0.9251403093125009, 0.206691210541335))


def test_kto_reference_point_has_no_gradient_and_is_clamped_at_zero():
    """z = max(kl_ref, 0) is detached: no gradient reaches kl_ref; a negative kl_ref acts as 0."""
    policy = torch.randn(4, dtype=F64, requires_grad=True)
    ref = torch.randn(4, dtype=F64)
    desirable = torch.tensor([True, False, True, False])
    kl_ref = t(0.3, requires_grad=True)
    loss = kto_loss(policy, ref, desirable, kl_ref)
    grad_policy, grad_kl = torch.autograd.grad(loss.sum(), [policy, kl_ref], allow_unused=True)
    assert grad_kl is None and torch.isfinite(grad_policy).all()
    close(kto_loss(policy, ref, desirable, t(-0.7)), kto_loss(policy, ref, desirable, t(0.0)))
    # per-row reference points broadcast the same way
    per_row = kto_loss(policy, ref, desirable, t(0.3, -1.0, 0.0, 2.0))
    close(per_row[1], kto_loss(policy, ref, desirable, t(0.0))[1])
    close(per_row[3], kto_loss(policy, ref, desirable, t(2.0))[3])


# ---------------------------------------------------------------- SFT


def test_sft_token_loss_hand_value_and_mask():
    """Two-token vocabulary, logits (0, log 3) → p = (1/4, 3/4). Target 1: −log(3/4) = 0.28768207245178085;
    target 0: log 4 = 1.3862943611198906. A masked-out position is 0 even when its log-prob is NaN."""
    token_logps = t([math.log(3 / 4), math.log(1 / 4), float("nan")]).unsqueeze(0)  # (1, 3)
    mask = torch.tensor([[True, True, False]])
    close(sft_token_loss(token_logps, mask), t([0.28768207245178085, 1.3862943611198906, 0.0]))


def test_sft_token_loss_through_sequence_logps_equals_cross_entropy():
    """The SFT loss read from the one log-prob function equals torch's cross-entropy on the same logits."""
    from types import SimpleNamespace

    from alignkit.data.collate import Tokenized, collate_sequences
    from alignkit.models.logps import sequence_logps

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7, dtype=F64)
    model = lambda **kw: SimpleNamespace(logits=logits)
    batch = collate_sequences([Tokenized([1, 2, 3, 4, 5], [False, False, True, True, True]),
                               Tokenized([1, 6, 2, 0, 0][:3], [False, True, True])], pad_id=0)
    lp = sequence_logps(model, batch)
    loss = sft_token_loss(lp.token_logps, lp.mask)
    targets = batch.input_ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), targets.reshape(-1),
                                           reduction="none").view(2, 4)
    close(loss, torch.where(lp.mask, ce, 0.0))
    assert lp.mask.tolist() == [[False, True, True, True], [True, True, False, False]]


def test_kl_penalty_hand_values():
    """logp = log ½, ref = log ¼ → u = ref − logp = −log 2.
    k1 = log 2 = 0.6931471805599453; k2 = (log 2)²/2 = 0.2402265069591007; k3 = ½ − 1 + log 2 = 0.1931471805599453."""
    logps, ref = t(math.log(0.5)), t(math.log(0.25))
    close(kl_penalty(logps, ref, "k1"), 0.6931471805599453)
    close(kl_penalty(logps, ref, "k2"), 0.2402265069591007)
    close(kl_penalty(logps, ref, "k3"), 0.1931471805599453)
    close(kl_penalty(logps, logps, "k3"), 0.0)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logps, ref, "k4")


def test_kl_k3_nonnegative():
    u = torch.linspace(-30, 5, 2001, dtype=F64)
    assert (kl_penalty(torch.zeros_like(u), u, "k3") >= 0).all()
    assert (kl_penalty(torch.zeros_like(u), u, "k2") >= 0).all()


def test_kl_k1_and_k3_unbiased_monte_carlo():
    """x ~ p over 6 categories; E_p[k1] = E_p[k3] = KL(p‖q). The tolerance is 5 standard errors, from the
    estimators' exact variances under p and the sample size N."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, generator=gen, dtype=F64).softmax(0)
    q = torch.randn(6, generator=gen, dtype=F64).softmax(0)
    kl = (p * (p / q).log()).sum()
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=gen)
    logps, ref = p.log()[x], q.log()[x]
    for name in ("k1", "k3"):
        per_category = KL_ESTIMATORS[name](q.log() - p.log())  # (6,) estimator value at each x
        std = ((p * (per_category - kl) ** 2).sum()).sqrt()
        estimate = kl_penalty(logps, ref, name).mean()
        assert abs(estimate - kl) < 5 * std / math.sqrt(n), name


# ---------------------------------------------------------------- GAE


def gae_oracle(rewards, values, lengths, gamma, lam):
    """Plain double loop, one row at a time, over Python floats."""
    B, T = len(rewards), len(rewards[0])
    advantages = [[0.0] * T for _ in range(B)]
    for b in range(B):
        running = 0.0
        for t_ in reversed(range(lengths[b])):
            next_value = values[b][t_ + 1] if t_ + 1 < lengths[b] else 0.0
            delta = rewards[b][t_] + gamma * next_value - values[b][t_]
            running = delta + gamma * lam * running
            advantages[b][t_] = running
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_loop_oracle_on_ragged_rows(gamma, lam):
    """Ragged rows (lengths 7, 4, 1, 0), random rewards and values, NaN in the padding."""
    torch.manual_seed(2)
    lengths = [7, 4, 1, 0]
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]  # (4, 7)
    rewards = torch.randn(4, 7, dtype=F64)
    values = torch.randn(4, 7, dtype=F64)
    padded_values = torch.where(mask, values, torch.nan).requires_grad_()
    advantages, returns = gae(torch.where(mask, rewards, torch.nan), padded_values, mask, gamma, lam)
    expected = torch.tensor(gae_oracle(rewards.tolist(), values.tolist(), lengths, gamma, lam), dtype=F64)
    close(advantages, expected)
    close(returns, torch.where(mask, expected + values, 0.0))
    (advantages.sum() + returns.sum()).backward()
    assert torch.isfinite(padded_values.grad).all() and (padded_values.grad[~mask] == 0).all()


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    """γ = λ = 1: the value terms telescope, A_t = Σ_{k≥t} r_k − V_t. E.g. r = (0, 0, 1), V = ½: A = (½, ½, ½)."""
    advantages, returns = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), torch.ones(1, 3, dtype=torch.bool),
                              gamma=1.0, lam=1.0)
    close(advantages, t([0.5, 0.5, 0.5]))
    close(returns, t([1.0, 1.0, 1.0]))
    rewards, values = torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64)
    mask = torch.arange(6) < torch.tensor([6, 3, 5])[:, None]
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    close(advantages, torch.where(mask, to_go - values, 0.0))


def test_ppo_policy_loss_hand_values_and_gradients():
    """ε = 0.2. ρ = 1.5, A = +1: max(−1.5, −1.2) = −1.2 (clipped: no gradient); ρ = 1.5, A = −1: max(1.5, 1.2)
    = 1.5 (the pessimistic side keeps the gradient −A·ρ = 1.5); ρ = 0.5, A = +1: max(−0.5, −0.8) = −0.5
    (gradient −0.5); ρ = 0.5, A = −1: max(0.5, 0.8) = 0.8 (clipped); ρ = 1.1, A = 2: −2.2 inside the range
    (gradient −2.2). d ρ / d logps = ρ."""
    ratios = t(1.5, 1.5, 0.5, 0.5, 1.1)
    old = t(-1.0, -2.0, -0.5, -3.0, -1.5)
    logps = (old + ratios.log()).requires_grad_(True)
    loss, clipped = ppo_policy_loss(logps, old, t(1.0, -1.0, 1.0, -1.0, 2.0), clip_range=0.2)
    close(loss, t(-1.2, 1.5, -0.5, 0.8, -2.2))
    assert clipped.tolist() == [True, True, True, True, False]
    loss.sum().backward()
    close(logps.grad, t(0.0, 1.5, -0.5, 0.0, -2.2))


def test_ppo_value_loss_hand_values():
    """ε_v = 0.2. V = 1, V_old = 0.5, R = 1: V_clip = 0.7, ½·max(0, 0.09) = 0.045; V = 0.6, V_old = 0.5, R = 0:
    inside the range, ½·0.36 = 0.18; V = 0, V_old = 0.5, R = 1: V_clip = 0.3, ½·max(1, 0.49) = 0.5."""
    loss = ppo_value_loss(t(1.0, 0.6, 0.0), t(0.5, 0.5, 0.5), t(1.0, 0.0, 1.0), clip_range=0.2)
    close(loss, t(0.045, 0.18, 0.5))


def test_losses_import_only_torch():
    """losses/ stays free of heavy dependencies: a fresh interpreter importing it loads none of them."""
    code = "import sys, alignkit.losses; print(sorted({m for m in ('transformers', 'peft', 'accelerate', "
    code += "'datasets') if m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
