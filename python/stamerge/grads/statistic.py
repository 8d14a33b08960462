"""The gradient statistic of a task: per-sample absolute gradients or the summed gradient.

STA ranks a weight by |θ · G| where G = Σ_j |∂L_j/∂θ| over a task's calibration samples (mode
``abs``) or G = Σ_j ∂L_j/∂θ (mode ``sum``). The absolute value must be taken per sample, before
summing, so ``abs`` needs per-sample gradients: ``torch.func`` computes them for a whole batch at
once (``vmap`` over ``grad`` of a ``functional_call``); models that ``vmap`` cannot trace (data-
dependent control flow, ops without batching rules) fall back to one backward pass per sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from .options import MODES, PER_SAMPLE

NONE_REASON = "mapped to None by `names`"

Names = Union[None, Mapping[str, Optional[str]], Callable[[str], Optional[str]]]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class StatisticError(ValueError):
    """Bad input to the gradient tool (model, batches, loss function or names)."""


class Statistic(dict):
    """Checkpoint name -> fp32 gradient statistic (on the CPU), plus how it was made.

    Attributes: ``mode``; ``samples`` (count); ``mean_loss`` (mean per-sample loss, unweighted);
    ``skipped`` (name -> why a named parameter has no statistic: frozen, not a float tensor, mapped
    to None); ``per_sample`` ("vmap", "loop", or None in mode ``sum``); ``fallback`` (why the vmap
    path was given up, or None).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = "abs"
        self.samples = 0
        self.mean_loss = float("nan")
        self.skipped: dict[str, str] = {}
        self.per_sample: str | None = None
        self.fallback: str | None = None


class _LossModule(nn.Module):
    """Wraps model + loss_fn so that functional_call can swap the model's parameters while the
    user's loss function keeps calling the model as an ordinary module."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _normalise(batch, where: str):
    """Mappings (e.g. a tokenizer's BatchEncoding) become dicts so torch.func sees a pytree."""
    if isinstance(batch, Mapping):
        return {k: _normalise(v, f"{where}[{k!r}]") for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, torch.Size):
        return type(batch)(_normalise(v, f"{where}[{i}]") for i, v in enumerate(batch))
    return batch


def _leaves(batch):
    if isinstance(batch, dict):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


def _batch_size(batch, where: str) -> int:
    sizes = {t.shape[0] for t in _leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if not sizes:
        raise StatisticError(f"{where}: no tensor with a sample dimension (dim 0) in the batch")
    if len(sizes) > 1:
        raise StatisticError(
            f"{where}: tensors disagree on the sample dimension (dim 0 sizes {sorted(sizes)})"
        )
    return sizes.pop()


def _map(batch, fn):
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return fn(batch)


def _is_batched(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def _in_dims(batch):
    return _map(batch, lambda x: 0 if _is_batched(x) else None)


def _slice(batch, i: int, j: int):
    return _map(batch, lambda x: x[i:j] if _is_batched(x) else x)


def _unsqueeze(batch):
    # Inside vmap every batched leaf has lost its sample dim: give it back as a batch of one, so
    # loss_fn sees the same shapes as in the loop path.
    return _map(batch, lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x)


def _check_losses(losses, n: int, where: str) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        raise StatisticError(
            f"{where}: loss_fn returned {type(losses).__name__}, expected a tensor of per-sample losses"
        )
    if tuple(losses.shape) != (n,):
        raise StatisticError(
            f"{where}: loss_fn returned shape {tuple(losses.shape)}, expected per-sample losses of "
            f"shape ({n},) (one loss per sample, no reduction over the batch)"
        )
    return losses


def _resolve_names(model: nn.Module, names: Names):
    """Groups aliases of one parameter (tied weights) and maps each to checkpoint names.

    Returns (trainable: list of (param name, parameter, [checkpoint names])), skipped dict.
    """
    if names is None:
        rename = lambda n: n
    elif callable(names):
        rename = names
    elif isinstance(names, Mapping):
        rename = lambda n: names.get(n, n)
    else:
        raise StatisticError(
            f"names must be None, a mapping or a callable, not {type(names).__name__}"
        )
    groups: dict[int, tuple[str, nn.Parameter, list[str]]] = {}
    skipped: dict[str, str] = {}
    owner: dict[str, str] = {}
    dropped: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        target = rename(name)
        if target is None:
            skipped[name] = NONE_REASON
            dropped.setdefault(id(p), []).append(name)
            continue
        if not isinstance(target, str):
            raise StatisticError(f"names maps `{name}` to {target!r}, expected a string or None")
        if not p.is_floating_point():
            skipped[target] = f"not a float tensor ({p.dtype})"
            continue
        if not p.requires_grad:
            skipped[target] = "frozen (requires_grad is False)"
            continue
        first = groups.setdefault(id(p), (name, p, []))
        if target in owner and owner[target] != first[0]:
            raise StatisticError(
                f"names maps both `{owner[target]}` and `{name}` to `{target}`, which are "
                "different parameters"
            )
        owner[target] = first[0]
        if target not in first[2]:
            first[2].append(target)
    # A tied alias without a checkpoint name is no loss when another alias of it is written.
    for pid, aliases in dropped.items():
        if pid in groups:
            for a in aliases:
                del skipped[a]
    return list(groups.values()), skipped


def gradient_statistic(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    mode: str = "abs",
    names: Names = None,
    per_sample: str = "auto",
    *,
    vmap_bytes: int = 1 << 30,
) -> Statistic:
    """Σ over samples of |per-sample gradient| (``mode="abs"``) or of the gradient (``"sum"``).

    ``loss_fn(model, batch)`` returns the per-sample losses, shape ``[B]``; ``batches`` yields
    tensors, tuples/lists or dicts of tensors with the sample dim first (other leaves are passed
    through unchanged). ``names`` maps parameter names to checkpoint names (a dict: absent names
    are kept, None drops; a callable: returns the name or None). A parameter reachable under
    several names (tied weights) is differentiated once and written under every name.
    ``per_sample``: "auto" tries vmap and falls back to a per-sample loop, "vmap" or "loop"
    force one path. ``vmap_bytes`` bounds the per-sample gradients one vmap call holds: larger
    batches are split (at least one sample per call). The model runs in eval mode (no dropout);
    its train/eval state is restored.
    Returns a :class:`Statistic`: checkpoint name -> fp32 CPU tensor.
    """
    if mode not in MODES:
        raise StatisticError(f"mode must be one of {MODES}, not {mode!r}")
    if per_sample not in PER_SAMPLE:
        raise StatisticError(f"per_sample must be one of {PER_SAMPLE}, not {per_sample!r}")
    groups, skipped = _resolve_names(model, names)
    if not groups:
        raise StatisticError("the model has no trainable float parameter to take gradients of")
    params = [p for _, p, _ in groups]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    wrapper = _LossModule(model, loss_fn)
    # functional_call addresses parameters by their path inside the wrapper.
    fnames = [f"model.{n}" for n, _, _ in groups]

    def sample_loss(ps, sample):
        out = torch.func.functional_call(wrapper, ps, (_unsqueeze(sample),))
        loss = _check_losses(out, 1, "loss_fn (inside vmap)")[0]
        return loss, loss.detach()

    def vmap_batch(batch):
        ps = {n: p.detach() for n, p in zip(fnames, params)}
        with warnings.catch_warnings():
            # Ops without a batching rule run one sample at a time: slower, still exact.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, losses = torch.func.vmap(
                torch.func.grad(sample_loss, has_aux=True),
                in_dims=(None, _in_dims(batch)),
                randomness="error",
            )(ps, batch)
        for a, n in zip(acc, fnames):
            a.add_(grads[n].float().abs().sum(0))
        return losses.detach().double().sum().item()

    def loop_sample(sample):
        losses = _check_losses(wrapper(sample), 1, "loss_fn")
        gs = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        for a, g in zip(acc, gs):
            if g is not None:
                a.add_(g.float().abs())
        return losses.detach().double().sum().item()

    # Per sample, vmap holds each gradient in the parameter's dtype and its fp32 copy.
    per_sample_bytes = sum(p.numel() * (p.element_size() + 4) for p in params)
    chunk = max(1, vmap_bytes // max(1, per_sample_bytes))

    def abs_batch(batch, n):
        nonlocal path, fallback
        total, i = 0.0, 0
        while i < n:
            if path == "vmap":
                j = min(n, i + chunk)
                try:
                    # A chunk is accumulated whole or not at all, so a failure loses nothing.
                    total += vmap_batch(batch if (i, j) == (0, n) else _slice(batch, i, j))
                    i = j
                    continue
                except StatisticError:
                    raise
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                    if per_sample == "vmap":
                        raise
                    first = str(e).splitlines()[0] if str(e) else ""
                    fallback = f"{type(e).__name__}: {first[:160]}"
                    warnings.warn(
                        f"per-sample gradients with torch.func.vmap failed ({fallback}); "
                        "falling back to one backward pass per sample",
                        stacklevel=3,
                    )
                    path = "loop"
            total += loop_sample(_slice(batch, i, i + 1))
            i += 1
        return total

    def sum_batch(batch, n):
        losses = _check_losses(wrapper(batch), n, "loss_fn")
        gs = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        for a, g in zip(acc, gs):
            if g is not None:
                a.add_(g.float())
        return losses.detach().double().sum().item()

    path = None if mode == "sum" else ("loop" if per_sample == "loop" else "vmap")
    fallback = None
    samples = 0
    loss_total = 0.0
    was_training = model.training
    model.eval()
    try:
        for i, raw in enumerate(batches):
            batch = _normalise(raw, f"batch {i}")
            n = _batch_size(batch, f"batch {i}")
            if mode == "sum":
                loss_total += sum_batch(batch, n)
            else:
                loss_total += abs_batch(batch, n)
            samples += n
    finally:
        model.train(was_training)
    if samples == 0:
        raise StatisticError("no samples: the batches were empty")

    out = Statistic()
    for (_, _, targets), a in zip(groups, acc):
        cpu = a.cpu()
        for t in targets:
            out[t] = cpu
    out.mode = mode
    out.samples = samples
    out.mean_loss = loss_total / samples
    out.skipped = skipped
    out.per_sample = path
    out.fallback = fallback
    if not math.isfinite(out.mean_loss):
        warnings.warn(f"the mean loss is {out.mean_loss}", stacklevel=2)
    bad = [t for (_, _, ts), a in zip(groups, acc) if not torch.isfinite(a).all() for t in ts]
    if bad:
        # stamerge refuses non-finite scores unless the recipe sets `nonfinite_scores: zero`.
        warnings.warn(
            f"non-finite values in the statistic of {len(bad)} tensor(s): {', '.join(bad[:5])}",
            stacklevel=2,
        )
    return out
