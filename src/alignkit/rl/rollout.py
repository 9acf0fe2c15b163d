"""The rollout engine: batched sampling with a KV cache, and the log-probs of what was sampled.

`generate` is the default `GenerateFn`; anything with the same call signature (a vLLM backend, say) can
replace it: `train_ppo(cfg, generate_fn=...)` and `evaluate_policy(..., generate_fn=...)` take one.
Prompts are left-padded so every row's next token sits in the last column; position ids count
real tokens only, so padding changes nothing. Sampling uses its own `torch.Generator`, seeded by the caller
(e.g. from the run seed and the iteration), which makes rollouts reproducible and resumable without any
global RNG state.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor     # (B, P) long, left-padded
    prompt_mask: torch.Tensor    # (B, P) bool, True = real token
    response_ids: torch.Tensor   # (B, R) long, right-padded with pad_id after EOS
    response_mask: torch.Tensor  # (B, R) bool, True = sampled token (EOS included)
    logps: torch.Tensor          # (B, R) log-prob of each sampled token at the sampling temperature, 0 if masked
    finished: torch.Tensor       # (B,) bool, True = the response ended with EOS


@dataclass
class SharedGenerator:
    """One seeded generator shared by processes that each sample a slice of a global batch (`accelerate launch`):
    every sampling step draws the uniform numbers of all `total` rows, as one process sampling the whole batch
    would, and this process keeps rows `start …`, so N processes sample exactly what one would."""

    generator: torch.Generator
    start: int
    total: int

    def uniforms(self, rows: int) -> torch.Tensor:
        u = torch.rand((self.total, 1), dtype=torch.float64, generator=self.generator)
        return u[self.start:self.start + rows]


class GenerateFn(Protocol):
    def __call__(self, model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Rollout: ...


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (nucleus sampling); −inf elsewhere."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _forward_kwargs(model) -> tuple[str, bool]:
    """The KV-cache keyword (`cache` in transformers 5, `past_key_values` before) and whether the model can
    skip the logits of all but the last position (read on the base model: PEFT's wrapper takes **kwargs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


SAMPLE_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def sample(probs: torch.Tensor, generator: torch.Generator | SharedGenerator | None = None) -> torch.Tensor:
    """(B,) one token per row drawn from `probs` (B, V) by inverting the cumulative distribution.

    One uniform number per row (where `torch.multinomial` and the Gumbel trick draw one per vocabulary entry,
    most of a small model's sampling time on CPU), and a token of probability 0 can never be drawn (its
    interval is empty). The inversion runs in two levels: the mass of each block of `SAMPLE_BLOCK` entries (a
    sum of 256 probabilities in their own dtype, as exact as they are), the float64 cumulative sum of those
    masses, then the float64 cumulative sum inside the one block the draw falls in — V / 256 + 256 float64
    additions a row, where a single inverse CDF converts all V probabilities to float64 and sums them all (with
    a 32k vocabulary, ~1.2 ms of a 9 ms decoding step at 8 rows; this, under 0.1 ms). A `SharedGenerator` gives
    this process's rows of a global batch's draw.
    """
    rows, vocab = probs.shape
    if isinstance(generator, SharedGenerator):
        u = generator.uniforms(rows).to(probs.device)
    else:
        u = torch.rand((rows, 1), dtype=torch.float64, generator=generator,
                       device=generator.device if generator is not None else probs.device).to(probs.device)
    full = vocab // SAMPLE_BLOCK                                                        # whole blocks; a shorter last
    mass = probs[:, :full * SAMPLE_BLOCK].reshape(rows, full, SAMPLE_BLOCK).sum(-1)     # (B, K) in probs' dtype
    if full * SAMPLE_BLOCK < vocab:
        mass = torch.cat([mass, probs[:, full * SAMPLE_BLOCK:].sum(-1, keepdim=True)], dim=1)
    cdf = mass.double().cumsum(-1)
    target = u * cdf[:, -1:]                                                            # (B, 1)
    k = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)         # the block it falls in
    before = torch.where(k > 0, cdf.gather(-1, (k - 1).clamp(min=0)), 0.0)              # the mass before it
    index = k * SAMPLE_BLOCK + torch.arange(SAMPLE_BLOCK, device=probs.device)          # (B, 256) its entries
    block = probs.gather(1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0.0)
    inner = torch.searchsorted(block.double().cumsum(-1) + before, target, right=True)[:, 0]
    # rounding can leave the draw past the block's own sum: then its last token of positive probability
    last = torch.where(block > 0, torch.arange(SAMPLE_BLOCK, device=probs.device), 0).amax(-1)
    inner = torch.where(inner >= SAMPLE_BLOCK, last, inner)
    return (k[:, 0] * SAMPLE_BLOCK + inner).clamp(max=vocab - 1)


def unique_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts (first-seen order) and, for each prompt, the index of its distinct copy."""
    seen: dict[tuple, int] = {}
    index = [seen.setdefault(tuple(p), len(seen)) for p in prompts]
    return [list(p) for p in seen], index


def _prefill(model, prompts: list[list[int]], pad_id: int, device, has_keep: bool):
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    attention = prompt_mask.long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                **({"logits_to_keep": 1} if has_keep else {}))
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return prompt_ids, prompt_mask, attention, positions, cache, out.logits[:, -1]


FEW_ROWS_PER_THREAD = 8  # decoding steps of at most this many rows per CPU thread take `_few_row_head`


@contextlib.contextmanager
def _few_row_head(model, rows: int):
    """While it is open, the model's output layer computes (W · hᵀ)ᵀ instead of h · Wᵀ — the same products —
    when a decoding step has few rows on a CPU: MKL runs a (32k × d) · (d × 8) product 1.5–2.5× faster than a
    (8 × d) · (d × 32k) one with the weight transposed, which at 4–16 rows is a quarter to a third of a whole
    decoding step of a small model (`benchmarks/decode.py`). Only a plain `nn.Linear` head on CPU (the same
    test as the fused log-softmax: no hooks, no sharded weights), and only for up to FEW_ROWS_PER_THREAD rows
    per thread (beyond that the plain product is as fast or faster); the model's own post-processing of its
    logits (soft-capping, scaling) runs as always, after its head."""
    from alignkit.models.logps import _unwrap
    from alignkit.models.vocab import fusable

    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    limit = FEW_ROWS_PER_THREAD * torch.get_num_threads()
    if head is None or not fusable(head) or head.weight.device.type != "cpu" or rows > limit:
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] > limit:  # a prompt pass of a model that computes every position's logits: plain
            return torch.nn.functional.linear(hidden, head.weight, head.bias)
        out = torch.mm(head.weight, flat.t()).t()
        if head.bias is not None:
            out = out + head.bias
        return out.contiguous().view(*hidden.shape[:-1], out.shape[-1])

    head.forward = forward
    try:
        yield
    finally:
        vars(head).pop("forward", None)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | SharedGenerator | None = None, on_step=None) -> Rollout:
    """Sample up to `max_new_tokens` per prompt (stopping a row at EOS) with a KV cache.

    Returns the tokens and log softmax(logits / temperature)[token] for each — the log-prob the policy gave
    the token when it was sampled (top-p only restricts which tokens can be drawn, as in TRL and vLLM).
    A prompt repeated in the batch (the K samples of RLOO/GRPO) is encoded once and its KV cache copied to
    every row that samples from it; the prompt pass computes the logits of the last position only.
    `on_step(token)`, if given, sees each step's (B,) tokens as they are sampled (pad_id in finished rows):
    the server streams text with it.
    """
    with _few_row_head(model, len(prompts)):
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        cache_kw, has_keep = _forward_kwargs(model)
        distinct, index = unique_prompts(prompts)
        prompt_ids, prompt_mask, attention, positions, cache, logits = _prefill(model, distinct, pad_id, device, has_keep)
        if len(distinct) < len(prompts):
            if hasattr(cache, "reorder_cache"):
                rows = torch.tensor(index, device=device)
                cache.reorder_cache(rows)  # index_select on the batch dimension of every layer
                prompt_ids, prompt_mask, attention, positions, logits = (
                    t.index_select(0, rows) for t in (prompt_ids, prompt_mask, attention, positions, logits))
            else:  # a cache that cannot be copied row-wise: encode every row
                prompt_ids, prompt_mask, attention, positions, cache, logits = _prefill(model, prompts, pad_id, device,
                                                                                        has_keep)
        batch = prompt_ids.shape[0]
        next_position = positions[:, -1] + 1
        tokens, logps = [], []
        alive = torch.ones(batch, dtype=torch.bool, device=device)
        alive_steps = []
        for _ in range(max_new_tokens):
            scaled = logits.float() if temperature == 1.0 else logits.float() / max(temperature, 1e-6)
            logp_all = scaled.log_softmax(-1)
            token = sample(top_p_filter(scaled, top_p).softmax(-1), generator)
            token = torch.where(alive, token, torch.full_like(token, pad_id))
            tokens.append(token)
            if on_step is not None:
                on_step(token)
            logps.append(torch.where(alive, logp_all.gather(-1, token.unsqueeze(-1)).squeeze(-1), 0.0))
            alive_steps.append(alive)
            alive = alive & (token != eos_id)
            if not bool(alive.any()) or len(tokens) == max_new_tokens:  # (no forward for logits nobody samples from)
                break
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=1)
            out = model(input_ids=token.unsqueeze(-1), attention_mask=attention,
                        position_ids=next_position.unsqueeze(-1), use_cache=True, **{cache_kw: cache})
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            logits = out.logits[:, -1]
            next_position = next_position + 1
        model.train(was_training)
        response_ids = torch.stack(tokens, dim=1)
        response_mask = torch.stack(alive_steps, dim=1)
        finished = (response_ids == eos_id).any(-1)
        return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.stack(logps, dim=1), finished)
