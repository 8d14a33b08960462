"""Recipes for every method and validation grid point, run through the `stamerge` binary."""

import json
import os
import shutil
import subprocess

# Validation grids, sized for a shared 2-core CPU (each point is a merge plus a 7-task validation
# pass). λ scales the summed task vectors (linear methods) or their sign-agreed mean (TIES,
# DARE-TIES), hence the different ranges. STA's default gets a density sweep; the other sparse
# methods and STA's variants are searched at the usual operating density.
LINEAR_LAMBDAS = [0.3, 0.5, 0.7, 1.0]
SPARSE_LAMBDAS = [0.5, 1.0, 1.5, 2.0]
MEAN_LAMBDAS = [1.0, 1.5]

# method key -> (merge_method, fixed parameters, densities, lambdas)
METHODS = {
    "task_arithmetic": ("task_arithmetic", {}, [None], LINEAR_LAMBDAS),
    "ties": ("ties", {}, [0.2], MEAN_LAMBDAS),
    "magnitude": ("magnitude", {}, [0.2], SPARSE_LAMBDAS),
    "dare_ties": ("dare_ties", {"seed": 0}, [0.2], MEAN_LAMBDAS),
    # STA's default configuration: per-tensor selection, importance |θ_t · G_t|.
    "sta": ("sta", {"selection": "tensor", "importance": "finetuned"}, [0.05, 0.1, 0.2], SPARSE_LAMBDAS),
    "sta_model": ("sta", {"selection": "model", "importance": "finetuned"}, [0.1], SPARSE_LAMBDAS),
    "sta_task_vector": ("sta", {"selection": "tensor", "importance": "task_vector"}, [0.1], SPARSE_LAMBDAS),
    # Issue 22: the paper's selection as stamerge's options (docs/SEMANTICS.md, "sta's selection
    # options"): per-tensor normalisation, a threshold instead of a density (its grid axis is the
    # threshold), disjoint masks, and TALL-style consensus.
    "sta_max_exclusive": ("sta", {"normalize_importance": "max", "overlap": "exclusive"}, [0.1], SPARSE_LAMBDAS),
    "sta_threshold": ("sta", {"normalize_importance": "mean"}, [2.0, 4.0], SPARSE_LAMBDAS),
    "sta_consensus": ("sta", {"overlap": "consensus", "consensus": 2}, [0.2], SPARSE_LAMBDAS),
    # Fisher-weighted averaging of the models (no λ), with the `--mode sq` statistic.
    "fisher": ("fisher", {}, [None], [1.0]),
}
NEEDS_GRADIENTS = {k for k, v in METHODS.items() if v[0] in ("sta", "fisher")}
# The statistic each method reads: sq (Σ g²) for fisher, abs (Σ |g|) for sta.
SQ_GRADIENTS = {k for k, v in METHODS.items() if v[0] == "fisher"}
# The grid's first axis: the density, or sta's threshold.
AXIS = {"sta_threshold": "threshold"}


def grid(method):
    _, _, densities, lambdas = METHODS[method]
    return [(d, lam) for d in densities for lam in lambdas]


def default_point(method):
    """The untuned configuration, for the robustness figures: λ = 1 (mergekit's default, and the
    STA paper's fixed λ) at the operating density 0.1 where the grid has it, else its first
    density (or threshold). Always a point of the grid."""
    _, _, densities, lambdas = METHODS[method]
    density = 0.1 if 0.1 in densities else densities[0]
    return density, (1.0 if 1.0 in lambdas else lambdas[0])


def config_name(method, density, lam):
    d = "" if density is None else f"-{'t' if method in AXIS else 'd'}{density:g}"
    return f"{method}{d}-l{lam:g}"


def _yaml(doc, indent=0):
    """A small YAML writer for recipes: dicts, lists of dicts, scalars and paths."""
    pad = " " * indent
    lines = []
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"{pad}{k}:")
            lines.append(_yaml(v, indent + 2))
        elif isinstance(v, list):
            lines.append(f"{pad}{k}:")
            for item in v:
                first, *rest = _yaml(item, indent + 4).splitlines()
                lines.append(f"{pad}  - {first.strip()}")
                lines += rest
        else:
            lines.append(f"{pad}{k}: {json.dumps(v)}")
    return "\n".join(lines)


def recipe(method, density, lam, base, tasks, grads=None, forget=None, start=None, weights=None):
    """A stamerge recipe. tasks/forget: lists of checkpoint folders; grads: task -> gradient file;
    weights: one per task (default: mergekit's 1)."""
    merge_method, fixed, _, _ = METHODS[method]
    params = dict(fixed) if merge_method == "fisher" else dict(fixed, **{"lambda": lam})
    if density is not None:
        params[AXIS.get(method, "density")] = density
    if merge_method in ("sta", "fisher"):
        # Only the frozen, unused pooler lacks a gradient; its task vector is exactly zero (fisher
        # takes F = 0 there: the models' average, which is the base).
        params["missing_gradients"] = "magnitude"

    def entry(path, w=None):
        e = {"model": path}
        if merge_method in ("sta", "fisher"):
            e["gradients"] = grads[path]
        if w is not None:
            e["parameters"] = {"weight": w}
        return e

    doc = {"merge_method": merge_method, "base_model": base, "parameters": params}
    if tasks:
        doc["models"] = [entry(p, None if weights is None else weights[i]) for i, p in enumerate(tasks)]
    if forget:
        doc["forget"] = [entry(p) for p in forget]
        if start:
            doc["start_model"] = start
    return _yaml(doc) + "\n"


def run_stamerge(binary, recipe_text, out_dir):
    """Writes the recipe beside the output and merges; raises with stamerge's own message."""
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    path = out_dir + ".yml"
    with open(path, "w") as f:
        f.write(recipe_text)
    proc = subprocess.run(
        [binary, "merge", path, out_dir, "--overwrite", "--threads", "2", "--quiet"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"stamerge merge {path} failed ({proc.returncode}):\n{proc.stderr}")
    return os.path.join(out_dir, "model.safetensors")


def remove(out_dir):
    shutil.rmtree(out_dir, ignore_errors=True)
