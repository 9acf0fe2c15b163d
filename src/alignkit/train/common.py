"""Preparation shared by trainers: load and split data (before anything is written), load the tokenizer."""

from __future__ import annotations

import random
import sys

from alignkit.data.formats import load_rows


def load_train_eval(cfg, kind: str, allowed: tuple[str, ...] | None = None, eval_kind: str | None = None):
    """Rows for training and evaluation. Everything is validated here, before the run folder exists, so a
    bad file stops the run with nothing half-written.

    `eval_data` rows are read as `eval_kind` (e.g. "auto", within `allowed`; the caller converts them), by
    default as the training rows' kind. Without `eval_data`, `eval_fraction` of the training rows (a seeded
    shuffle) is held out.
    """
    train = _load(cfg.data, kind, cfg.on_bad_row, allowed)
    rows = list(train.rows)
    if cfg.eval_data:
        eval_rows = list(_load(cfg.eval_data, eval_kind or train.kind, cfg.on_bad_row, allowed).rows)
    elif cfg.eval_fraction > 0 and len(rows) >= 2:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = min(len(rows) - 1, max(1, int(round(cfg.eval_fraction * len(rows)))))
        eval_rows = [rows[i] for i in sorted(order[:n_eval])]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    else:
        eval_rows = []
    return train.kind, rows, eval_rows


def drop_untrainable(examples: list, sources: list[str], has_targets) -> list:
    """Drop examples that truncation left with nothing to learn (warned, counted); error if none remain."""
    kept = [e for e in examples if has_targets(e)]
    dropped = [s for e, s in zip(examples, sources) if not has_targets(e)]
    if dropped:
        print(f"warning: dropped {len(dropped)} rows with no trainable tokens after truncation to max_length "
              f"(first: {dropped[0]}); raise max_length", file=sys.stderr)
    if examples and not kept:
        from alignkit.errors import UserError

        raise UserError(f"{sources[0]}: no row has trainable tokens within max_length")
    return kept


def _load(paths, kind, on_bad_row, allowed):
    from alignkit.errors import UserError

    result = load_rows(list(paths), kind=kind, on_bad_row=on_bad_row)
    if allowed and result.kind not in allowed:
        raise UserError(f"{paths[0]}: rows of kind {result.kind!r}; this command takes {' or '.join(allowed)} rows")
    if result.skipped:
        examples = "; ".join(result.skipped_examples[:3])
        print(f"warning: skipped {result.skipped} bad rows (on_bad_row: skip); first: {examples}", file=sys.stderr)
    return result
