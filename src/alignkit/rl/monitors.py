"""The reward-hacking monitors of an online run and what they write into the run folder (SPEC §8).

Per iteration: the monitors of `metrics.jsonl` (length and its ratio to the first rollout's, which samples
the reference policy; reward–length correlation; distinct-2; repetition; ensemble spread), then the
detector (`alignkit.rl.detector`). At the flag: the policy is saved to `best/` and `hacking.json` records
the step and the reasons. On chosen iterations `samples.jsonl` gets eight samples and the tokens whose share
rose most since the first rollout. The state (first rollout's length and token shares, the detector's
history) travels in every checkpoint, so a resumed run monitors as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.rl.detector import (
    HackingDetector,
    distinct_2,
    pearson,
    repetition_rate,
    rising_tokens,
    token_frequencies,
)
from alignkit.rl.responses import RolloutView


class Monitors:
    """`save_best(path)` writes the policy of the moment (called once, at the flag). Under several processes
    every process monitors the whole rollout alike (`RolloutView`) and only the one that `writes` writes."""

    def __init__(self, detector: HackingDetector, tokenizer, save_best: Callable[[Path], None]):
        self.detector, self.tokenizer, self.save_best = detector, tokenizer, save_best
        self.writes = True
        self.first_length: float | None = None
        self.first_tokens: dict[int, float] = {}
        self.path = Path(".")

    def start(self, path: Path) -> None:
        """Write into run folder `path`. A killed run may have flagged after the checkpoint it resumes from:
        its best/ and hacking.json are removed, and written again when the detector flags again."""
        self.path = Path(path)
        if not self.detector.flagged and self.writes:
            shutil.rmtree(self.path / "best", ignore_errors=True)
            (self.path / "hacking.json").unlink(missing_ok=True)

    def measure(self, batch: RolloutView, scores: torch.Tensor, spread: torch.Tensor | None) -> dict:
        """This rollout's monitors (`scores`: the reward before shaping, (N,); `spread`: the ensemble's)."""
        lengths = batch.lengths.float()
        mean_len = float(lengths.mean())
        if self.first_length is None:  # the first rollout samples the reference policy: the baseline
            self.first_length = max(mean_len, 1e-6)
            self.first_tokens = token_frequencies(batch.ids)
        out = {"response_length": mean_len, "hacking/length_ratio": mean_len / self.first_length,
               "hacking/reward_length_corr": pearson(scores, lengths), "hacking/distinct_2": distinct_2(batch.ids),
               "hacking/repetition": repetition_rate(batch.ids)}
        if spread is not None:
            out["hacking/ensemble_std"] = float(spread.mean())
        return out

    def update(self, step: int, metrics: dict, heldout_scale: float | None = None) -> bool:
        """Feed the detector this iteration's `metrics` (adds `hacking/flag`); True when it flags now, after
        best/ and hacking.json are written."""
        was_flagged = self.detector.flagged
        self.detector.update(step, metrics, heldout_scale)
        metrics["hacking/flag"] = float(self.detector.flagged)
        if not self.detector.flagged or was_flagged:
            return False
        if not self.writes:
            return True
        self.save_best(self.path / "best")
        (self.path / "hacking.json").write_text(json.dumps(self.summary(), indent=1))
        print(f"reward hacking flagged at iteration {step}: {'; '.join(self.detector.reasons)}; the policy at the "
              f"flag is in {self.path / 'best'}", file=sys.stderr)
        return True

    def write_samples(self, step: int, batch: RolloutView, scores: torch.Tensor) -> None:
        """Append to samples.jsonl eight prompt/response/score samples and the tokens whose share rose most
        since the first rollout (what the policy learned to say more)."""
        if not self.writes:
            return
        samples = [{"prompt": p, "response": r, "score": float(s)}
                   for p, r, s in list(zip(batch.prompt_texts, batch.texts, scores))[:8]]
        learned = [{"token": self.tokenizer.decode([t]), "rise": round(r, 4)}
                   for t, r in rising_tokens(self.first_tokens, token_frequencies(batch.ids))]
        with open(self.path / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "samples": samples, "rising_tokens": learned}) + "\n")

    def summary(self) -> dict:
        d = self.detector
        return {"flagged": d.flagged, "flag_step": d.flag_step, "reasons": d.reasons, "fired": d.fired}

    def state_dict(self) -> dict:
        return {"first_length": self.first_length, "first_tokens": {str(t): f for t, f in self.first_tokens.items()},
                "detector": self.detector.state()}

    def load_state_dict(self, state: dict) -> None:
        self.first_length = state["first_length"]
        self.first_tokens = {int(t): f for t, f in state["first_tokens"].items()}
        self.detector.load_state(state["detector"])
