"""Log-probabilities of target tokens straight from hidden states: the output layer, the log-softmax over the
vocabulary and the pick of each target in one autograd node, walked over the logits in row blocks.

    log p(y | h) = x_y − logsumexp(x),   x = (W h + b) / τ                     (M targets, V words)
    ∂/∂x        = onehot(y) − softmax(x)                                    (times the upstream gradient)
    ∂/∂h = (∂/∂x / τ) W,   ∂/∂W = (∂/∂x / τ)ᵀ h,   ∂/∂b = Σ_m ∂/∂x / τ

The matrix products are the ones autograd would run, once each, on the whole (M, V) block. What changes is
everything between them: autograd's log-softmax, gather and their backward make about ten passes over the
(M, V) logits, each allocating a fresh tensor of that size (with a 32k vocabulary and 2,048 targets, 262 MB
each time, paid again in page faults); here the log-sum-exp, the picked logit and the entropy are computed a
block of rows at a time while the block is in cache, and the backward writes the gradient of the logits into
the logits' own buffer (`LogitsTargets` owns it: it is nobody else's tensor) before the two products; a
second backward through the same graph (`retain_graph`) recomputes the logits from the saved inputs.
Without gradients (a reference or rollout pass) no (M, V) tensor outlives its block at all.

The numbers are those of `logits.float() / τ` → `logsumexp` → `gather`, in float32 at least (bf16 logits are
upcast, the products run in the head's dtype): `tests/test_vocab.py` checks values, entropies and every
gradient against that plain computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rows of logits per block: ~4 MB of float32 logits (32 rows of a 32k vocabulary: a core's share of the cache)
BLOCK_ELEMENTS = 2 ** 20
# rows of hidden states per matrix product when nothing is kept for a backward (~32 MB of logits a block)
MATMUL_BLOCK_ELEMENTS = 2 ** 23
# on an accelerator both are this (128 MB of float32 a block): there a block costs kernel launches, not cache
DEVICE_BLOCK_ELEMENTS = 2 ** 25


def _rows_per_block(vocab: int, device: torch.device, elements: int | None = None) -> int:
    if device.type != "cpu":
        elements = DEVICE_BLOCK_ELEMENTS
    return max(1, (BLOCK_ELEMENTS if elements is None else elements) // max(1, vocab))


def fusable(head) -> bool:
    """Whether `head` is a plain linear layer this module may read the weights of: exactly `nn.Linear`, plain
    parameters (not sharded DTensors: FSDP gathers those in the module's own hooks), no hooks of any kind."""
    module = torch.nn.modules.module
    return (type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter
            and (head.bias is None or type(head.bias) is torch.nn.Parameter)
            # a forward replaced on the instance: Accelerate's hooks (device_map, offloading) work that way
            and "forward" not in vars(head) and not hasattr(head, "_hf_hook")
            and not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks
                     or head._backward_pre_hooks)
            and not (module._global_forward_hooks or module._global_forward_pre_hooks
                     or module._global_backward_hooks or module._global_backward_pre_hooks))


def _stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: torch.Tensor | None):
    """(lse, picked) of `logits` (M, V) read at `temperature`, block by block; fills `entropy` (M,) if given."""
    m = logits.shape[0]
    lse = torch.empty(m, dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype,
                      device=logits.device)
    picked = torch.empty_like(lse)
    rows = _rows_per_block(logits.shape[1], logits.device)
    for start in range(0, m, rows):
        end = min(m, start + rows)
        x = logits[start:end].to(lse.dtype)
        if temperature != 1.0:
            x = x / temperature
        block_lse = torch.logsumexp(x, dim=-1)
        lse[start:end] = block_lse
        picked[start:end] = x.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1)
        if entropy is not None:  # H = lse − Σ p·x
            p = (x - block_lse.unsqueeze(-1)).exp_()
            entropy[start:end] = block_lse - (p * x).sum(-1)
    return lse, picked


class LogitsTargets(torch.autograd.Function):
    """(M,) log p(targets) from hidden states (M, H) and a linear head; see the module's docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, entropy):
        logits = F.linear(hidden, weight, bias)                                       # (M, V), the head's dtype
        lse, picked = _stats(logits, targets, temperature, entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        # (the logits are this node's own buffer, kept on ctx rather than saved: nothing else holds them)
        ctx.logits, ctx.logits_dtype, ctx.temperature = logits, logits.dtype, temperature
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # softmax(x) below is read from a buffer, not differentiated
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        logits, temperature = ctx.logits, ctx.temperature
        ctx.logits = None  # its buffer becomes the gradient below; a second backward (retain_graph) recomputes it
        if logits is None:  # in the forward's dtype (under autocast, bf16 products) so that `lse` still fits
            dtype = ctx.logits_dtype
            logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        g = grad.to(lse.dtype) / temperature                                          # (M,)
        rows = _rows_per_block(logits.shape[1], logits.device)
        for start in range(0, logits.shape[0], rows):  # the logits' buffer becomes their gradient, in place
            end = min(logits.shape[0], start + rows)
            x = logits[start:end].to(lse.dtype)
            if temperature != 1.0:
                x = x / temperature
            d = (x - lse[start:end].unsqueeze(-1)).exp_().mul_(-g[start:end].unsqueeze(-1))  # −g·softmax
            d.scatter_add_(-1, targets[start:end].unsqueeze(-1), g[start:end].unsqueeze(-1))  # + g·onehot
            logits[start:end] = d.to(logits.dtype)
        d_logits = logits
        grad_hidden = (d_logits @ weight.to(d_logits.dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (d_logits.t() @ hidden.to(d_logits.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = d_logits.sum(0, dtype=torch.promote_types(d_logits.dtype, torch.float32)).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def head_target_logps(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, entropy: list | None = None) -> torch.Tensor:
    """(M,) log softmax(head(hidden) / temperature)[targets] for hidden states (M, H) and a `fusable` head.
    Pass a list as `entropy` to receive the (M,) entropies (no gradient) as well."""
    out_entropy = None
    if entropy is not None:
        out_entropy = torch.empty(hidden.shape[0], dtype=torch.float32 if hidden.dtype != torch.float64
                                  else torch.float64, device=hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad
                                    or (head.bias is not None and head.bias.requires_grad)):
        values = LogitsTargets.apply(hidden, head.weight, head.bias, targets, temperature, out_entropy)
    else:  # nothing to keep: one block of logits at a time
        rows = _rows_per_block(head.weight.shape[0], hidden.device, MATMUL_BLOCK_ELEMENTS)
        lse_parts, picked_parts = [], []
        for start in range(0, hidden.shape[0], rows):
            block = F.linear(hidden[start:start + rows], head.weight, head.bias)
            part = None if out_entropy is None else out_entropy[start:start + rows]
            lse, picked = _stats(block, targets[start:start + rows], temperature, part)
            lse_parts.append(lse)
            picked_parts.append(picked)
        values = (torch.cat(picked_parts) - torch.cat(lse_parts)) if picked_parts else \
            hidden.new_zeros(0, dtype=out_entropy.dtype if out_entropy is not None else torch.float32)
    if entropy is not None:
        entropy.append(out_entropy)
    return values
