"""Masked reductions over padded (B, T) tensors: the one home for masked sum, mean, variance and whitening.

Masks are bool and True means "takes part". Masked-out entries are selected away with `torch.where`, never
multiplied by zero, so a NaN or inf sitting in a padded slot cannot leak into a result or a gradient
(NaN * 0 is NaN). The selection happens before any nonlinearity: where's backward sends 0 to the padding,
but a later op's backward would multiply that 0 by a NaN local derivative.
"""

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over entries where `mask` is True; over everything if `dim` is None, else along `dim`."""
    kept = torch.where(mask, x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over entries where `mask` is True. An empty selection gives 0, not NaN, so one row with
    no valid tokens cannot poison a batch."""
    count = mask.expand_as(x).sum() if dim is None else mask.expand_as(x).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all entries where `mask` is True (Bessel-corrected if `unbiased`).

    Raises ValueError when the selection is too small to define a variance (0 entries, or 1 if unbiased).
    """
    count = int(mask.expand_as(x).sum())  # one host sync; whitening happens once per rollout
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid entries, got {count}")
    centered = torch.where(mask, x - masked_mean(x, mask), torch.zeros_like(x))
    return masked_sum(centered**2, mask) / (count - 1 if unbiased else count)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, across=None
) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) with mean and unbiased var over the valid entries; with
    `shift_mean=False` the mean is added back (only the scale changes). Masked-out entries are 0.

    With fewer than 2 valid entries there is no variance to scale by: x is only centred (a single entry
    whitens to 0), or, with `shift_mean=False`, left as it is (e.g. a rollout of one response token).

    `across(values) -> values`: sums over the processes that hold the rest of the batch (`Processes.sum`); the
    mean and variance are then the whole batch's, computed in the same two passes (mean, then centred squares)."""
    x = torch.where(mask, x, torch.zeros_like(x))
    if across is not None:
        count, total = across([float(mask.expand_as(x).sum()), float(masked_sum(x.double(), mask))])
        mean = torch.tensor(total / max(count, 1.0), dtype=x.dtype, device=x.device)
        if count >= 2:
            centred = torch.where(mask, x.double() - mean.double(), 0.0)
            var = torch.tensor(across([float((centred**2).sum())])[0] / (count - 1), dtype=x.dtype, device=x.device)
    else:
        count, mean = int(mask.expand_as(x).sum()), masked_mean(x, mask)
        if count >= 2:
            var = masked_var(x, mask)
    if count < 2:
        return torch.where(mask, x - mean if shift_mean else x, torch.zeros_like(x))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))
