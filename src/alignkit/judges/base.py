"""The judge protocol (SPEC §9), the verdict it returns, its counters, and the pairwise judging prompt.

A judge either *scores* one response (reward models, rules: `can_score`) and compares two by their scores, or
*compares* two responses directly (an LM or an API model given the MT-Bench "pair" prompt). A pairwise judge
is asked in both orders; a verdict that changes with the order is a tie (`flipped`), and the share of such
flips among comparisons asked in both orders is the judge's position-bias rate.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from alignkit.data.rows import Text, plain_text
from alignkit.errors import UserError

Prompt = Text  # a string, or a conversation (a list of {"role", "content"} messages), as in the data


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison of response 0 (first) with response 1 (second)."""

    winner: int | None        # 0 = the first response, 1 = the second, None = a tie or a failure
    confidence: float         # probability-like belief that `winner` is better; 0.5 for a tie or a failure
    failed: bool = False      # the judge gave no usable answer (in either order)
    flipped: bool = False     # asked in both orders, the answer changed with the order (so: a tie)
    both_orders: bool = False  # asked in both orders and both answers were usable (the position-bias base)

    @property
    def tie(self) -> bool:
        return self.winner is None and not self.failed


TIE = Verdict(None, 0.5)
FAILED = Verdict(None, 0.5, failed=True)


@dataclass
class JudgeStats:
    """Counters of one judge over its life: comparisons, failures, flips and ties."""

    comparisons: int = 0   # compare() calls answered (failures included)
    both_orders: int = 0   # comparisons asked in both orders with two usable answers
    flips: int = 0         # of those, answers that changed with the order
    failures: int = 0      # comparisons without a usable answer
    ties: int = 0          # ties (flips included)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, verdicts: list[Verdict]) -> None:
        with self._lock:
            for v in verdicts:
                self.comparisons += 1
                self.both_orders += v.both_orders
                self.flips += v.flipped
                self.failures += v.failed
                self.ties += v.tie

    @property
    def position_bias(self) -> float | None:
        """Flips / comparisons asked in both orders; None when none was."""
        return self.flips / self.both_orders if self.both_orders else None

    def as_dict(self) -> dict:
        return {"comparisons": self.comparisons, "both_orders": self.both_orders, "flips": self.flips,
                "failures": self.failures, "ties": self.ties, "position_bias": self.position_bias}


@runtime_checkable
class Judge(Protocol):
    """SPEC §9. Prompts are as in the data (text or chat messages); responses are strings."""

    can_score: bool
    stats: JudgeStats

    def compare(self, prompt: Prompt, response_a: str, response_b: str) -> Verdict: ...

    def score(self, prompt: Prompt, response: str) -> float: ...

    def compare_batch(self, items: list[tuple[Prompt, str, str]]) -> list[Verdict]: ...

    def score_batch(self, prompts: list[Prompt], responses: list[str]) -> list[float]: ...


class BaseJudge:
    """Single calls as batches of one; subclasses implement `compare_batch` (and `score_batch` if they can)."""

    can_score = False

    def __init__(self):
        self.stats = JudgeStats()

    def compare(self, prompt, response_a, response_b) -> Verdict:
        return self.compare_batch([(prompt, response_a, response_b)])[0]

    def score(self, prompt, response) -> float:
        return self.score_batch([prompt], [response])[0]

    def compare_batch(self, items) -> list[Verdict]:
        raise NotImplementedError

    def score_batch(self, prompts, responses) -> list[float]:
        raise NotImplementedError(f"{type(self).__name__} compares pairs and cannot score one response")


class ScoringJudge(BaseJudge):
    """A judge that scores each response (`_scores`); two responses compare by their scores: the higher wins,
    equal scores tie, and the confidence is σ(s_winner − s_loser) (the Bradley–Terry probability)."""

    can_score = True

    def _scores(self, prompts: list, responses: list[str]) -> list[float]:
        raise NotImplementedError

    def score_batch(self, prompts, responses) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [float(s) for s in self._scores(list(prompts), list(responses))] if prompts else []

    def compare_batch(self, items) -> list[Verdict]:
        prompts = [p for p, _, _ in items for _ in range(2)]
        responses = [r for _, a, b in items for r in (a, b)]
        scores = self.score_batch(prompts, responses)
        verdicts = [verdict_from_scores(scores[2 * i], scores[2 * i + 1]) for i in range(len(items))]
        self.stats.add(verdicts)
        return verdicts


def verdict_from_scores(score_a: float, score_b: float) -> Verdict:
    if not (math.isfinite(score_a) and math.isfinite(score_b)):
        return FAILED
    if score_a == score_b:
        return TIE
    gap = abs(score_a - score_b)
    return Verdict(0 if score_a > score_b else 1, 1.0 / (1.0 + math.exp(-gap)))


# --------------------------------------------------------------------------------------- pairwise judges
# One order's answer: the probabilities of "first better", "second better", "tie" (summing to 1), or None.
Answer = tuple[float, float, float] | None


def combine_orders(forward: Answer, backward: Answer) -> Verdict:
    """A verdict from the answers to (a, b) and to (b, a) (MT-Bench's rule: an answer that changes with the
    order is a tie). Each answer's choice is its most probable one; the confidence is the mean over the usable
    orders of P(winner better) + P(tie)/2. One failed order leaves the other's answer (not both_orders)."""
    views = []  # per usable order: (P(a better), P(b better), P(tie)) in terms of a and b
    if forward is not None:
        views.append(forward)
    if backward is not None:
        views.append((backward[1], backward[0], backward[2]))
    if not views:
        return FAILED
    choices = [max(range(3), key=lambda k: v[k]) for v in views]  # 0 = a, 1 = b, 2 = tie
    p_a = sum(v[0] + v[2] / 2 for v in views) / len(views)
    both = len(views) == 2
    if both and choices[0] != choices[1]:
        return Verdict(None, 0.5, flipped=True, both_orders=True)
    if choices[0] == 2:
        return Verdict(None, 0.5, both_orders=both)
    winner = choices[0]
    return Verdict(winner, p_a if winner == 0 else 1.0 - p_a, both_orders=both)


class PairwiseJudge(BaseJudge):
    """A judge that reads a verdict for one order at a time (`_answers`); `compare_batch` asks every pair in
    both orders at once and combines them (`combine_orders`)."""

    def _answers(self, items: list[tuple[Prompt, str, str]]) -> list[Answer]:
        raise NotImplementedError

    def compare_batch(self, items) -> list[Verdict]:
        if not items:
            return []
        asked = list(items) + [(p, b, a) for p, a, b in items]
        answers = self._answers(asked)
        n = len(items)
        verdicts = [combine_orders(answers[i], answers[n + i]) for i in range(n)]
        self.stats.add(verdicts)
        return verdicts


# ---------------------------------------------------------------------------------------- judging prompt
# MT-Bench's "pair" judging prompt (Zheng et al. 2023, single-turn, v2), with a slot for principles.
DEFAULT_TEMPLATE = """\
Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the \
user question displayed below. You should choose the assistant that follows the user's instructions and answers \
the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, \
depth, creativity, and level of detail of their responses. Avoid any position biases and ensure that the order in \
which the responses were presented does not influence your decision. Do not allow the length of the responses to \
influence your evaluation. Be as objective as possible.
{principles}
[User Question]
{question}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]

After a short explanation, output your final verdict by strictly following this format: "[[A]]" if assistant A \
is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie."""

PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}", "{principles}")


def check_template(template: str, where: str = "judge_template") -> str:
    missing = [p for p in PLACEHOLDERS[:3] if p not in template]
    if missing:
        raise UserError(f"{where}: the judging template lacks {', '.join(missing)} (placeholders: "
                        f"{', '.join(PLACEHOLDERS)})")
    return template


def question_text(prompt: Prompt) -> str:
    """The question as the judge reads it: a string as it is; a one-message conversation its content; a longer
    one as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def principles_block(principles: list[str] | None) -> str:
    if not principles:
        return ""
    lines = "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))
    return f"\nJudge the answers by these principles:\n{lines}\n"


def judging_prompt(template: str, principles: list[str] | None, prompt: Prompt, answer_a, answer_b) -> str:
    """The template with its placeholders filled in, in one pass (other braces, and placeholders inside the
    filled-in texts, stay as they are)."""
    values = {"{question}": question_text(prompt), "{answer_a}": plain_text(answer_a),
              "{answer_b}": plain_text(answer_b), "{principles}": principles_block(principles)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(0)], template)


_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
