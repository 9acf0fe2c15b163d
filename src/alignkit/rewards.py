"""Where rewards come from: reward models (one, or an ensemble: mean | min | uwo), rule rewards
(`python:module:function`), or a sum of both. Used by `ppo` (and by Best-of-N and serving, which score the
same way)."""

from __future__ import annotations

import importlib
import json

import torch

from alignkit.data.collate import Tokenized, collate_sequences, pack_sequences, to_device
from alignkit.data.rows import plain_text
from alignkit.data.tokenize import Encoder, same_vocabulary
from alignkit.errors import UserError
from alignkit.models.load import default_device, load_reward_model, load_tokenizer
from alignkit.models.logps import reward_scores


def load_reward_fn(spec: str):
    """`python:module:function` (or `module:function`) → f(prompts, responses) -> list[float]."""
    spec = spec[len("python:"):] if spec.startswith("python:") else spec
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f'field "reward_fn": cannot load {spec!r} ({e})') from None


class Scorer:
    """Scores responses with reward models, a rule and/or a judge that can score (`reward_judge`, direct
    RLAIF: rm: or python: judges; see `alignkit.judges`), summed; reports the ensemble's spread.

    A reward model that shares the policy's vocabulary scores exactly the sampled tokens (an unfinished
    response has no EOS, as it was sampled); one with another tokenizer scores the text, encoded as it was
    trained (chat template for conversational prompts; EOS only after a finished response). The rule gets
    plain-text prompts.
    """

    def __init__(self, cfg, paths: list[str] | None = None, use_rule: bool = True, policy_tokenizer=None, judge=None):
        if paths is None:
            paths = list(cfg.reward_models) + ([cfg.reward_model] if cfg.reward_model else [])
        self.models = []
        for path in paths:
            tok = load_tokenizer(path, cfg.trust_remote_code)
            same = policy_tokenizer is not None and same_vocabulary(policy_tokenizer, tok)
            model = load_reward_model(path, tok, cfg.dtype, cfg.trust_remote_code).eval().requires_grad_(False)
            self.models.append((model, tok, Encoder(tok, 100_000, 50_000), same))
        self.prefix_sharing = cfg.prefix_sharing
        self.rule = load_reward_fn(cfg.reward_fn) if cfg.reward_fn and use_rule else None
        self.judge = None
        if use_rule and (judge is not None or getattr(cfg, "reward_judge", "")):
            from alignkit.judges import JudgeScorer, build_judge

            self.judge = JudgeScorer(judge or build_judge(cfg.reward_judge, trust_remote_code=cfg.trust_remote_code,
                                                          dtype=cfg.dtype))
        self.ensemble, self.uwo_lambda = cfg.ensemble, cfg.uwo_lambda

    def _sequences(self, enc, same, prompts, responses, finished, sampled):
        if same and sampled is not None:
            return list(sampled)
        seqs = []
        for prompt, response, done in zip(prompts, responses, finished):
            ids = enc.response_ids(prompt, response)
            if not done and ids and ids[-1] == enc.eos_id:
                ids = ids[:-1]
            seqs.append(enc.join(enc.prompt_ids(prompt), ids))
        return seqs

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str], finished: list[bool] | None = None,
                 sampled: list[Tokenized] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores (N,), ensemble spread (N,) or None). `prompts` as in the data (text or messages),
        `sampled` the policy's token sequences (prompt + sampled response) for same-vocabulary models."""
        finished = finished if finished is not None else [True] * len(prompts)
        total = torch.zeros(len(prompts))
        spread = None
        if self.models:
            per_model = []
            keys = [json.dumps(p) if not isinstance(p, str) else p for p in prompts]
            for model, tok, enc, same in self.models:
                seqs = self._sequences(enc, same, prompts, responses, finished, sampled)
                if self.prefix_sharing:  # padding-free, a prompt's samples sharing one block
                    batch = pack_sequences(seqs, keys, tok.pad_token_id)
                else:
                    batch = collate_sequences(seqs, tok.pad_token_id)
                scores = reward_scores(model, to_device(batch, default_device()))
                per_model.append(scores.float().cpu())
            scores = torch.stack(per_model)                                               # (M, N)
            spread = scores.std(0) if len(per_model) > 1 else None
            if self.ensemble == "min":
                total += scores.min(0).values
            elif self.ensemble == "uwo" and len(per_model) > 1:
                total += scores.mean(0) - self.uwo_lambda * scores.var(0)
            else:
                total += scores.mean(0)
        if self.judge is not None:
            total += self.judge(prompts, responses)[0]
        if self.rule is not None:
            texts = [p if isinstance(p, str) else plain_text(p) for p in prompts]
            values = self.rule(texts, responses)
            if len(values) != len(prompts):
                raise UserError(f"reward_fn returned {len(values)} scores for {len(prompts)} responses")
            total += torch.tensor([float(v) for v in values])
        return total, spread
