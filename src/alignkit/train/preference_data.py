"""Examples, batches and the task shared by the direct preference trainers (dpo, kto).

Both train on rows of one prompt and two responses — DPO: (chosen, rejected); KTO: (the completion, a
mismatched completion for the KL reference point) — so both use one example type, one collate, the same
prefix-shared forward, and one `preference_task` (policy, reference, precomputation) that differs only by
its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.collate import (
    PackedBatch,
    PairBatch,
    TokenizedPair,
    collate_packed_pairs,
    collate_pairs,
)
from alignkit.models.load import load_causal_lm, prepare_trainable, save_pretrained_atomic
from alignkit.train.loop import Task
from alignkit.train.reference import build_reference, precompute_reference


@dataclass(frozen=True)
class PrefExample:
    pair: TokenizedPair
    ref_logps: tuple[float, float] | None = None  # reference log-probs of the two responses, once precomputed
    label: bool | None = None                     # KTO: the first response is desirable

    def __len__(self) -> int:
        return len(self.pair)


@dataclass
class PrefBatch:
    pairs: PackedBatch | PairBatch  # responses A (first B rows of its log-probs) and B (last B)
    ref_logps: torch.Tensor | None     # (2B,) precomputed reference log-probs, A then B; None = compute
    labels: torch.Tensor | None        # (B,) bool, KTO only

    @property
    def size(self) -> int:
        return self.pairs.size

    @property
    def num_tokens(self) -> int:
        p = self.pairs
        return p.num_tokens if isinstance(p, PackedBatch) else p.sequences.num_tokens


def collate_preference(examples: list[PrefExample], pad_id: int, prefix_sharing: bool = True) -> PrefBatch:
    pairs = [e.pair for e in examples]
    batch = collate_packed_pairs(pairs, pad_id) if prefix_sharing else collate_pairs(pairs, pad_id)
    ref = None
    if all(e.ref_logps is not None for e in examples):
        ref = torch.tensor([e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples])
    labels = None
    if examples[0].label is not None:
        labels = torch.tensor([bool(e.label) for e in examples])
    return PrefBatch(batch, ref, labels)


def preference_task(cfg, name: str, tokenizer, train: list[PrefExample], evals: list[PrefExample],
                    loss_fn, uses_reference: bool = True, step_context=None) -> Task:
    """The policy (+ LoRA), the reference, precomputation, and the Task that `fit` runs (dpo and kto).

    `loss_fn(model, batch, cfg, reference[, context])`; `step_context(model, batches, reference)`, if given,
    computes the context of a step with several micro-batches (see `Task.step_context`)."""
    model = prepare_trainable(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code), cfg, "CAUSAL_LM")
    reference = build_reference(cfg, model) if uses_reference else None
    pad = tokenizer.pad_token_id
    collate = lambda xs: collate_preference(xs, pad, cfg.prefix_sharing)  # noqa: E731

    def prepare(run, procs):
        if reference is not None and cfg.precompute_ref:
            precompute_reference(cfg, reference, {"train": train, "eval": evals}, collate,
                                 run.path / "ref_logps.safetensors", procs)

    return Task(
        name=name,
        model=model,
        train_examples=train,
        eval_examples=evals or None,
        collate=collate,
        loss=lambda m, b, *context: loss_fn(m, b, cfg, reference, *context),
        units=lambda b: b.size,
        tokens=lambda b: b.num_tokens,
        save_final=lambda path: save_pretrained_atomic(model, tokenizer, path, cfg.lora_save),
        prepare=prepare,
        step_context=(lambda m, batches: step_context(m, batches, reference)) if step_context is not None else None,
    )
