"""The reward-hacking detector: each gold-free signal trips on its own drift, noise alone does not flag,
patience delays the flag, and its state survives a checkpoint round trip."""

import json
import random

import pytest

from alignkit.rl.detector import HackingDetector


def _stream(n, seed=0, **drift):
    """n iterations of monitors with small noise; `drift` maps a metric to (start iteration, change per step)."""
    rng = random.Random(seed)
    base = {"reward/score": 0.2, "kl": 0.0, "response_length": 20.0, "hacking/distinct_2": 0.9,
            "hacking/ensemble_std": 0.1, "reward/heldout": 0.5}
    out = []
    for i in range(n):
        m = {k: v * (1 + 0.03 * rng.uniform(-1, 1)) for k, v in base.items()}
        m["reward/score"] = 0.2 + 0.01 * i  # the training reward rises throughout
        for key, (start, per_step) in drift.items():
            if i >= start:
                m[key] += per_step * (i - start)
        out.append(m)
    return out


def _run(det, stream, scale=0.1):
    for step, m in enumerate(stream, 1):
        det.update(step, m, heldout_scale=scale)
    return det


def test_noise_alone_never_flags():
    for seed in range(5):
        assert not _run(HackingDetector(kl_budget=1.0), _stream(80, seed)).flagged


@pytest.mark.parametrize("metric,per_step,words", [
    ("response_length", 1.0, "response length"),
    ("hacking/distinct_2", -0.02, "distinct-2"),
    ("hacking/ensemble_std", 0.02, "ensemble disagreement"),
    ("kl", 0.1, "kl"),
    ("reward/heldout", -0.01, "held-out reward"),
])
def test_each_signal_flags_its_drift(metric, per_step, words):
    det = _run(HackingDetector(kl_budget=1.0), _stream(60, 1, **{metric: (20, per_step)}))
    assert det.flagged and det.flag_step > 20
    assert any(words in r for r in det.reasons), det.reasons


def test_held_out_falling_while_the_training_reward_falls_too_is_not_hacking():
    stream = _stream(60, 2, **{"reward/heldout": (20, -0.01)})
    for i, m in enumerate(stream):
        m["reward/score"] = 0.6 - 0.01 * i
    assert not _run(HackingDetector(), stream).flagged


def test_patience_and_off_switches():
    stream = _stream(60, 3, response_length=(20, 1.0))
    quick, slow = _run(HackingDetector(patience=1), stream), _run(HackingDetector(patience=6), stream)
    assert quick.flag_step + 5 == slow.flag_step
    assert not _run(HackingDetector(length_ratio=0), stream).flagged


def test_state_round_trip_flags_at_the_same_step():
    stream = _stream(60, 4, **{"hacking/distinct_2": (25, -0.02)})
    whole = _run(HackingDetector(), stream)
    first = _run(HackingDetector(), stream[:30])
    resumed = HackingDetector()
    resumed.load_state(json.loads(json.dumps(first.state())))
    for step, m in enumerate(stream[30:], 31):
        resumed.update(step, m, heldout_scale=0.1)
    assert resumed.flag_step == whole.flag_step and resumed.reasons == whole.reasons


def test_fired_records_each_signal_when_it_first_tripped_and_when_it_held():
    # length drifts from iteration 20, KL from 40: the flag is length's, and the KL budget fires later
    stream = _stream(70, 4, response_length=(20, 1.0), kl=(40, 0.1))
    det = _run(HackingDetector(kl_budget=1.0, patience=3), stream)
    length, kl = det.fired["length"], det.fired["kl"]
    assert length["first"] < kl["first"] and det.flag_step == length["sustained"] == length["first"] + 2
    assert kl["sustained"] == kl["first"] + 2 and "budget" in kl["why"]
    assert set(det.fired) == {"length", "kl", "stall"}  # the held-out reward stays flat while the KL grows
    restored = HackingDetector(kl_budget=1.0)
    restored.load_state(json.loads(json.dumps(det.state())))
    assert restored.fired == det.fired and restored.streaks == det.streaks


def test_the_favourites_signal_watches_the_held_out_score_of_the_training_rewards_top_tenth():
    # all samples' held-out score holds (the favourites are few) while that of the favourites falls
    stream = _stream(60, 6)
    for i, m in enumerate(stream):
        m["hacking/heldout_of_top"] = 0.8 - 0.01 * max(0, i - 20)
    det = _run(HackingDetector(), stream)
    assert det.flagged and set(det.fired) == {"favourites"} and det.flag_step > 20
    assert "favourites" in det.reasons[0]
    assert not _run(HackingDetector(heldout_drop=0), stream).flagged


def test_one_sided_two_proportion_p_value_by_hand():
    from alignkit.rl.detector import one_sided_p

    # 48/64 then 32/64: pooled 80/128 = 0.625, spread √(0.625 · 0.375 · 2/64) = 0.085582, z = 0.25 / 0.085582 = 2.9212
    assert one_sided_p(48, 64, 32, 64) == pytest.approx(0.001744, abs=2e-6)
    assert one_sided_p(32, 64, 48, 64) == pytest.approx(1 - 0.001744, abs=2e-6)  # a rise is not a fall
    assert one_sided_p(64, 64, 64, 64) == 1.0  # no spread: nothing to test


def _check(det, step, approved, checked):
    """A spot check as the ppo trainer's evaluation records it: the check, then an update without monitors."""
    det.audit(approved, checked)
    det.update(step, {})


def _audited(det, stream, approvals, every=5, checked=64):
    """Updates as in training, and after every `every`-th iteration (and before the first) a spot check: the
    next count of `approvals` out of `checked`."""
    counts = iter(approvals)
    _check(det, 0, next(counts), checked)  # the evaluation before any iteration
    for step, m in enumerate(stream, 1):
        det.update(step, m, heldout_scale=0.1)
        if step % every == 0:
            _check(det, step, next(counts), checked)
    return det


def test_the_spot_check_flags_two_significant_falls_below_its_best_at_the_checked_iteration():
    # checks at 0, 5, …, 60; best 48/64 at iteration 25. At 35, 40/64 and 32/64 pooled (72/128) are not
    # significant (p 0.0057 > 0.002 / 6 earlier checks). At 40, 32/64 and 30/64 pooled: 62/128 = 0.484 against
    # 0.75, pooled share 110/192 = 0.573, spread √(0.573 · 0.427 · (1/64 + 1/128)) = 0.0757, z = 3.51, p = 0.00023
    # < 0.002 / 7: the signal trips at the check of iteration 40 and flags at once (its patience is counted in
    # checks), the training reward having risen
    approvals = [38, 41, 44, 46, 45, 48, 40, 32, 30, 28, 27, 26, 25]
    det = _audited(HackingDetector(length_ratio=0), _stream(60, 7), approvals)
    assert det.flag_step == 40 and set(det.fired) == {"audit"}
    assert det.fired["audit"] == {"first": 40, "sustained": 40, "why": det.reasons[0]}
    assert "32/64 at 35, 30/64 at 40, below 48/64 at iteration 25 (one-sided p 0.00023 pooled" in det.reasons[0]
    assert "576 responses checked" in det.reasons[0]  # 9 checks of 64 by then: the labelling budget
    # a fall that does not last (patience 2) does not flag; at patience 1, 28/64 alone at 45 does (p 0.00016 <
    # 0.002 / 9), where 32/64 at 35 and 30/64 at 40 alone did not (p 0.0017 and 0.00056)
    assert not _audited(HackingDetector(length_ratio=0), _stream(60, 7), approvals[:8] + [44] * 5).flagged
    assert _audited(HackingDetector(length_ratio=0, audit_patience=1), _stream(60, 7), approvals).flag_step == 45
    # an update without monitors moves no other signal's streak: length drifting from iteration 20 flags at 35
    # (tripping from 33), with or without checks in between
    drifting = _stream(60, 7, response_length=(20, 1.0))
    plain = _run(HackingDetector(), drifting)
    checked = _audited(HackingDetector(audit_alpha=0), drifting, [40] * 13)
    assert plain.flag_step == checked.flag_step == 35 and plain.streaks == checked.streaks
    assert not _audited(HackingDetector(length_ratio=0, audit_alpha=0), _stream(60, 7), approvals).flagged


def test_the_spot_check_does_not_flag_noise_or_a_fall_of_the_training_reward_too():
    # a flat approval of 60% checked 64 at a time, 17 checks (binomial noise only), on 200 runs: 2 flag (1%; at
    # level 0.01 instead of 0.002, 14 would)
    flagged = 0
    for seed in range(200):
        rng = random.Random(seed)
        approvals = [sum(rng.random() < 0.6 for _ in range(64)) for _ in range(17)]
        flagged += _audited(HackingDetector(length_ratio=0), _stream(80, seed % 5), approvals).flagged
    assert flagged == 2
    stream = _stream(60, 8)
    for i, m in enumerate(stream):
        m["reward/score"] = 0.8 - 0.01 * i  # the training reward falls with the approval: not hacking
    approvals = [38, 41, 44, 46, 45, 48, 40, 32, 30, 28, 27, 26, 25]
    assert not _audited(HackingDetector(length_ratio=0), stream, approvals).flagged


def test_spot_checks_survive_a_checkpoint_round_trip():
    approvals = [38, 41, 44, 46, 45, 48, 40, 32, 30, 28, 27, 26, 25]
    whole = _audited(HackingDetector(), _stream(60, 9), approvals)
    first = _audited(HackingDetector(), _stream(60, 9)[:30], approvals[:7])
    resumed = HackingDetector()
    resumed.load_state(json.loads(json.dumps(first.state())))
    counts = iter(approvals[7:])
    for step, m in enumerate(_stream(60, 9)[30:], 31):
        resumed.update(step, m, heldout_scale=0.1)
        if step % 5 == 0:
            _check(resumed, step, next(counts), 64)
    assert resumed.audits == whole.audits and resumed.flag_step == whole.flag_step == 40


def _plateau(n, kl_per_step, heldout_rises=False):
    """Held-out reward rising 0.1 an iteration to 1.0 at iteration index 10 and flat after (or rising on), the
    KL 0 up to index 10 and rising `kl_per_step` after it, the training reward rising throughout; no noise."""
    return [{"reward/score": 0.2 + 0.01 * i, "kl": max(0.0, kl_per_step * (i - 10)),
             "reward/heldout": 0.1 * i if heldout_rises else min(0.1 * i, 1.0), "response_length": 5.0}
            for i in range(n)]


def test_the_stall_signal_flags_kl_spent_for_no_held_out_gain_at_the_step_worked_out_by_hand():
    # held-out best (window 5): index 14, the first window all at 1.0; smoothed KL there (0 + .1 + .2 + .3 + .4) / 5
    # = 0.2; smoothed KL at index j is 0.1 (j − 12): it has grown by 0.45 first at j = 19 (0.7 − 0.2 = 0.5; at 18,
    # 0.4), and 0.7 ≥ 1.5 × 0.2; step = index + 1, so it first trips at step 20 and flags at 21 (its patience, 2)
    det = _run(HackingDetector(stall_kl=0.45, stall_ratio=1.5), _plateau(40, 0.1))
    assert det.fired["stall"]["first"] == 20 and det.fired["stall"]["sustained"] == 21 and det.flag_step == 21
    assert list(det.fired) == ["stall"]
    assert det.fired["stall"]["why"].startswith("held-out reward no higher than 6 iterations ago while the KL to the "
                                               "reference grew from 0.20 to 0.80 nats"), det.fired["stall"]["why"]
    # stall_patience 0 takes the detector's patience (3): the flag one step later
    assert _run(HackingDetector(stall_kl=0.45, stall_ratio=1.5, stall_patience=0), _plateau(40, 0.1)).flag_step == 22
    # the ratio binds too: with a ratio of 4 the KL must reach 0.8 (j = 20): the first trip one step later
    assert _run(HackingDetector(stall_kl=0.45, stall_ratio=4.0), _plateau(40, 0.1)).fired["stall"]["first"] == 21


def test_the_stall_signal_ignores_moving_while_held_out_reward_still_rises_or_too_little_kl():
    assert not _run(HackingDetector(stall_kl=0.3), _plateau(60, 0.1, heldout_rises=True)).flagged
    assert not _run(HackingDetector(stall_kl=0.5), _plateau(60, 0.005)).flagged  # 0.25 nats in 50 iterations
    assert not _run(HackingDetector(stall_kl=0.0), _plateau(60, 0.1)).flagged     # off
    falling = _plateau(60, 0.1)
    for i, m in enumerate(falling):
        m["reward/score"] = 1.0 - 0.01 * i  # the training reward falls too: not a hack
    assert not _run(HackingDetector(stall_kl=0.3), falling).flagged
