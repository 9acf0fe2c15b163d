"""Judges that run in this process: reward models (`rm:`), rules (`python:`), and a causal LM asked the pairwise
judging prompt (`lm:`), its verdict read from the log-probabilities of the choice tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from alignkit.data.collate import Tokenized, collate_sequences, to_device
from alignkit.data.rows import plain_text
from alignkit.data.tokenize import Encoder
from alignkit.errors import UserError
from alignkit.judges.base import DEFAULT_TEMPLATE, Answer, PairwiseJudge, ScoringJudge, judging_prompt
from alignkit.models.load import default_device, load_causal_lm, load_tokenizer
from alignkit.models.logps import target_logps
from alignkit.rewards import Scorer, load_reward_fn


class RewardModelJudge(ScoringJudge):
    """`rm:PATH[,PATH2…][#mean|min|uwo]`: one reward model or an ensemble, scored as `alignkit.rewards.Scorer`
    scores for ppo (the text, encoded as the reward model was trained; EOS after the response)."""

    def __init__(self, paths: list[str], *, ensemble: str = "mean", uwo_lambda: float = 1.0, dtype: str = "auto",
                 trust_remote_code: bool = False, batch_size: int = 32):
        super().__init__()
        cfg = SimpleNamespace(reward_models=tuple(paths), reward_model="", reward_fn="", dtype=dtype,
                              trust_remote_code=trust_remote_code, prefix_sharing=True, ensemble=ensemble,
                              uwo_lambda=uwo_lambda)
        self.scorer = Scorer(cfg, paths=list(paths), use_rule=False)
        self.batch_size = batch_size

    def _scores(self, prompts, responses):
        out = []
        for begin in range(0, len(prompts), self.batch_size):
            end = begin + self.batch_size
            out += self.scorer(prompts[begin:end], [plain_text(r) for r in responses[begin:end]])[0].tolist()
        return out


class RuleJudge(ScoringJudge):
    """`python:module:function`: a rule reward f(prompts, responses) -> list[float] (plain-text prompts), the
    same as ppo's `reward_fn`."""

    def __init__(self, spec: str):
        super().__init__()
        self.fn = load_reward_fn(spec)
        self.spec = spec

    def _scores(self, prompts, responses):
        values = self.fn([plain_text(p) for p in prompts], [plain_text(r) for r in responses])
        if len(values) != len(prompts):
            raise UserError(f"{self.spec} returned {len(values)} scores for {len(prompts)} responses")
        return [float(v) for v in values]


ANSWER_PREFIX = "[["
CHOICES = ("A", "B", "C")  # first better, second better, tie


def choice_token_ids(tokenizer, prefix: str = ANSWER_PREFIX, choices=CHOICES) -> tuple[list[int], list[int]]:
    """(ids of `prefix`, the token that follows it for each choice). Each choice must be one distinct, known
    token right after the prefix, or its log-probability could not be read in one position."""
    base = list(tokenizer(prefix, add_special_tokens=False).input_ids)
    ids = []
    for choice in choices:
        full = list(tokenizer(prefix + choice, add_special_tokens=False).input_ids)
        if full[:len(base)] != base or len(full) <= len(base):
            raise UserError(f"the lm judge's tokenizer merges {prefix!r} with {choice!r}; cannot read the verdict "
                            "from one token")
        ids.append(full[len(base)])
    unknown = tokenizer.unk_token_id
    if len(set(ids)) < len(ids) or (unknown is not None and unknown in ids):
        raise UserError(f"the lm judge's tokenizer has no distinct tokens for the verdicts {', '.join(choices)}")
    return base, ids


class LMJudge(PairwiseJudge):
    """`lm:PATH`: a local causal LM given the judging prompt as a user turn (through its chat template), its
    answer started with "[[": the verdict is the most probable of the tokens "A", "B", "C" at the next position
    (log-probabilities, not sampled text), and its probabilities, renormalised over the three, are the answer.
    Asked in both orders (`PairwiseJudge`), in batches of `batch_size` prompts."""

    def __init__(self, path: str, *, template: str | None = None, principles: list[str] | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False, batch_size: int = 8):
        super().__init__()
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = load_causal_lm(path, dtype, trust_remote_code, for_training=False).eval().requires_grad_(False)
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        self.prefix_ids, self.choice_ids = choice_token_ids(self.tokenizer)
        self.encoder = Encoder(self.tokenizer, max_length=limit, max_prompt_length=limit - len(self.prefix_ids))
        self.template, self.principles = template or DEFAULT_TEMPLATE, principles
        self.batch_size = batch_size

    def sequence(self, prompt, answer_a, answer_b) -> list[int]:
        """Token ids of the judging prompt for (a, b), ending where the verdict token goes."""
        text = judging_prompt(self.template, self.principles, prompt, answer_a, answer_b)
        return self.encoder.prompt_ids([{"role": "user", "content": text}]) + self.prefix_ids

    @torch.no_grad()
    def _answers(self, items) -> list[Answer]:
        seqs = [self.sequence(*item) for item in items]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
        answers: list[Answer] = [None] * len(seqs)
        choices = torch.tensor(self.choice_ids)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin:begin + self.batch_size]
            batch = collate_sequences([Tokenized(seqs[i], [False] * len(seqs[i])) for i in chunk],
                                      self.tokenizer.pad_token_id)
            batch = to_device(batch, default_device())
            width = batch.input_ids.shape[1]
            last = torch.tensor([k * width + len(seqs[i]) - 1 for k, i in enumerate(chunk)])      # (n,)
            positions = last.repeat_interleave(len(choices)).to(batch.input_ids.device)          # (3n,)
            targets = choices.repeat(len(chunk)).to(batch.input_ids.device)                      # (3n,)
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                      "position_ids": batch.position_ids, "use_cache": False}
            logps = target_logps(self.model, kwargs, positions, targets).view(len(chunk), len(choices))
            probs = logps.float().softmax(-1).cpu().tolist()                                    # over A, B, C
            for k, i in enumerate(chunk):
                answers[i] = tuple(probs[k])
        return answers
