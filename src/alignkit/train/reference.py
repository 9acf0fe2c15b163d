"""The frozen reference policy of the direct methods (DPO, KTO), and its log-probs computed once.

The reference is a separate frozen model (`ref_model`, default the starting model) or — with LoRA — the
policy itself with its adapters disabled, so no second copy sits in memory. With `precompute_ref` (the
default whenever the reference is frozen and the data fixed), its log-probs for every example are computed
once before training and stored in the run folder (`ref_logps.safetensors`, keyed by a fingerprint of the
reference and the tokenized data), so a resumed run reuses them and the reference model is freed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alignkit.data.collate import to_device
from alignkit.models.load import default_device, load_reference
from alignkit.models.logps import SequenceLogps, pair_logps
from alignkit.train.dist import ONE, Processes


class Reference:
    """Log-probs under the reference policy, without gradients, in eval mode."""

    def __init__(self, model=None, policy=None):
        assert (model is None) != (policy is None)
        self.model, self.policy = model, policy
        if model is not None:
            model.eval()
            model.requires_grad_(False)

    @contextlib.contextmanager
    def _active(self):
        if self.model is not None:
            yield self.model
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():  # PEFT: the base model is the reference
                yield self.policy
        finally:
            self.policy.train(was_training)

    @torch.no_grad()
    def pair_logps(self, batch) -> SequenceLogps:
        with self._active() as model:
            out = pair_logps(model, batch)
        return SequenceLogps(out.logps.detach(), out.lengths)

    def free(self) -> None:
        """Drop a separate reference model once its log-probs are all precomputed (a LoRA reference is the
        policy itself: nothing to drop)."""
        self.model = None


def reference_logps(batch, reference: Reference | None, like: torch.Tensor) -> torch.Tensor:
    """(2B,) reference log-probs of a preference batch (`PrefBatch`): precomputed, computed now, or zeros
    (reference-free), in `like`'s dtype and device."""
    if batch.ref_logps is not None:
        return batch.ref_logps.to(like.device, like.dtype)
    if reference is None:
        return torch.zeros_like(like)
    return reference.pair_logps(batch.pairs).logps.to(like.dtype)


def build_reference(cfg, policy) -> Reference | None:
    if cfg.reference_free:
        return None
    if cfg.lora_r > 0 and cfg.ref_model in ("", cfg.model):
        return Reference(policy=policy)
    return Reference(model=load_reference(cfg.ref_model or cfg.model, cfg.dtype, cfg.trust_remote_code))


def _fingerprint(cfg, examples: list) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"ref": cfg.ref_model or cfg.model, "dtype": cfg.dtype, "lora": cfg.lora_r > 0}).encode())
    for ex in examples:
        h.update(repr(ex.pair).encode())
    return h.hexdigest()


def precompute_reference(cfg, reference: Reference, splits: dict[str, list], collate, path: Path,
                         procs: Processes = ONE) -> None:
    """Fill `ref_logps` of every example in `splits` (name → list, updated in place), from `path` when it
    holds the same fingerprint, else by running the reference once (then saved to `path`). Under several
    processes (`procs`) each computes every size-th example (by length order), the values are summed across
    processes (each example filled by one), and the main process writes the file."""
    fingerprint = _fingerprint(cfg, [ex for examples in splits.values() for ex in examples])
    stored = {}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                stored = load_file(path)
    if procs.any(not stored):  # (every process has looked before the main one can write the file)
        from tqdm.auto import tqdm

        # no gradients here, so batches can be larger; sorted by length so they hold little padding
        batch_size = 4 * max(cfg.batch_size, cfg.eval_batch_size)
        total = sum(len(v) for v in splits.values())
        bar = tqdm(total=total, desc="reference log-probs", unit="ex", disable=None if procs.main else True,
                   file=sys.stderr)
        for name, examples in splits.items():
            values = torch.zeros((len(examples), 2))
            order = sorted(range(len(examples)), key=lambda i: len(examples[i]))[procs.rank::procs.size]
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                out = reference.pair_logps(to_device(collate([examples[j] for j in idx]).pairs, default_device()))
                values[idx] = torch.stack(out.logps.float().cpu().chunk(2), dim=1)  # (b, 2)
                bar.update(len(idx))
            stored[name] = procs.sum_tensor(values)
        bar.close()
        if procs.main:
            tmp = path.with_name(path.name + ".tmp")
            save_file(stored, tmp, metadata={"fingerprint": fingerprint})
            tmp.replace(path)
    for name, examples in splits.items():
        values = stored[name].tolist()
        for i, ex in enumerate(examples):
            examples[i] = replace(ex, ref_logps=(values[i][0], values[i][1]))
    reference.free()
