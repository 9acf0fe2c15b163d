"""`alignkit reward`: a reward model r(x, y) = the score at the response's last token (EOS).

Pairwise rows: Bradley–Terry, −log σ(r_c − r_r − m) with the row's optional margin m.
Ranked rows: Plackett–Luce over all K responses, −Σ_i [r_i − logsumexp_{j ≥ i} r_j] (ties: Breslow), or
every pair of the ranking under Bradley–Terry (`ranked_loss: pairs`).
`accuracy`: share of ordered (non-tied) pairs the model ranks correctly, ties in score counting half.
The model is saved as `AutoModelForSequenceClassification` (num_labels=1): plain transformers scores the
text `prompt + response + eos_token` with it.
"""

from __future__ import annotations

import torch

from alignkit.data.collate import (
    PackedBatch,
    PairBatch,
    RankedBatch,
    collate_packed_pairs,
    collate_packed_rankings,
    collate_pairs,
    collate_rankings,
)
from alignkit.data.convert import comparisons_as, ranked_to_pairwise
from alignkit.data.encode import encode_pair, encode_ranking
from alignkit.data.tokenize import Encoder
from alignkit.losses import bradley_terry_loss, plackett_luce_loss
from alignkit.models.load import load_reward_model, load_tokenizer, prepare_trainable, save_pretrained_atomic
from alignkit.models.logps import reward_scores
from alignkit.train.common import load_train_eval
from alignkit.train.loop import StepOutput, Task, fit
from alignkit.train.run import seed_everything


def pair_accuracy(better: torch.Tensor, worse: torch.Tensor) -> float:
    """Correctly ordered pairs, a tie in score counting half (so an untrained model scores 0.5)."""
    return float((better > worse).sum() + 0.5 * (better == worse).sum())


def pairwise_step_loss(model, batch: PairBatch | PackedBatch, use_margin: bool = True,
                       center: float = 0.0) -> StepOutput:
    scores = reward_scores(model, batch.sequences if isinstance(batch, PairBatch) else batch)  # (2B,)
    chosen, rejected = scores.chunk(2)                        # (B,), (B,)
    margin = batch.margin if use_margin else None
    losses = bradley_terry_loss(chosen, rejected, margin)
    if center > 0:
        losses = losses + center * (chosen + rejected) ** 2
    n = batch.size
    c, r = chosen.detach(), rejected.detach()
    return StepOutput(losses.sum(), {
        "accuracy": (pair_accuracy(c, r), n),
        "rewards/chosen": (float(c.sum()), n),
        "rewards/rejected": (float(r.sum()), n),
        "rewards/margin": (float((c - r).sum()), n),
    })


def ranked_step_loss(model, batch: RankedBatch, center: float = 0.0) -> StepOutput:
    scores = reward_scores(model, batch.sequences)                 # (N,)
    rewards = scores[batch.index]                                   # (B, K)
    losses = plackett_luce_loss(rewards, batch.mask, batch.ties)
    if center > 0:  # c·(Σ_k r_k)², which is c·(r_c + r_r)² for a pair
        losses = losses + center * torch.where(batch.mask, rewards, 0.0).sum(-1) ** 2
    r = rewards.detach()
    # every ordered pair (i better than j): i before j, both present, not tied
    k = r.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    valid = upper & batch.mask[:, :, None] & batch.mask[:, None, :] & (batch.ties[:, :, None] != batch.ties[:, None, :])
    better, worse = r[:, :, None].expand(-1, -1, k)[valid], r[:, None, :].expand(-1, k, -1)[valid]
    return StepOutput(losses.sum(), {"accuracy": (pair_accuracy(better, worse), int(valid.sum()))})


def train_reward(cfg) -> dict:
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    kind, train_rows, eval_rows = load_train_eval(cfg, "auto", allowed=("pairwise", "ranked"), eval_kind="auto")
    model = load_reward_model(cfg.model, tokenizer, cfg.dtype, cfg.trust_remote_code)  # may add a pad token
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    pad = tokenizer.pad_token_id
    if kind == "ranked" and cfg.ranked_loss == "pairs":
        kind, train_rows = "pairwise", ranked_to_pairwise(train_rows)
    eval_rows = comparisons_as(eval_rows, kind)  # any comparison kind evaluates: a pair is a ranking of two
    if kind == "pairwise":
        encode, collate = encode_pair, (collate_packed_pairs if cfg.prefix_sharing else collate_pairs)
        loss = lambda m, b: pairwise_step_loss(m, b, cfg.use_margin, cfg.center_rewards)
    else:
        encode, collate = encode_ranking, (collate_packed_rankings if cfg.prefix_sharing else collate_rankings)
        loss = lambda m, b: ranked_step_loss(m, b, cfg.center_rewards)
    train = [encode(encoder, r) for r in train_rows]
    evals = [encode(encoder, r) for r in eval_rows]
    model = prepare_trainable(model, cfg, "SEQ_CLS")
    task = Task(
        name="reward",
        model=model,
        train_examples=train,
        eval_examples=evals or None,
        collate=lambda xs: collate(xs, pad),
        loss=loss,
        units=lambda b: b.size,
        tokens=lambda b: b.num_tokens if isinstance(b, PackedBatch) else b.sequences.num_tokens,
        save_final=lambda path: save_pretrained_atomic(model, tokenizer, path, cfg.lora_save),
    )
    return fit(cfg, task)
