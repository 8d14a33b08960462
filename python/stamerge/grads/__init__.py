"""Gradient statistics for STA merges with `stamerge` (the `grads` extra: PyTorch).

from stamerge.grads import gradient_statistic, save_statistic, write_gradients

Importing this package needs nothing beyond stamerge; the names below import PyTorch when first
used, and say which extra to install when it is missing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import __version__
from .options import API_NEEDS, MissingDependency, require

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .save import check_out_path, save_statistic, statistic_metadata
    from .statistic import LossFn, Names, Statistic, StatisticError, gradient_statistic

# name -> the submodule that defines it (each imports torch).
_LAZY = {
    "check_out_path": "save",
    "save_statistic": "save",
    "statistic_metadata": "save",
    "LossFn": "statistic",
    "Names": "statistic",
    "Statistic": "statistic",
    "StatisticError": "statistic",
    "gradient_statistic": "statistic",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("stamerge.grads", API_NEEDS)
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


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
    require("stamerge.grads", API_NEEDS)
    from .save import check_out_path, save_statistic
    from .statistic import gradient_statistic

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
    "MissingDependency",
    "Statistic",
    "StatisticError",
    "__version__",
    "check_out_path",
    "gradient_statistic",
    "save_statistic",
    "statistic_metadata",
    "write_gradients",
]
