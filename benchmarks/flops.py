"""The FLOPs each trainer's maths needs, and the machine's matmul peak: utilisation = needed FLOPs / time / peak.

Convention (the same for alignkit and TRL, so that both sides' utilisation divides the same work):

- N is the trunk: the weights of the decoder's matmuls (q, k, v, o and the MLP's gate, up, down in every
  layer). Embedding look-ups and norms do no matmul and count nothing.
- A forward pass costs 2·N per token position, plus attention: 2·2·head_dim·heads per (query, key) pair in
  every layer (QKᵀ and the weighted sum of V), counted causally (a position attends to itself and the ones
  before it, no more).
- The output projection (2·d·V per position) counts only at positions whose next-token distribution the maths
  needs: the targets of a log-prob and every sampled token. A prompt position that predicts nothing needs no
  logits. A scalar head (reward, value) counts 2·d at the positions it is read.
- Training a position costs 3× its forward (backward = 2× forward: gradients of inputs and of weights).
- Each distinct prefix counts once: the prompt shared by chosen and rejected (DPO, reward), or by the samples
  of one prompt (GRPO), is one forward. A library that repeats it does more work than the maths needs, which
  shows as lower utilisation.
- A causal LM's log-prob of a sequence of length T needs T-1 positions (the last token predicts nothing).

Token counts come from the benchmark's tokenizer: `<s>` + prompt words, then response words + `</s>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    """What the FLOP model needs of a decoder."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        heads = config["num_attention_heads"]
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   intermediate=config["intermediate_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"])

    @classmethod
    def from_folder(cls, path: str | Path) -> Shape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    @property
    def trunk(self) -> int:
        """N: matmul weights of all decoder layers (Llama: q, k, v, o, gate, up, down)."""
        d, attn, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (d * attn + 2 * d * kv + attn * d + 3 * d * self.intermediate)

    @property
    def params(self) -> int:
        """Trunk plus input and output embeddings (untied): the size a user would quote."""
        return self.trunk + 2 * self.vocab * self.hidden


def forward(shape: Shape, new: int, past: int = 0, logits: int = 0, scores: int = 0) -> int:
    """Forward FLOPs of `new` positions that follow `past` positions (already computed, e.g. a shared prompt
    or a KV cache): 2·N each, attention over past + own causal keys, `logits` output projections, `scores`
    scalar heads."""
    pairs = new * past + new * (new + 1) // 2  # (query, key) pairs: position past+i sees past+i+1 keys
    attention = 4 * shape.layers * shape.heads * shape.head_dim * pairs
    return 2 * shape.trunk * new + attention + 2 * shape.hidden * shape.vocab * logits + 2 * shape.hidden * scores


def train(shape: Shape, new: int, past: int = 0, logits: int = 0, scores: int = 0) -> int:
    """Forward and backward: 3× the forward."""
    return 3 * forward(shape, new, past, logits, scores)


def pair(shape: Shape, prompt: int, chosen: int, rejected: int, trained: bool, logits: bool = True) -> int:
    """A preference pair with the prompt computed once: log-probs of both responses (DPO: `logits`) or their
    scores at the last token (reward model: `logits=False`)."""
    pass_ = train if trained else forward
    if logits:  # log-probs: T-1 positions per sequence, a target at each response token
        return (pass_(shape, prompt) + pass_(shape, chosen - 1, prompt, logits=chosen)
                + pass_(shape, rejected - 1, prompt, logits=rejected))
    return (pass_(shape, prompt) + pass_(shape, chosen, prompt, scores=1)
            + pass_(shape, rejected, prompt, scores=1))


def sft(shape: Shape, prompt: int, completion: int) -> int:
    """One trained example: prompt, then completion tokens as targets (T-1 positions)."""
    return train(shape, prompt + completion - 1, logits=completion)


def generate(shape: Shape, prompt: int, samples: int, new_tokens: int) -> int:
    """Sampling `samples` completions of `new_tokens` from one prompt with a KV cache: the prompt once, then
    new_tokens-1 fed-back tokens per sample; a full vocabulary projection for every sampled token."""
    fed = new_tokens - 1
    return (forward(shape, prompt) + samples * forward(shape, fed, prompt)
            + 2 * shape.hidden * shape.vocab * samples * new_tokens)


def group_logps(shape: Shape, prompt: int, samples: int, new_tokens: int, trained: bool) -> int:
    """Log-probs of `samples` completions of one prompt (the prompt once): trained (policy) or not (reference)."""
    pass_ = train if trained else forward
    return pass_(shape, prompt) + samples * pass_(shape, new_tokens - 1, prompt, logits=new_tokens)


def group_values(shape: Shape, prompt: int, samples: int, new_tokens: int, trained: bool) -> int:
    """A scalar head (value or reward model) read at every completion position (value) of `samples` completions."""
    pass_ = train if trained else forward
    return pass_(shape, prompt) + samples * pass_(shape, new_tokens, prompt, scores=new_tokens)


def grpo_step(shape: Shape, prompts: list[int], samples: int, new_tokens: int, reference: bool = True) -> int:
    """One GRPO/RLOO step (one update per rollout, so the rollout's log-probs are the trained pass's own,
    detached): generation, the reference's log-probs, the policy's trained log-probs."""
    total = 0
    for p in prompts:
        total += generate(shape, p, samples, new_tokens) + group_logps(shape, p, samples, new_tokens, True)
        if reference:
            total += group_logps(shape, p, samples, new_tokens, False)
    return total


def ppo_step(shape: Shape, prompts: list[int], new_tokens: int, value_shape: Shape | None = None,
             reward_shape: Shape | None = None) -> int:
    """One PPO step, one epoch, one minibatch: generation, reference log-probs, the reward model's score (last
    token), the value model's rollout values, then the policy's and the value model's trained passes."""
    value_shape, reward_shape = value_shape or shape, reward_shape or shape
    total = 0
    for p in prompts:
        total += (generate(shape, p, 1, new_tokens) + group_logps(shape, p, 1, new_tokens, False)
                  + forward(reward_shape, p + new_tokens, scores=1)
                  + group_values(value_shape, p, 1, new_tokens, False)
                  + group_logps(shape, p, 1, new_tokens, True) + group_values(value_shape, p, 1, new_tokens, True))
    return total


# ------------------------------------------------------------------------------------------------ peak
_PEAK = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n, best = int(sys.argv[2]), float("inf")
a, b = torch.randn(n, n), torch.randn(n, n)
torch.mm(a, b)
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); torch.mm(a, b); best = min(best, time.perf_counter() - t)
print(2 * n ** 3 / best)
"""


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5, python: str = sys.executable) -> float:
    """FLOP/s of the best of `repeats` float32 n×n `torch.mm`, in a fresh process with `threads` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([python, "-c", _PEAK, str(threads), str(n), str(repeats)], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip())
