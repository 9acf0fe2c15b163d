"""A rollout as the trainer and the evaluation both use it: sample, decode, and pack the sampled sequences
(the one home of rollout → decode → pack).

Every rollout tensor is (N, R) in *response space*: row i is sample i, column t its t-th sampled token, and
`response_mask` marks the sampled tokens (EOS included). A packed forward yields values for the M sampled
tokens in the row-major order of that mask; `scatter_tokens` puts them back into response space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import PackedBatch, Tokenized, pack_sequences
from alignkit.data.rows import plain_text
from alignkit.errors import TrainingError
from alignkit.models.precision import autocast_context
from alignkit.rl.rollout import GenerateFn, Rollout, generate


class RolloutPacker:
    """Packs sequences of a rollout into rows for one forward, padding-free (SPEC §12): the samples of a prompt
    share a block [prompt | response 1 | … | response K] (prompt computed once), and blocks are bin-packed
    into rows no wider than the widest block (so never wider than padding), each isolated by the 4D mask.
    (Measured: wider rows cost more in masked attention than they save in padding.)

    `pack(indices)` takes sorted sequence indices and returns a PackedBatch whose targets run in that order,
    token by token — the row-major order of `response_mask[indices]`, the layout every rollout tensor uses.
    """

    def __init__(self, prompt_ids: list[list[int]], responses: list[list[int]], prompt_of: list[int], pad_id: int,
                 share_prompts: bool = True):
        self.seqs = [Tokenized(p + r, [False] * len(p) + [True] * len(r)) for p, r in zip(prompt_ids, responses)]
        self.prompt_of = prompt_of if share_prompts else list(range(len(responses)))
        self.pad_id = pad_id

    def __call__(self, indices: list[int]) -> PackedBatch:
        return pack_sequences([self.seqs[i] for i in indices], [self.prompt_of[i] for i in indices], self.pad_id)


def scatter_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M,) per-token values in row-major order of `mask` (N, R) → an (N, R) float tensor, 0 elsewhere."""
    if values.shape[0] != int(mask.sum()):
        raise TrainingError(f"{values.shape[0]} token log-probs for {int(mask.sum())} sampled tokens "
                            "(is a prompt empty? every response token needs a position that predicts it)")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask] = values.float()
    return out


@dataclass
class Responses:
    """`samples_per_prompt` sampled responses for each of a batch of prompts, sample i of prompt j at row
    j·K + i."""

    rollout: Rollout               # the sampler's tensors: response_mask, logps, finished (N, …)
    prompts: list                  # each sample's prompt as in the data (text or chat messages)
    prompt_texts: list[str]        # the same as plain text
    ids: list[list[int]]           # each sample's response tokens (EOS included when it finished)
    texts: list[str]               # the decoded responses
    pack: RolloutPacker            # packs any sorted subset of the samples into one PackedBatch

    @property
    def seqs(self) -> list[Tokenized]:
        """prompt + response tokens of each sample, the response marked (what same-vocabulary reward models score)."""
        return self.pack.seqs

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.ids])      # (N,)

    @property
    def finished(self) -> list[bool]:
        return self.rollout.finished.cpu().tolist()

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def pack_all(self) -> PackedBatch:
        return self.pack(list(range(len(self.ids))))


def sample_responses(policy, tokenizer, prompts: list[tuple[object, list[int]]], samples_per_prompt: int, *,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     generator: torch.Generator | None = None, compute_dtype=None, share_prompts: bool = True,
                     generate_fn: GenerateFn = generate) -> Responses:
    """Sample `samples_per_prompt` responses to each (prompt, prompt_ids) with `generate_fn`, decode them, and
    make their packer (`share_prompts`: a prompt's samples share one block)."""
    k = samples_per_prompt
    raw = [p for p, _ in prompts for _ in range(k)]
    prompt_ids = [ids for _, ids in prompts for _ in range(k)]
    with autocast_context(compute_dtype):
        rollout = generate_fn(policy, prompt_ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              generator=generator)
    ids = [r[m].tolist() for r, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
    return Responses(
        rollout=rollout, prompts=raw, prompt_texts=[p if isinstance(p, str) else plain_text(p) for p in raw], ids=ids,
        texts=[tokenizer.decode(r, skip_special_tokens=True) for r in ids],
        pack=RolloutPacker(prompt_ids, ids, [i // k for i in range(len(ids))], tokenizer.pad_token_id, share_prompts))


@dataclass
class RolloutView:
    """What the monitors, the detector and the logged means read of a rollout — its texts, tokens and per-sample
    numbers (CPU) — over every process's samples, in the order one process sampling the whole batch has."""

    prompt_texts: list[str]
    texts: list[str]
    ids: list[list[int]]
    finished: torch.Tensor           # (N,) bool
    scores: torch.Tensor             # (N,) the reward before shaping
    shaped: torch.Tensor             # (N,) after the sequence-level shaping options
    kl: torch.Tensor                 # (N,) k1 sequence KL to the reference
    spread: torch.Tensor | None      # (N,) the ensemble's disagreement
    heldout: torch.Tensor | None     # (N,) the held-out reward models' score

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.ids])      # (N,)

    @classmethod
    def gather(cls, procs, batch: Responses, scores, shaped, kl, spread=None, heldout=None) -> RolloutView:
        """This process's samples (`batch` and its per-sample tensors) joined with the other processes', in rank
        order (`procs`: `alignkit.train.dist.Processes`; one process keeps its own)."""
        cpu = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
        mine = (batch.prompt_texts, batch.texts, batch.ids, batch.rollout.finished.cpu(), cpu(scores), cpu(shaped),
                cpu(kl), cpu(spread), cpu(heldout))
        parts = procs.gather(mine) if procs.size > 1 else [mine]
        joined = []
        for field in zip(*parts):
            if isinstance(field[0], list):
                joined.append([x for part in field for x in part])
            else:
                joined.append(None if field[0] is None else torch.cat(field))
        return cls(*joined)
