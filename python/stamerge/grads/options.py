"""The gradient tool's choices and its dependency check: standard library only, so that `--help`,
`--version` and the message naming the missing extra work where PyTorch is not installed."""

from __future__ import annotations

import importlib

MODES = ("abs", "sum")
PER_SAMPLE = ("auto", "vmap", "loop")
TASKS = ("causal-lm", "seq-cls")

# `pip install stamerge` installs the merger alone; the gradient tool's dependencies are the
# `grads` extra, so that merging never pulls in PyTorch.
INSTALL = "pip install 'stamerge[grads]' (in a source checkout: pip install '.[grads]')"
API_NEEDS = ("torch", "safetensors", "numpy")
CLI_NEEDS = API_NEEDS + ("transformers",)


class MissingDependency(ImportError):
    """A module of the `grads` extra is not installed."""


def missing(modules: tuple[str, ...]) -> dict[str, str]:
    """The modules of ``modules`` that cannot be imported, with the import error of each."""
    out = {}
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            out[m] = str(e)
    return out


def message(what: str, gone: dict[str, str]) -> str:
    names = ", ".join(gone)
    return (
        f"{what} needs {names}, which is not installed: `pip install stamerge` leaves PyTorch "
        f"and transformers out so that merging never pulls them in. Install the extra: {INSTALL}"
    )


def require(what: str, modules: tuple[str, ...]) -> None:
    """Raises :class:`MissingDependency` naming the extra to install when a module is missing."""
    gone = missing(modules)
    if gone:
        raise MissingDependency(message(what, gone))
