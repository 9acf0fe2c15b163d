"""Mixed precision for every forward: float32 master weights, the forward in bf16 under autocast where asked
(`alignkit.models.load.training_dtypes` decides which)."""

from __future__ import annotations

import contextlib

import torch

from alignkit.models.load import default_device


def autocast_context(dtype: torch.dtype | None):
    """`torch.autocast` to `dtype` on the default device; a no-op for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=default_device().type, dtype=dtype)
