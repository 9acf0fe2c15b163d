"""Reward-hacking monitors and the detector (SPEC §8), which flags over-optimisation from signals a user has
without a gold reward.

Signals, each on a moving average of the last `window` iterations and compared with its own baseline (the
average of the first `window` iterations), so that the noise of one rollout cannot decide:

  heldout    reward models never trained on disagree with the training reward: their score has fallen by
             more than `heldout_drop` × (its spread over the first rollout's samples) below its best, while
             the training score is higher than it was at that best
  favourites the same test on the held-out score of the training reward's top tenth of each rollout
             (`hacking/heldout_of_top`): the answers the policy is moving towards, where a hack shows first
  stall      the policy keeps moving while held-out reward models see nothing gained: the moving-average KL to the
             reference grew by at least `stall_kl` nats and to at least `stall_ratio` × its value at the held-out
             score's best, while the training reward rose — KL spent on what only the training reward values (the
             held-out score need not fall: reward models trained on the same kind of labels share the proxy's
             blind spots, so the first gold lost is often invisible to them, but the distance travelled is not)
  ensemble   the training ensemble's disagreement (`hacking/ensemble_std`) rose above `ensemble_ratio` × baseline
  length     mean response length left [baseline / length_ratio, baseline × length_ratio]
  repetition distinct-2 fell below `distinct_ratio` × baseline
  kl         the mean sequence KL to the reference passed `kl_budget` (nats; 0 = no budget)
  audit      a spot check by people (`audit`: so many of a sample of responses approved, at each evaluation) fell
             significantly below its best: the last `audit_patience` checks are each below the best earlier check
             and, pooled, significantly so (one-sided two-proportion z-test at `audit_alpha` / the number of
             earlier checks), while the training reward's average is higher than at that best check. Its patience
             is counted in checks, so it raises the flag at once, at the iteration whose policy was checked.

A signal that trips on `patience` consecutive iterations (`stall_patience` for the stall) raises the flag (once;
`flag_step`). `fired` records, for
each signal, the first iteration it tripped on and the first it had tripped on `patience` iterations in a row
(a backstop such as the KL budget may fire after the signal that raised the flag: `fired` says which came first). The run then
keeps the policy of that moment as `best/` and, with `stop_on_hacking`, stops. Thresholds of 0 turn a
signal off. The state is plain numbers, stored with each checkpoint, so a resumed run flags where an
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch


def distinct_2(responses: list[list[int]]) -> float:
    """Distinct bigrams / bigrams over a batch of token lists (Li et al. 2016): falls as responses repeat."""
    bigrams = [tuple(r[i:i + 2]) for r in responses for i in range(len(r) - 1)]
    return len(set(bigrams)) / max(1, len(bigrams))


def repetition_rate(responses: list[list[int]]) -> float:
    """Share of response tokens that repeat an earlier token of the same response (0 = none repeats)."""
    tokens = sum(len(r) for r in responses)
    return sum(len(r) - len(set(r)) for r in responses) / max(1, tokens)


def token_frequencies(responses: list[list[int]]) -> dict[int, float]:
    """Each token's share of all response tokens."""
    counts: dict[int, int] = {}
    for r in responses:
        for token in r:
            counts[token] = counts.get(token, 0) + 1
    total = max(1, sum(counts.values()))
    return {token: n / total for token, n in counts.items()}


def rising_tokens(start: dict, now: dict, k: int = 10) -> list[tuple[int, float]]:
    """The k tokens whose share of responses rose most since `start` (the first rollout, i.e. the reference
    policy): "what the policy learned to say more". (token, rise) pairs, largest rise first."""
    rise = {t: f - start.get(t, 0.0) for t, f in now.items()}
    return sorted(((t, r) for t, r in rise.items() if r > 0), key=lambda x: -x[1])[:k]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation (0 when either side is constant): reward vs length, the classic hacking signal."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else 0.0



def one_sided_p(a: int, n: int, b: int, m: int) -> float:
    """p-value of the one-sided two-proportion z-test (pooled) of "b/m is no lower than a/n": small when the second
    share is significantly below the first (1 when it is not below at all)."""
    pooled = (a + b) / (n + m)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m))
    if spread == 0:
        return 1.0
    return 1 - NormalDist().cdf((a / n - b / m) / spread)


@dataclass
class HackingDetector:
    kl_budget: float = 0.0
    length_ratio: float = 1.5
    distinct_ratio: float = 0.7
    ensemble_ratio: float = 2.0
    heldout_drop: float = 0.5
    stall_kl: float = 0.5
    stall_ratio: float = 1.5
    stall_patience: int = 2                      # the stall reads two smooth moving averages: less noise to wait out
    window: int = 5
    patience: int = 3
    audit_alpha: float = 0.002                   # one-sided level of the spot check's test (Bonferroni-corrected); 0 = off
    audit_patience: int = 2                      # consecutive checks significantly below the best
    history: dict = field(default_factory=dict)   # metric -> values, one per iteration
    streak: int = 0
    flag_step: int | None = None
    reasons: list = field(default_factory=list)  # why it flagged
    heldout_scale: float | None = None           # spread of the held-out scores over the first rollout's samples
    fired: dict = field(default_factory=dict)    # signal -> {"first": step, "sustained": step | None, "why": text}
    streaks: dict = field(default_factory=dict)  # signal -> consecutive iterations tripping now
    audits: list = field(default_factory=list)   # spot checks: [step, approved, checked, iterations seen then]
    last_step: int = 0                           # the latest iteration `update` saw

    TRACKED = ("kl", "response_length", "hacking/distinct_2", "hacking/ensemble_std", "reward/score",
               "reward/heldout", "hacking/heldout_of_top")

    @property
    def flagged(self) -> bool:
        return self.flag_step is not None

    def _smoothed(self, key: str, end: int | None = None) -> float:
        values = self.history[key][:end] if end is not None else self.history[key]
        recent = values[-self.window:]
        return sum(recent) / len(recent)

    def _moving(self, key: str) -> list[float]:
        """The moving average of `key` ending at every iteration: `_smoothed(key, i + 1)` for each i, bit for bit."""
        values, w = self.history[key], self.window
        return [sum(values[max(0, i + 1 - w):i + 1]) / min(i + 1, w) for i in range(len(values))]

    def _baseline(self, key: str) -> float:
        first = self.history[key][:self.window]
        return sum(first) / len(first)

    def signals(self) -> list[str]:
        """The signals tripping now, as sentences (only `audit` before 2 × `window` iterations: no baseline yet)."""
        return list(self.tripping().values())

    def tripping(self) -> dict[str, str]:
        """The signals tripping now: name (kl, length, repetition, ensemble, heldout, stall, favourites, audit) -> why."""
        h = self.history
        out = {}
        if (why := self._audit_fell()) is not None:
            out["audit"] = why
        if len(h.get("reward/score", [])) < 2 * self.window:
            return out
        if self.kl_budget > 0 and "kl" in h and self._smoothed("kl") > self.kl_budget:
            out["kl"] = f"kl {self._smoothed('kl'):.3f} over the budget {self.kl_budget:g}"
        if self.length_ratio > 0 and "response_length" in h:
            base = max(self._baseline("response_length"), 1e-6)
            ratio = self._smoothed("response_length") / base
            if ratio > self.length_ratio or ratio < 1 / self.length_ratio:
                out["length"] = f"response length at {ratio:.2f}x its start"
        if self.distinct_ratio > 0 and "hacking/distinct_2" in h:
            base = self._baseline("hacking/distinct_2")
            if base > 0 and self._smoothed("hacking/distinct_2") < self.distinct_ratio * base:
                out["repetition"] = (f"distinct-2 at {self._smoothed('hacking/distinct_2') / base:.2f}x its start "
                                     "(repetition)")
        if self.ensemble_ratio > 0 and "hacking/ensemble_std" in h:
            base = max(self._baseline("hacking/ensemble_std"), 1e-6)
            if self._smoothed("hacking/ensemble_std") > self.ensemble_ratio * base:
                out["ensemble"] = f"ensemble disagreement at {self._smoothed('hacking/ensemble_std') / base:.2f}x its start"
        if self.heldout_drop > 0 and "reward/heldout" in h:
            _, fell = self._fall("reward/heldout")
            if fell is not None:
                out["heldout"] = f"held-out reward fell {fell:.2f} spreads below its best while the training reward rose"
        if self.stall_kl > 0 and "reward/heldout" in h and "kl" in h:
            if (why := self._stalled()) is not None:
                out["stall"] = why
        if self.heldout_drop > 0 and "hacking/heldout_of_top" in h:
            _, fell = self._fall("hacking/heldout_of_top")
            if fell is not None:
                out["favourites"] = (f"held-out reward of the training reward's favourites fell {fell:.2f} spreads "
                                     "below its best while the training reward rose")
        return out

    def audit(self, approved: int, checked: int) -> None:
        """Record a spot check by people at the latest iteration: `approved` of `checked` sampled responses judged
        good (e.g. an `eval_fn` measuring `audit_approved` and `audit_n` at each evaluation). The next `update`
        weighs it: the ppo trainer calls `update(step, {})` right after the check, so a flag is at the checked
        iteration."""
        if checked > 0:
            self.audits.append([self.last_step, int(approved), int(checked), len(self.history.get("reward/score", []))])

    def _audit_fell(self) -> str | None:
        """Why the `audit` signal trips now, or None: the last `audit_patience` checks are each below the best check
        before them and, pooled, significantly so (one-sided two-proportion z-test at `audit_alpha` divided by the
        number of earlier checks: Bonferroni, as the best of them is picked), and the training reward's moving
        average is higher now than at that best check."""
        k = self.audit_patience
        if self.audit_alpha <= 0 or len(self.audits) <= k or not self.history.get("reward/score"):
            return None
        earlier, recent = self.audits[:-k], self.audits[-k:]
        best = max(earlier, key=lambda a: a[1] / a[2])
        if any(a[1] / a[2] >= best[1] / best[2] for a in recent):
            return None
        approved, checked = sum(a[1] for a in recent), sum(a[2] for a in recent)
        p_value = one_sided_p(best[1], best[2], approved, checked)
        if p_value > self.audit_alpha / len(earlier):
            return None
        if self._smoothed("reward/score") <= self._smoothed("reward/score", max(best[3], 1)):
            return None
        shown = ", ".join(f"{a[1]}/{a[2]} at {a[0]}" for a in recent)
        return (f"spot check: approved {shown}, below {best[1]}/{best[2]} at iteration {best[0]} (one-sided p "
                f"{p_value:.2g} pooled, {len(earlier)} earlier checks) while the training reward rose; "
                f"{sum(a[2] for a in self.audits)} responses checked so far")

    def _stalled(self) -> str | None:
        """Why the `stall` signal trips now, or None (see the module's docstring)."""
        heldout, kl = self._moving("reward/heldout"), self._moving("kl")
        if len(heldout) != len(kl):
            return None
        best = max(range(self.window - 1, len(heldout)), key=heldout.__getitem__)
        then, now = kl[best], kl[-1]
        if now - then < self.stall_kl or now < self.stall_ratio * then:
            return None
        if self._smoothed("reward/score") <= self._smoothed("reward/score", best + 1):
            return None
        return (f"held-out reward no higher than {len(heldout) - 1 - best} iterations ago while the KL to the reference "
                f"grew from {then:.2f} to {now:.2f} nats and the training reward rose")

    def _fall(self, key: str) -> tuple[int, float | None]:
        """(index of the best moving average of `key`, how far the latest one fell below it in held-out spreads;
        None unless by more than `heldout_drop` while the training reward's average is higher than then)."""
        smoothed = self._moving(key)
        best = max(range(self.window - 1, len(smoothed)), key=smoothed.__getitem__)
        scale = max(self.heldout_scale or 0.0, 1e-6)
        fell = (smoothed[best] - smoothed[-1]) / scale
        rose = self._smoothed("reward/score") > self._smoothed("reward/score", best + 1)
        return best, fell if fell > self.heldout_drop and rose else None

    def update(self, step: int, metrics: dict, heldout_scale: float | None = None) -> list[str]:
        """Record one iteration's monitors; returns the signals tripping now. Sets `flag_step` at the flag. Called
        with no monitors (`{}`) after a spot check (`audit`), it only weighs that check, so that a check of
        iteration `step`'s policy flags at `step`."""
        fresh = any(key in metrics for key in self.TRACKED)
        for key in self.TRACKED:
            if key in metrics and metrics[key] is not None and metrics[key] == metrics[key]:  # skip None, NaN
                self.history.setdefault(key, []).append(float(metrics[key]))
        self.last_step = step
        if self.heldout_scale is None and heldout_scale is not None:
            self.heldout_scale = heldout_scale
        tripping = self.tripping()
        if fresh:
            self.streak = self.streak + 1 if tripping else 0
            self.streaks = {name: self.streaks.get(name, 0) + 1 for name in tripping}
            for name, why in tripping.items():
                seen = self.fired.setdefault(name, {"first": step, "sustained": None, "why": why})
                if seen["sustained"] is None and self.streaks[name] >= self._patience(name):
                    seen["sustained"], seen["why"] = step, why
        if "audit" in tripping:  # sustained over its own checks already: it flags at once
            seen = self.fired.setdefault("audit", {"first": step, "sustained": None, "why": tripping["audit"]})
            if seen["sustained"] is None:
                seen["sustained"], seen["why"] = step, tripping["audit"]
            if not self.flagged:
                self.flag_step, self.reasons = step, [tripping["audit"]]
        if fresh and not self.flagged and (self.streak >= self.patience or any(
                self.streaks[name] >= self._patience(name) for name in tripping)):
            self.flag_step, self.reasons = step, list(tripping.values())
        return list(tripping.values())

    def _patience(self, name: str) -> int:
        return self.stall_patience if name == "stall" and self.stall_patience > 0 else self.patience

    def state(self) -> dict:
        return {"history": self.history, "streak": self.streak, "flag_step": self.flag_step,
                "reasons": self.reasons, "heldout_scale": self.heldout_scale, "fired": self.fired,
                "streaks": self.streaks, "audits": self.audits, "last_step": self.last_step}

    def load_state(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.streak, self.flag_step = state["streak"], state["flag_step"]
        self.reasons, self.heldout_scale = list(state["reasons"]), state["heldout_scale"]
        self.fired = {k: dict(v) for k, v in state.get("fired", {}).items()}
        self.streaks = dict(state.get("streaks", {}))
        self.audits = [list(a) for a in state.get("audits", [])]
        self.last_step = state.get("last_step", 0)

    @classmethod
    def from_config(cls, cfg) -> HackingDetector:
        return cls(kl_budget=cfg.hacking_kl_budget, length_ratio=cfg.hacking_length_ratio,
                   distinct_ratio=cfg.hacking_distinct_ratio, ensemble_ratio=cfg.hacking_ensemble_ratio,
                   heldout_drop=cfg.hacking_heldout_drop, stall_kl=cfg.hacking_stall_kl,
                   stall_ratio=cfg.hacking_stall_ratio, stall_patience=cfg.hacking_stall_patience,
                   window=cfg.hacking_window, patience=cfg.hacking_patience)
