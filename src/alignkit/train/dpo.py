"""`alignkit dpo`: the DPO family on preference pairs (Rafailov et al. 2023 and variants, SPEC §11).

With h = (π_c − ref_c) − (π_r − ref_r) over summed response log-probs, `alignkit.losses.dpo_loss` gives
sigmoid (DPO; cDPO with label smoothing), robust, hinge, ipo (on per-token averages by default), simpo
(reference-free, length-normalised) and rdpo (length-regularised). No loss math lives here.

Metrics: rewards/chosen = β(π_c − ref_c), rewards/rejected, rewards/margin, rewards/accuracy (chosen above
rejected), logps/chosen, logps/rejected, and their eval/ versions.
"""

from __future__ import annotations

import torch

from alignkit.data.convert import ranked_to_pairwise
from alignkit.data.encode import encode_pair
from alignkit.data.tokenize import Encoder
from alignkit.losses import dpo_implicit_rewards, dpo_loss
from alignkit.models.load import load_tokenizer
from alignkit.models.logps import pair_logps, per_token
from alignkit.train.common import load_train_eval
from alignkit.train.loop import StepOutput, fit
from alignkit.train.preference_data import PrefBatch, PrefExample, preference_task
from alignkit.train.reference import Reference, reference_logps
from alignkit.train.run import seed_everything


def dpo_step_loss(model, batch: PrefBatch, cfg, reference: Reference | None) -> StepOutput:
    """Summed DPO-family loss over the batch's pairs, with the implicit-reward metrics."""
    policy = pair_logps(model, batch.pairs)                                   # (2B,)
    ref = reference_logps(batch, reference, policy.logps)                     # (2B,)
    lengths = policy.lengths.to(policy.logps.dtype)
    pi, rf = policy.logps, ref
    if cfg.loss == "ipo" and cfg.ipo_average:                                # IPO on per-token averages
        pi, rf = per_token(pi, lengths), per_token(rf, lengths)
    pi_c, pi_r = pi.chunk(2)
    ref_c, ref_r = rf.chunk(2)
    len_c, len_r = lengths.chunk(2)
    losses = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, variant=cfg.loss,
                      label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma, alpha=cfg.rdpo_alpha,
                      chosen_lengths=len_c, rejected_lengths=len_r)
    with torch.no_grad():
        if cfg.loss == "simpo":  # SimPO's implicit reward: β · average log-prob (no reference)
            r_c = dpo_implicit_rewards(per_token(pi_c, len_c), torch.zeros_like(pi_c), cfg.beta)
            r_r = dpo_implicit_rewards(per_token(pi_r, len_r), torch.zeros_like(pi_r), cfg.beta)
        else:
            r_c, r_r = dpo_implicit_rewards(pi_c, ref_c, cfg.beta), dpo_implicit_rewards(pi_r, ref_r, cfg.beta)
        n = batch.size
        lp_c, lp_r = policy.logps.detach().chunk(2)
        metrics = {
            "rewards/chosen": (float(r_c.sum()), n),
            "rewards/rejected": (float(r_r.sum()), n),
            "rewards/margin": (float((r_c - r_r).sum()), n),
            "rewards/accuracy": (float((r_c > r_r).sum()), n),
            "logps/chosen": (float(lp_c.sum()), n),
            "logps/rejected": (float(lp_r.sum()), n),
        }
    return StepOutput(losses.sum(), metrics)


def train_dpo(cfg) -> dict:
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    kind, train_rows, eval_rows = load_train_eval(cfg, "auto", allowed=("pairwise", "ranked"))
    if kind == "ranked":
        train_rows = ranked_to_pairwise(train_rows, cfg.pairs_from_ranked)
        eval_rows = ranked_to_pairwise(eval_rows, cfg.pairs_from_ranked)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    train = [PrefExample(encode_pair(encoder, r)) for r in train_rows]
    evals = [PrefExample(encode_pair(encoder, r)) for r in eval_rows]
    uses_reference = cfg.loss != "simpo"
    return fit(cfg, preference_task(cfg, "dpo", tokenizer, train, evals, dpo_step_loss, uses_reference))
