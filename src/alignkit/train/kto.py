"""`alignkit kto`: Kahneman–Tversky optimisation (Ethayarajh et al. 2024) on thumbs-up/down examples.

Loss (`alignkit.losses.kto_loss`): with r = π(y|x) − ref(y|x) and the reference point z0, desirable examples
w_D·(1 − σ(β(r − z0))), undesirable ones w_U·(1 − σ(β(z0 − r))).

z0, as in the paper: the KL of the policy to the reference, estimated on *mismatched* prompt/completion
pairs — each example x_i is paired with the completion of another example — averaged over the optimizer
step's examples, clamped at 0 and detached. The mismatched partner is fixed once (a seeded derangement of
the data), so its reference log-probs are precomputed like the others; each row is [prompt | completion |
partner's completion], one forward. With `grad_accum` > 1 or several processes, z0 is the mean over *all* the
step's micro-batches on every process, from one extra forward without gradients before the loss pass
(`kto_reference_point`), so accumulation and processes do not change the loss: batch_size 2 × grad_accum 2 trains
as batch_size 4, and 2 processes with batch_size 2 as one with 4.

Pairwise rows are converted (chosen → desirable, rejected → undesirable); ranked rows give their best as
desirable and their worst as undesirable. `reference_free` sets the reference log-probs to 0.
"""

from __future__ import annotations

import random
import sys

import torch

from alignkit.data.collate import TokenizedPair
from alignkit.data.convert import pairwise_to_unary, ranked_to_unary
from alignkit.data.rows import UnaryRow
from alignkit.data.tokenize import Encoder
from alignkit.losses import dpo_implicit_rewards, kto_loss
from alignkit.models.load import load_tokenizer
from alignkit.models.logps import pair_logps
from alignkit.train.common import load_train_eval
from alignkit.train.loop import StepOutput, fit
from alignkit.train.preference_data import PrefBatch, PrefExample, preference_task
from alignkit.train.reference import reference_logps
from alignkit.train.run import seed_everything

# Ethayarajh et al. (2024), §4: keep λ_D·n_D / (λ_U·n_U) within [1, 4/3].
RECOMMENDED_BALANCE = (1.0, 4.0 / 3.0)


def kto_examples(encoder: Encoder, rows: list[UnaryRow], seed: int) -> list[PrefExample]:
    """Each example: (x_i, y_i) and, for the KL estimate, (x_i, y_j) with j a fixed seeded derangement of i."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    examples = []
    for i, row in enumerate(rows):
        prompt = encoder.prompt_ids(row.prompt, row.source)
        own = encoder.join(prompt, encoder.response_ids(row.prompt, row.completion, row.source))
        other = rows[partner[i]]
        mismatched = encoder.join(prompt, encoder.response_ids(row.prompt, other.completion, other.source))
        examples.append(PrefExample(TokenizedPair(own, mismatched), label=row.label))
    return examples


def mismatched_log_ratios(model, batch: PrefBatch, reference) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(π, ref) of the batch's own completions and π − ref of its mismatched ones, (B,) each."""
    policy = pair_logps(model, batch.pairs)                    # (2B,): completions, then mismatched ones
    ref = reference_logps(batch, reference, policy.logps)      # (2B,)
    pi, pi_kl = policy.logps.chunk(2)
    ref_own, ref_kl = ref.chunk(2)
    return pi, ref_own, pi_kl - ref_kl


def kto_reference_point(model, batches: list[PrefBatch], reference) -> torch.Tensor:
    """The log-ratios of the mismatched pairs of a process's micro-batches (B·k,); the loop averages them over the
    whole optimizer step — every micro-batch on every process — into z0 before the clamp (without gradients)."""
    return torch.cat([mismatched_log_ratios(model, b, reference)[2] for b in batches])


def kto_step_loss(model, batch: PrefBatch, cfg, reference, kl: torch.Tensor | None = None) -> StepOutput:
    """Summed KTO loss over the batch. `kl`: the step's z0 before the clamp; None = this batch is the whole
    step, and its own mismatched pairs give it."""
    pi, ref_own, mismatched = mismatched_log_ratios(model, batch, reference)
    if kl is None:
        kl = mismatched.mean()
    kl = kl.detach()                                           # z0 before the clamp (kto_loss clamps, detaches)
    losses = kto_loss(pi, ref_own, batch.labels, kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                      undesirable_weight=cfg.undesirable_weight)
    with torch.no_grad():
        r = dpo_implicit_rewards(pi, ref_own, cfg.beta)        # β log π/ref, the reward KTO thresholds at z0
        z = cfg.beta * kl.clamp(min=0)
        good, bad = batch.labels, ~batch.labels
        n_good, n_bad = int(good.sum()), int(bad.sum())
        right = torch.where(good, r > z, r < z)
        metrics = {
            "kl": (float(kl), 1),
            "rewards/accuracy": (float(right.sum()), batch.size),  # on the right side of the reference point
            "rewards/chosen": (float(r[good].sum()), n_good),
            "rewards/rejected": (float(r[bad].sum()), n_bad),
            "logps/chosen": (float(pi[good].sum()), n_good),
            "logps/rejected": (float(pi[bad].sum()), n_bad),
        }
    return StepOutput(losses.sum(), metrics)


def check_balance(rows: list[UnaryRow], cfg) -> float:
    """Warn when the weighted class balance leaves the paper's recommended range."""
    n_good = sum(r.label for r in rows)
    n_bad = len(rows) - n_good
    if n_good == 0 or n_bad == 0:
        print(f"warning: kto data has {n_good} desirable and {n_bad} undesirable examples; "
              "KTO needs both", file=sys.stderr)
        return float("inf") if n_bad == 0 else 0.0
    balance = cfg.desirable_weight * n_good / (cfg.undesirable_weight * n_bad)
    low, high = RECOMMENDED_BALANCE
    if not low <= balance <= high:
        print(f"warning: desirable_weight·n_D / (undesirable_weight·n_U) = {cfg.desirable_weight}·{n_good} / "
              f"({cfg.undesirable_weight}·{n_bad}) = {balance:.2f}, outside the range [1, 4/3] that the KTO paper "
              "recommends; adjust desirable_weight or undesirable_weight", file=sys.stderr)
    return balance


def train_kto(cfg) -> dict:
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    kind, train_rows, eval_rows = load_train_eval(cfg, "auto", allowed=("unary", "pairwise", "ranked"))
    convert = {"pairwise": pairwise_to_unary, "ranked": ranked_to_unary}.get(kind)
    if convert is not None:
        train_rows, eval_rows = convert(train_rows), convert(eval_rows)
    check_balance(train_rows, cfg)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    train = kto_examples(encoder, train_rows, cfg.seed)
    evals = kto_examples(encoder, eval_rows, cfg.seed + 1) if eval_rows else []
    task = preference_task(cfg, "kto", tokenizer, train, evals, kto_step_loss, step_context=kto_reference_point)
    task.derive = lambda m: ({"rewards/margin": m["rewards/chosen"] - m["rewards/rejected"]}
                             if "rewards/chosen" in m and "rewards/rejected" in m else {})
    return fit(cfg, task)
