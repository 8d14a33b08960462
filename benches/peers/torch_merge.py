"""A plain PyTorch merge: what a user writes instead of stamerge or mergekit.

One tensor group at a time (base, each task, each task's gradients), per-tensor `torch.topk`, fp32
arithmetic in the order docs/SEMANTICS.md fixes, so that its output is an independent reference for
stamerge's (the STA result must match bit for bit) and a peer for timing and memory.

usage: torch_merge.py RECIPE.json OUT_DIR
RECIPE.json: {"method": "ties"|"task_arithmetic"|"magnitude"|"sta", "base": DIR,
              "models": [{"model": DIR, "weight": 1.0, "density": 0.3, "gradients": DIR}],
              "lambda": 1.0, "normalize": bool|null, "out_dtype": "bfloat16"|null,
              "shard_bytes": int}
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Folder:
    """The tensors of a Hugging Face safetensors folder (one file or an index), opened lazily."""

    def __init__(self, path):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self.where = json.load(f)["weight_map"]
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            self.where = {}
            for name in files:
                with safe_open(os.path.join(path, name), "pt") as h:
                    for key in h.keys():
                        self.where[key] = name
        self.handles = {}

    def get(self, name):
        file = self.where[name]
        if file not in self.handles:
            self.handles[file] = safe_open(os.path.join(self.path, file), "pt")
        return self.handles[file].get_tensor(name)

    def names_in_order(self):
        """Names in file order, then offset order (the plan order of docs/SEMANTICS.md)."""
        out = []
        for file in sorted(set(self.where.values())):
            with safe_open(os.path.join(self.path, file), "pt") as h:
                keys = list(h.keys())
            offsets = {}
            with open(os.path.join(self.path, file), "rb") as raw:
                n = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(n))
            for key in keys:
                offsets[key] = header[key]["data_offsets"][0]
            out.extend(sorted(keys, key=lambda k: offsets[k]))
        return out


def topk_mask(score, k):
    """Exactly k entries: those above the k-th largest value T, then entries equal to T in
    increasing flat index (the tie rule of docs/SEMANTICS.md)."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).reshape(score.shape)
    t = torch.topk(flat, k, sorted=False).values.min()
    mask = flat > t
    r = k - int(mask.sum())
    ties = torch.nonzero(flat == t).reshape(-1)[:r]
    mask[ties] = True
    return mask.reshape(score.shape)


def f32(x):
    """A weight or lambda as an fp32 0-d tensor, so that it enters the arithmetic as f32(value)."""
    return torch.tensor(x, dtype=torch.float32)


def density_k(density, n):
    return max(1, int(density * n))


def merge_tensor(recipe, name, base, tasks, grads):
    method = recipe["method"]
    b = base.float()
    lam = float(recipe.get("lambda", 1.0))
    us, ws = [], []
    for t, (entry, theta) in enumerate(zip(recipe["models"], tasks)):
        th = theta.float()
        tau = th - b
        w = float(entry.get("weight", 1.0))
        d = float(entry.get("density", recipe.get("density", 1.0)))
        if method == "task_arithmetic" or d >= 1.0:
            mask = None
        elif method in ("ties", "magnitude"):
            mask = topk_mask(tau.abs(), density_k(d, tau.numel()))
        elif method == "sta":
            mask = topk_mask((th * grads[t].float()).abs(), density_k(d, tau.numel()))
        else:
            raise SystemExit(f"unsupported method {method}")
        del th
        u = f32(w) * tau if w != 1.0 else tau
        if mask is not None:
            u = torch.where(mask, u, torch.zeros((), dtype=u.dtype))
        us.append(u)
        ws.append(w)
    normalize = recipe.get("normalize")
    if method == "ties":
        normalize = True if normalize is None else normalize
        s = torch.zeros_like(b)
        for u in us:
            s = s + u
        pos = s >= 0
        del s
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for u, w in zip(us, ws):
            agree = torch.where(pos, u > 0, u < 0)
            mixed = mixed + torch.where(agree, u, torch.zeros((), dtype=u.dtype))
            div = div + torch.where(agree, torch.tensor(w, dtype=torch.float32), 0.0)
        if normalize:
            div = torch.where(div == 0, torch.ones((), dtype=div.dtype), div)
            mixed = mixed / div
        out = b + f32(lam) * mixed
    else:
        acc = torch.zeros_like(b)
        for u in us:
            acc = acc + u
        if normalize:
            div = torch.zeros((), dtype=torch.float32)
            for w in ws:
                div = div + torch.tensor(w, dtype=torch.float32)
            if abs(float(div)) < 1e-8:
                div = torch.ones((), dtype=torch.float32)
            acc = acc / div
        out = b + f32(lam) * acc
    dtype = DTYPES[recipe["out_dtype"]] if recipe.get("out_dtype") else base.dtype
    return out.to(dtype)


def main():
    recipe_path, out_dir = sys.argv[1], sys.argv[2]
    with open(recipe_path) as f:
        recipe = json.load(f)
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count())))
    base = Folder(recipe["base"])
    tasks = [Folder(m["model"]) for m in recipe["models"]]
    grads = [Folder(m["gradients"]) if m.get("gradients") else None for m in recipe["models"]]
    os.makedirs(out_dir, exist_ok=True)
    shard_bytes = int(recipe.get("shard_bytes", 5 << 30))
    shard, shard_size, shards, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            shards.append(name)
            for key in shard:
                weight_map[key] = name
            shard, shard_size = {}, 0

    with torch.no_grad():
        for name in base.names_in_order():
            b = base.get(name)
            if not b.is_floating_point() or name not in tasks[0].where:
                out = b
            else:
                ts = [t.get(name) for t in tasks]
                gs = [g.get(name) if g is not None else None for g in grads]
                out = merge_tensor(recipe, name, b, ts, gs)
                del ts, gs
            size = out.numel() * out.element_size()
            if shard and shard_size + size > shard_bytes:
                flush()
            shard[name] = out
            shard_size += size
        flush()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


if __name__ == "__main__":
    main()
