"""Compare two merged checkpoint folders tensor by tensor, in units in the last place.

usage: compare.py A_DIR B_DIR [--explain RECIPE.json]
Prints one JSON object: tensors compared, names only one side has, elements differing by 1 ulp
and by more, the worst tensor. With --explain (the torch_merge recipe of a top-k method), the
elements that differ are checked against the cause we expect: a tie at the top-k threshold, where
stamerge keeps the lowest indices and mergekit's argsort keeps an arbitrary subset; the count of
differing elements where no task's |tau| equals its threshold is reported (0 when ties explain all).
"""

import json
import sys

import torch

from torch_merge import Folder, density_k


def ordered_bits(x):
    """Integers whose order and differences follow the floats': distance = ulps apart."""
    if x.dtype in (torch.bfloat16, torch.float16):
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    if x.dtype == torch.float32:
        i = x.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    raise ValueError(f"not a float dtype: {x.dtype}")


def tie_explained(recipe, name, idx):
    """How many of the differing flat indices sit on a tie at some task's top-k threshold."""
    base = Folder(recipe["base"]).get(name).float().reshape(-1)
    hit = torch.zeros(idx.numel(), dtype=torch.bool)
    for m in recipe["models"]:
        tau = (Folder(m["model"]).get(name).float().reshape(-1) - base).abs()
        k = density_k(float(m.get("density", recipe.get("density", 1.0))), tau.numel())
        if k >= tau.numel():
            continue
        t = torch.topk(tau, k, sorted=False).values.min()
        hit |= tau[idx] == t
    return int(hit.sum())


def compare(a_dir, b_dir, explain=None):
    a, b = Folder(a_dir), Folder(b_dir)
    names = sorted(set(a.where) & set(b.where))
    res = {
        "a": a_dir,
        "b": b_dir,
        "tensors": 0,
        "elements": 0,
        "only_a": sorted(set(a.where) - set(b.where)),
        "only_b": sorted(set(b.where) - set(a.where)),
        "dtype_mismatch": [],
        "diff_1ulp": 0,
        "diff_gt1ulp": 0,
        "max_ulp": 0,
        "worst_tensor": None,
    }
    if explain:
        res["diff_not_at_tie"] = 0
    for name in names:
        x, y = a.get(name), b.get(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            res["dtype_mismatch"].append([name, str(x.dtype), str(y.dtype)])
            continue
        if not x.is_floating_point():
            continue
        res["tensors"] += 1
        res["elements"] += x.numel()
        d = (ordered_bits(x) - ordered_bits(y)).abs().reshape(-1)
        one = int((d == 1).sum())
        more = int((d > 1).sum())
        res["diff_1ulp"] += one
        res["diff_gt1ulp"] += more
        m = int(d.max()) if d.numel() else 0
        if m > res["max_ulp"]:
            res["max_ulp"], res["worst_tensor"] = m, name
        if explain and (one or more):
            idx = torch.nonzero(d > 0).reshape(-1)
            res["diff_not_at_tie"] += idx.numel() - tie_explained(explain, name, idx)
    return res


def main():
    args = sys.argv[1:]
    explain = None
    if "--explain" in args:
        i = args.index("--explain")
        with open(args[i + 1]) as f:
            explain = json.load(f)
        del args[i : i + 2]
    print(json.dumps(compare(args[0], args[1], explain)))


if __name__ == "__main__":
    main()
