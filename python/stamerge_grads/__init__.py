"""Gradient statistics for STA merges with `stamerge`.

    from stamerge_grads import gradient_statistic, save_statistic, write_gradients
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Union

import torch
from torch import nn

__version__ = "0.1.0"

from .save import check_out_path, save_statistic, statistic_metadata  # noqa: E402
from .statistic import (  # noqa: E402
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
    path: Union[str, os.PathLike],
    mode: str = "abs",
    dtype: Union[str, torch.dtype] = "float32",
    names: Names = None,
    per_sample: str = "auto",
    metadata=None,
) -> Statistic:
    """:func:`gradient_statistic` then :func:`save_statistic`; returns the statistic."""
    check_out_path(path)  # before the (long) gradient pass, not after it
    stats = gradient_statistic(model, loss_fn, batches, mode=mode, names=names, per_sample=per_sample)
    save_statistic(stats, path, dtype=dtype, metadata=metadata)
    return stats


__all__ = [
    "Statistic",
    "StatisticError",
    "gradient_statistic",
    "save_statistic",
    "statistic_metadata",
    "write_gradients",
    "__version__",
]
