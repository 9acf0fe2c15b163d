"""`alignkit sft`: supervised fine-tuning — next-token cross-entropy on the completion (assistant) tokens.

loss = −(1/N) Σ_{target tokens} log π(y_t | x, y_<t), N = target tokens in the whole (accumulated) batch.
"""

from __future__ import annotations

from alignkit.data.collate import SequenceBatch, collate_sequences
from alignkit.data.tokenize import Encoder
from alignkit.losses import sft_token_loss
from alignkit.models.load import load_causal_lm, load_tokenizer, prepare_trainable, save_pretrained_atomic
from alignkit.models.logps import sequence_logps
from alignkit.train.common import drop_untrainable, load_train_eval
from alignkit.train.loop import StepOutput, Task, fit
from alignkit.train.run import seed_everything


def sft_step_loss(model, batch: SequenceBatch) -> StepOutput:
    """Summed token NLL of the batch's target tokens (the loop divides by the step's target count)."""
    lp = sequence_logps(model, batch)
    loss = sft_token_loss(lp.token_logps, lp.mask).sum()
    return StepOutput(loss)


def train_sft(cfg) -> dict:
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    _, train_rows, eval_rows = load_train_eval(cfg, "auto", allowed=("sft",))
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    has_targets = lambda seq: any(seq.loss_mask[1:])  # noqa: E731  (the first token is never predicted)
    train = drop_untrainable([encoder.sft(r, cfg.completion_only_loss) for r in train_rows],
                             [r.source for r in train_rows], has_targets)
    evals = drop_untrainable([encoder.sft(r, cfg.completion_only_loss) for r in eval_rows],
                             [r.source for r in eval_rows], has_targets)
    model = prepare_trainable(load_causal_lm(cfg.model, cfg.dtype, cfg.trust_remote_code), cfg, "CAUSAL_LM")
    pad = tokenizer.pad_token_id
    task = Task(
        name="sft",
        model=model,
        train_examples=train,
        eval_examples=evals or None,
        collate=lambda xs: collate_sequences(xs, pad),
        loss=sft_step_loss,
        units=lambda b: b.num_targets,
        tokens=lambda b: b.num_tokens,
        save_final=lambda path: save_pretrained_atomic(model, tokenizer, path, cfg.lora_save),
    )
    return fit(cfg, task)
