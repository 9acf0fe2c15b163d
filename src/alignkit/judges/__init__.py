"""RLAIF judges (SPEC §9), built from a spec string wherever a judge is accepted:

- `rm:PATH[,PATH2…][#mean|min|uwo]` — a reward model, or an ensemble (mean by default, as in ppo);
- `lm:PATH` — a local causal LM asked the pairwise judging prompt, read from the log-probabilities of its
  verdict tokens, in both orders;
- `openai:URL#MODEL` — the same prompt over an OpenAI-compatible chat API (key from `OPENAI_API_KEY`);
- `python:module:function` — a rule reward f(prompts, responses) -> list[float].

`JudgeScorer(judge)` makes a judge that can score usable wherever an `alignkit.rewards.Scorer` is (direct
RLAIF: ppo's and bon's `--reward-judge`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.judges.base import (
    DEFAULT_TEMPLATE,
    PLACEHOLDERS,
    BaseJudge,
    Judge,
    JudgeStats,
    Verdict,
    check_template,
    judging_prompt,
)

__all__ = ["DEFAULT_TEMPLATE", "PLACEHOLDERS", "BaseJudge", "Judge", "JudgeScorer", "JudgeStats", "Verdict",
           "build_judge", "judging_prompt", "read_principles", "read_template"]

KINDS = ("rm", "lm", "openai", "python")


def build_judge(spec: str, *, trust_remote_code: bool = False, principles: list[str] | None = None,
                template: str | None = None, cache_dir=None, dtype: str = "auto", **options) -> Judge:
    """The judge a spec string names (see the module doc). `principles` and `template` apply to the lm and
    openai judges; `cache_dir` holds the openai judge's reply cache. `options` go to the judge's class (e.g.
    `batch_size`, `concurrency`, `retries`, `backoff`, `timeout`)."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or not rest:
        raise UserError(f'judge {spec!r}: expected one of {", ".join(k + ":..." for k in KINDS)}')
    if template is not None:
        check_template(template)
    if (principles or template) and kind in ("rm", "python"):
        raise UserError(f"judge {spec!r}: principles and a judging template apply to lm: and openai: judges only")
    if kind == "rm":
        from alignkit.judges.local import RewardModelJudge

        paths, _, ensemble = rest.partition("#")
        if ensemble not in ("", "mean", "min", "uwo"):
            raise UserError(f"judge {spec!r}: the ensemble after # must be mean, min or uwo")
        return RewardModelJudge([p for p in paths.split(",") if p], ensemble=ensemble or "mean", dtype=dtype,
                                trust_remote_code=trust_remote_code, **options)
    if kind == "lm":
        from alignkit.judges.local import LMJudge

        return LMJudge(rest, template=template, principles=principles, dtype=dtype,
                       trust_remote_code=trust_remote_code, **options)
    if kind == "openai":
        from alignkit.judges.api import OpenAIJudge

        url, _, model = rest.partition("#")
        return OpenAIJudge(url, model, template=template, principles=principles, cache_dir=cache_dir, **options)
    from alignkit.judges.local import RuleJudge

    return RuleJudge(spec)


def read_principles(path: str) -> list[str] | None:
    """`--principles FILE`: one principle a line (blank lines and lines starting with # skipped)."""
    if not path:
        return None
    lines = _read(path, "principles").splitlines()
    principles = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not principles:
        raise UserError(f"{path}: no principles in the file (one a line)")
    return principles


def read_template(path: str) -> str | None:
    """`--judge-template FILE`: a judging prompt with {question}, {answer_a}, {answer_b} and optionally
    {principles}."""
    return check_template(_read(path, "judge_template"), path) if path else None


def _read(path: str, field: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'field "{field}": cannot read {path} ({e.__class__.__name__})') from None


class JudgeScorer:
    """A judge that can score, called like `alignkit.rewards.Scorer`: (scores (N,), None)."""

    def __init__(self, judge: Judge):
        if not judge.can_score:
            raise UserError(f"{type(judge).__name__} compares pairs and cannot score one response; a reward "
                            "needs an rm: or python: judge")
        self.judge = judge

    def __call__(self, prompts: list, responses: list[str], finished: list[bool] | None = None,
                 sampled=None) -> tuple[torch.Tensor, None]:
        return torch.tensor(self.judge.score_batch(list(prompts), list(responses)), dtype=torch.float32), None
