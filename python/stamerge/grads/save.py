"""Writing a statistic as the safetensors file that `stamerge` reads for STA (`gradients:`)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from .statistic import Statistic, StatisticError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16):
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise StatisticError(f"dtype must be float32 or bfloat16, not {dtype!r}")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc, 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise StatisticError(
            f"{path}: the output must be a `.safetensors` file (stamerge reads gradient "
            "statistics by that extension)"
        )
    return path


def statistic_metadata(stats: Mapping) -> dict[str, str]:
    """The `__metadata__` entries that say how a :class:`Statistic` was made."""
    from .. import __version__

    # The key keeps the tool's old name: files written before it moved into stamerge carry it.
    md = {"format": "pt", "stamerge_grads_version": __version__}
    if isinstance(stats, Statistic):
        md.update(
            mode=stats.mode,
            samples=str(stats.samples),
            mean_loss=repr(stats.mean_loss),
        )
        if stats.per_sample:
            md["per_sample"] = stats.per_sample
        if stats.skipped:
            md["skipped"] = ",".join(sorted(stats.skipped))
    return md


def save_statistic(
    stats: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``stats`` (name -> tensor) to ``path`` (a ``.safetensors`` file), as float32 or
    bfloat16 (round to nearest even). The metadata records mode, sample count, mean loss and the
    tool's version when ``stats`` is a :class:`Statistic`; ``metadata`` adds or overrides entries.
    The file appears complete or not at all (written beside it, then renamed)."""
    path = check_out_path(path)
    to = _dtype(dtype)
    if not stats:
        raise StatisticError(f"{path}: nothing to write (the statistic is empty)")
    tensors = {}
    for name, t in stats.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StatisticError(f"{path}: `{name}` is not a float tensor")
        # Tied names share one tensor; safetensors refuses shared storage, so each gets a copy.
        tensors[name] = t.detach().to(device="cpu", dtype=to).clone().contiguous()
    md = statistic_metadata(stats)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise StatisticError(f"{path}: metadata keys and values must be strings ({k!r}: {v!r})")
        md[k] = v
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StatisticError(f"{path}: the folder {folder} does not exist")
    tmp = os.path.join(folder, f".stamerge_grads.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        save_file(tensors, tmp, metadata=md)
        # safetensors writes through a private (0600) temporary file of its own; the statistic
        # gets the user's umask like any other output (0644 under the usual 022).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
