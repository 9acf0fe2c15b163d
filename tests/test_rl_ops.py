"""alignkit.rl.ops: masked reductions against oracles on the valid entries, and no NaN leaking from padding."""

import pytest
import torch

from alignkit.rl.ops import masked_mean, masked_sum, masked_var, masked_whiten

F64 = torch.float64


def close(actual, expected, rtol=1e-12, atol=1e-14):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


@pytest.fixture
def batch():
    """(x, mask) with ragged rows (lengths 5, 2, 4, 0) and NaN in every masked-out slot."""
    torch.manual_seed(0)
    mask = torch.arange(5) < torch.tensor([5, 2, 4, 0])[:, None]  # (4, 5)
    x = torch.where(mask, torch.randn(4, 5, dtype=F64) * 3 + 1, torch.nan)
    return x, mask


def test_masked_sum_and_mean_hand_values():
    """x = [[1, 2, 100], [4, inf, nan]], valid = [[T, T, F], [T, F, F]]: sum 1 + 2 + 4 = 7, mean 7/3;
    per row sums (3, 4), means (1.5, 4)."""
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, float("inf"), float("nan")]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(masked_sum(x, mask), 7.0)
    close(masked_mean(x, mask), 7.0 / 3.0)
    close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0]))
    close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))
    close(masked_sum(x, mask, dim=0), torch.tensor([5.0, 2.0, 0.0]))


def test_masked_reductions_match_oracle_and_ignore_nan(batch):
    x, mask = batch
    valid = x[mask]
    close(masked_sum(x, mask), valid.sum())
    close(masked_mean(x, mask), valid.mean())
    for b in range(x.shape[0]):
        row = x[b][mask[b]]
        close(masked_sum(x, mask, dim=1)[b], row.sum())
        # an empty row (b = 3) has mean 0, not NaN
        close(masked_mean(x, mask, dim=1)[b], row.mean() if len(row) else 0.0)
    close(masked_var(x, mask), valid.var(unbiased=True))
    close(masked_var(x, mask, unbiased=False), valid.var(unbiased=False))


def test_masked_var_hand_value_and_too_few_entries():
    """Valid entries (1, 2, 4): mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9; unbiased var 42/18 = 7/3,
    biased 42/27 = 14/9."""
    x = torch.tensor([1.0, 2.0, float("nan"), 4.0], dtype=F64)
    mask = torch.tensor([True, True, False, True])
    close(masked_var(x, mask), 7.0 / 3.0)
    close(masked_var(x, mask, unbiased=False), 14.0 / 9.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([True, False, False, False]))


def test_masked_whiten_matches_oracle(batch):
    x, mask = batch
    valid = x[mask]
    mean, std = valid.mean(), (valid.var() + 1e-8).sqrt()
    whitened = masked_whiten(x, mask)
    close(whitened[mask], (valid - mean) / std)
    assert (whitened[~mask] == 0).all()
    close(masked_mean(whitened, mask), 0.0)
    close(masked_var(whitened, mask), 1.0, rtol=1e-7)  # 1e-8 eps in the denominator
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    close(kept_mean[mask], (valid - mean) / std + mean)


def test_whitening_fewer_than_two_entries_centres_only():
    """One valid entry has no variance: whitening centres it (→ 0) or, keeping the mean, leaves it; no error."""
    x = torch.tensor([[3.0, float("nan")], [7.0, 1.0]], dtype=F64)
    one = torch.tensor([[True, False], [False, False]])
    assert masked_whiten(x, one).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert masked_whiten(x, one, shift_mean=False).tolist() == [[3.0, 0.0], [0.0, 0.0]]
    assert masked_whiten(x, torch.zeros_like(one)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_gradients_do_not_leak_from_padding(batch):
    """NaN in padded slots: outputs and gradients stay finite, and the padding gets zero gradient."""
    x, mask = batch
    x = x.clone().requires_grad_()
    total = masked_sum(x, mask) + masked_mean(x, mask, dim=1).sum() + masked_var(x, mask)
    total = total + (masked_whiten(x, mask) ** 3).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
