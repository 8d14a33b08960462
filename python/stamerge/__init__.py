"""stamerge: merge fine-tuned checkpoints of one model (STA, TIES, DARE, task arithmetic).

    import stamerge
    plan = stamerge.plan("examples/sta.yml")            # headers only; raises PlanError
    report = stamerge.merge("examples/sta.yml", "out/sta-merged", overwrite=True)

The API calls the Rust library directly (not the command line): the same checks, plan, merge
and report as ``stamerge plan`` / ``stamerge merge``. A recipe is a path, YAML text, or a dict in
the recipe's shape (paths in text and dicts are relative to the current folder). Log lines go to
Python's ``logging`` (logger ``stamerge``). The gradient tool is ``stamerge.grads`` (the
``grads`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from . import _native
from ._native import CancelToken

__version__: str = _native.__version__
#: Whether this build carries the CUDA kernels (built with nvcc); without them merges run on the CPU.
has_kernels: bool = _native.has_kernels

Recipe = Union[str, "os.PathLike[str]", Mapping[str, Any]]
Size = Union[int, str]
ProgressFn = Callable[[int, int, float], Any]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, naming the file and tensor where there is one."""

    message: str
    file: str | None = None
    tensor: str | None = None

    def __str__(self) -> str:
        where = self.file or ""
        if self.tensor:
            where = f"{where}: tensor `{self.tensor}`" if where else f"tensor `{self.tensor}`"
        return f"{where}: {self.message}" if where else self.message


class StamergeError(Exception):
    """A stamerge failure; ``problems`` lists what was found wrong (may be empty)."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems: list[Problem] = problems or []


class PlanError(StamergeError):
    """Every problem found in the recipe, its inputs and the output folder, at once, before any
    heavy work: nothing was written (also raised by :func:`inspect` for an unreadable checkpoint)."""


class Interrupted(StamergeError):
    """The merge was cancelled (``CancelToken.cancel()``): the output folder was left as it was."""


def _raise(e: Exception) -> None:
    kind, message, problems = e.args
    ps = [Problem(message=m, file=f, tensor=t) for f, t, m in problems]
    cls = {"plan": PlanError, "unreadable": PlanError, "interrupted": Interrupted}
    raise cls.get(kind, StamergeError)(message, ps) from None


def _recipe(recipe: Recipe) -> tuple[str, str]:
    """(kind, value) for the native layer: a file, YAML text or a dict as JSON."""
    if isinstance(recipe, Mapping):
        return "json", json.dumps(recipe)
    if isinstance(recipe, os.PathLike):
        return "path", os.fspath(recipe)
    if isinstance(recipe, str):
        # An existing file is a path; text with a newline or a `key: value` is YAML; anything
        # else is a path, so that a typo reads "cannot read recipe", not a YAML error.
        if os.path.isfile(recipe) or ("\n" not in recipe and ": " not in recipe):
            return "path", recipe
        return "yaml", recipe
    raise TypeError(f"recipe must be a path, YAML text or a dict, not {type(recipe).__name__}")


def parse_size(size: Size) -> int:
    """Bytes from an int or a size as the CLI reads it: "5GB", "500MB", "2GiB"."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"a size is an int or a string like '5GB', not {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive: {size}")
        return size
    return _native.parse_size(size)


@dataclass(frozen=True)
class PlanTask:
    """One task vector of the plan: a ``models`` entry, or a ``forget`` one."""

    field: str
    model: str
    gradients: str | None
    #: The per-model parameters the method reads (weight, density, ...), as the recipe sets them
    #: (its own value, else the top level's, else the default), written as text: a value may be
    #: a per-layer list or a filter list, resolved per tensor (``stamerge plan`` shows those).
    parameters: dict[str, str]
    forget: bool


@dataclass(frozen=True)
class PlanTensor:
    name: str
    action: str  # "merge" or "copy"
    shape: tuple[int, ...]
    dtype: str
    #: Entries kept per task (top-k methods); None for a copy or a task that keeps everything.
    k: tuple[int | None, ...] | None


@dataclass(frozen=True)
class Estimate:
    tensors_merged: int
    tensors_copied: int
    params_merged: int
    passes: int
    passes_cuda: int
    read_bytes: int
    read_bytes_cuda: int
    write_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class Plan:
    """What ``stamerge plan`` prints: the tasks, each tensor's action, the estimates."""

    method: str
    base: str
    start: str | None
    tasks: list[PlanTask]
    tensors: list[PlanTensor]
    estimate: Estimate
    shards: list[str]
    notes: list[str]

    @classmethod
    def _from(cls, d: dict) -> Plan:
        return cls(
            method=d["method"],
            base=d["base"],
            start=d["start"],
            tasks=[PlanTask(**t) for t in d["tasks"]],
            tensors=[
                PlanTensor(
                    name=t["name"],
                    action=t["action"],
                    shape=tuple(t["shape"]),
                    dtype=t["dtype"],
                    k=None if t["k"] is None else tuple(t["k"]),
                )
                for t in d["tensors"]
            ],
            estimate=Estimate(**d["estimate"]),
            shards=d["shards"],
            notes=d["notes"],
        )


@dataclass(frozen=True)
class Report:
    """The merge's report (``stamerge_report.json`` in the output folder, as Python objects).
    ``tensors`` holds its per-tensor rows (k, thresholds, entries kept, mask overlaps) as dicts."""

    stamerge_version: str
    method: str
    backend: str
    threads: int
    output: str
    shards: list[str]
    seconds: float
    bytes_read: int
    bytes_written: int
    gb_per_s: float
    peak_rss_anon_bytes: int
    notes: list[str]
    inputs: list[dict] = field(repr=False)
    tensors: list[dict] = field(repr=False)
    model_selection: list[dict] = field(repr=False)
    #: The whole report as written to the JSON file.
    raw: dict = field(repr=False)

    @classmethod
    def _from(cls, d: dict) -> Report:
        names = {f for f in cls.__dataclass_fields__ if f != "raw"}
        return cls(**{k: d.get(k) for k in names}, raw=d)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str


@dataclass(frozen=True)
class Checkpoint:
    """What ``stamerge inspect`` shows; ``str()`` gives its table."""

    path: str
    files: list[str]
    tensors: list[Tensor]
    vocab_size: int | None
    text: str = field(repr=False)

    @property
    def parameters(self) -> int:
        n = 0
        for t in self.tensors:
            p = 1
            for d in t.shape:
                p *= d
            n += p
        return n

    def __str__(self) -> str:
        return self.text


def plan(
    recipe: Recipe,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    out_shard_size: Size = "5GB",
) -> Plan:
    """Checks a recipe and its inputs from headers only, as ``stamerge plan``. With ``out_dir``
    the output folder is checked too. Raises :class:`PlanError` listing every problem."""
    kind, value = _recipe(recipe)
    out = None if out_dir is None else os.fspath(out_dir)
    try:
        text = _native.plan(kind, value, out, overwrite, parse_size(out_shard_size))
    except _native.NativeError as e:
        _raise(e)
    return Plan._from(json.loads(text))


def merge(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    threads: int | None = None,
    max_memory: Size | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    out_shard_size: Size = "5GB",
    verify: bool = False,
    report: str | os.PathLike | None = None,
) -> Report:
    """Merges as ``stamerge merge RECIPE OUT_DIR``; returns the report.

    ``device``: "auto" (CUDA when a GPU and the kernels are there), "cpu" or "cuda". ``threads``:
    CPU worker threads (default: every core). ``max_memory``: the GPU budget (bytes or "40GiB").
    ``progress(bytes_done, total, bytes_per_second)`` is called from this thread as the merge
    advances (its last call has ``bytes_done == total``); an exception it raises stops the merge
    and is re-raised. Ctrl-C stops the merge after the current tensor, removes the partial output
    and raises ``KeyboardInterrupt``; ``cancel.cancel()`` (from any thread) does the same and
    raises :class:`Interrupted`. Either way an existing output folder is left as it was.

    Raises :class:`PlanError` (every problem, before any heavy work) or :class:`StamergeError`.
    """
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int, not {threads!r}")
    if cancel is not None and not isinstance(cancel, CancelToken):
        raise TypeError("cancel must be a stamerge.CancelToken")
    kind, value = _recipe(recipe)
    try:
        text = _native.merge(
            kind,
            value,
            os.fspath(out_dir),
            device,
            threads,
            None if max_memory is None else parse_size(max_memory),
            parse_size(out_shard_size),
            overwrite,
            verify,
            None if report is None else os.fspath(report),
            progress,
            cancel,
        )
    except _native.NativeError as e:
        _raise(e)
    return Report._from(json.loads(text))


def inspect(path: str | os.PathLike) -> Checkpoint:
    """The tensors of a checkpoint folder (sharded or not) or one safetensors file, from its
    headers. Raises :class:`PlanError` for an unreadable checkpoint."""
    try:
        text = _native.inspect(os.fspath(path))
    except _native.NativeError as e:
        _raise(e)
    d = json.loads(text)
    return Checkpoint(
        path=d["path"],
        files=d["files"],
        tensors=[
            Tensor(
                name=t["name"],
                dtype=t["dtype"],
                shape=tuple(t["shape"]),
                nbytes=t["nbytes"],
                file=t["file"],
            )
            for t in d["tensors"]
        ],
        vocab_size=d["vocab_size"],
        text=d["text"],
    )


__all__ = [
    "CancelToken",
    "Checkpoint",
    "Estimate",
    "Interrupted",
    "Plan",
    "PlanError",
    "PlanTask",
    "PlanTensor",
    "Problem",
    "Report",
    "StamergeError",
    "Tensor",
    "__version__",
    "has_kernels",
    "inspect",
    "merge",
    "parse_size",
    "plan",
]
