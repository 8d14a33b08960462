"""Gradient statistics for STA merges with `stamerge`.

from stamerge_grads import gradient_statistic, save_statistic, write_gradients
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__version__ = "0.1.0"

from .save import check_out_path, save_statistic, statistic_metadata
from .statistic import (
    LossFn,
    Names,
    Statistic,
    StatisticError,
    gradient_statistic,
)


def write_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    path: str | os.PathLike,
    mode: str = "abs",
    dtype: str | torch.dtype = "float32",
    names: Names = None,
    per_sample: str = "auto",
    metadata=None,
    *,
    vmap_bytes: int = 1 << 30,
) -> Statistic:
    """:func:`gradient_statistic` then :func:`save_statistic`; returns the statistic."""
    check_out_path(path)  # before the (long) gradient pass, not after it
    stats = gradient_statistic(
        model,
        loss_fn,
        batches,
        mode=mode,
        names=names,
        per_sample=per_sample,
        vmap_bytes=vmap_bytes,
    )
    save_statistic(stats, path, dtype=dtype, metadata=metadata)
    return stats


__all__ = [
    "Statistic",
    "StatisticError",
    "__version__",
    "gradient_statistic",
    "save_statistic",
    "statistic_metadata",
    "write_gradients",
]
