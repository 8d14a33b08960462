"""Where stamerge's interpolating methods differ from mergekit 0.1.5 (float32), and why.

On the fixture's tiny Llama checkpoints (mergekit_fixture.make_models), merges a recipe per method
with both tools and, per tensor, compares the outputs and the per-tensor scalars the outputs
depend on: mergekit's, computed by its own float32 torch code, against stamerge's rule (exact f64
dot products rounded once, docs/SEMANTICS.md "Interpolating methods"). A tensor whose output
differs while its scalars agree would be unexplained; the script counts those. For `linear` it
checks the other cause instead: torch's addcmul_ computing one fused multiply-add.

usage: STAMERGE=target/release/stamerge python benches/peers/interp_parity.py
       (in the venv with mergekit 0.1.5 and torch, e.g. /work/venvs/mergekit)
"""

import contextlib
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mergekit_fixture as fx  # noqa: E402

STAMERGE = os.environ["STAMERGE"]

RECIPES = {
    "slerp": "models:\n  - model: base\n  - model: m1\nmerge_method: slerp\nbase_model: base\nparameters:\n  t: 0.3\ndtype: float32\n",
    "nuslerp": "models:\n  - model: m0\n    parameters:\n      weight: 1.0\n  - model: m2\n    parameters:\n      weight: 3.0\nmerge_method: nuslerp\ndtype: float32\n",
    "model_stock": "models:\n  - model: m0\n  - model: m1\n  - model: m2\nmerge_method: model_stock\nbase_model: base\ndtype: float32\n",
    "linear": "models:\n  - model: m0\n    parameters:\n      weight: 1.0\n  - model: m2\n    parameters:\n      weight: 0.3\n  - model: m1\n    parameters:\n      weight: 0.5\nmerge_method: linear\ndtype: float32\n",
}


def load(d):
    out = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def d64(a, b):
    """stamerge's D: the f64 sum of the exact products (numpy's order: on these sizes the f32
    roundings below come out as with stamerge's lane order but in a rare tie, which would show)."""
    return float(np.dot(a.double().flatten().numpy(), b.double().flatten().numpy()))


def n32(a):
    return np.float32(np.sqrt(d64(a, a)))


def scalars(method, m, name):
    """(mergekit's, stamerge's) per-tensor scalar of `method` for tensor `name`."""
    if method == "slerp":
        a, b = m["base"][name].float().reshape(1, -1), m["m1"][name].float().reshape(1, -1)
        na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
        cos = ((a / na) * (b / nb)).sum().clamp(-1, 1)
        t = torch.tensor(0.3, dtype=torch.float32)
        th = torch.acos(cos)
        theirs = (cos.item(), (torch.sin((1 - t) * th) / torch.sin(th)).item(),
                  (torch.sin(t * th) / torch.sin(th)).item())
        c = np.float32(d64(a, b) / (float(n32(a)) * float(n32(b))))
        th = np.arccos(np.float64(c))
        tt = float(np.float32(0.3))
        ours = (c, np.float32(np.sin((1 - tt) * th) / np.sin(th)), np.float32(np.sin(tt * th) / np.sin(th)))
        return tuple(np.float32(x) for x in theirs), ours
    if method == "nuslerp":
        a, b = m["m0"][name].float().reshape(-1), m["m2"][name].float().reshape(-1)
        au = a / torch.norm(a).clamp(min=1e-7)
        bu = b / torch.norm(b).clamp(min=1e-7)
        cos = torch.sum(au * bu).clamp(-1, 1)
        th = torch.acos(cos)
        t = 3.0 / 4.0
        theirs = (cos.item(), torch.sin((1 - t) * th).item(), torch.sin(t * th).item(), torch.sin(th).item())
        na, nb = max(n32(a), np.float32(1e-7)), max(n32(b), np.float32(1e-7))
        c = np.float32(d64(a, b) / (float(na) * float(nb)))
        th = np.arccos(np.float64(c))
        ours = (c, np.float32(np.sin((1 - t) * th)), np.float32(np.sin(t * th)), np.float32(np.sin(th)))
        return tuple(np.float32(x) for x in theirs), ours
    if method == "model_stock":
        w0 = m["base"][name].float().reshape(-1)
        off = [m[k][name].float().reshape(-1) - w0 for k in ("m0", "m1", "m2")]
        theirs, ours = [], []
        for i in range(3):
            for j in range(i + 1, 3):
                npd = torch.norm(off[i]) * torch.norm(off[j])
                theirs.append(np.float32(((off[i] * off[j]).sum() / npd.clamp(min=1e-6)).clamp(-1, 1).item()))
                np_ours = max(n32(off[i]) * n32(off[j]), np.float32(1e-6))
                ours.append(np.float32(np.float32(d64(off[i], off[j])) / np_ours))
        # Every scalar of model_stock is a reduction's: one entry.
        return (tuple(theirs),), (tuple(ours),)
    raise ValueError(method)


def main():
    with tempfile.TemporaryDirectory() as root:
        fx.make_models(root)
        models = {k: load(os.path.join(root, k)) for k in fx.MODELS}
        for method, text in RECIPES.items():
            mk_out = os.path.join(root, f"{method}.mk")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                fx.run_mergekit(root, method, text, mk_out)
            rp = os.path.join(root, f"{method}.yml")
            open(rp, "w").write(text)
            st_out = os.path.join(root, f"{method}.st")
            subprocess.run([STAMERGE, "-q", "merge", rp, st_out, "--device", "cpu"], check=True)
            a, b = load(mk_out), load(st_out)
            differ = [k for k in a if not torch.equal(a[k], b[k])]
            if method == "linear":
                # torch's addcmul_ as one fused multiply-add per input (f64 product + sum, rounded
                # once, which equals fma for these magnitudes), then the division.
                xs = [models[k] for k in ("m0", "m2", "m1")]
                w = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float32)
                explained = 0
                for k in differ:
                    acc = torch.zeros_like(xs[0][k].float())
                    for x, wi in zip(xs, w):
                        acc = (acc.double() + x[k].double() * float(wi)).float()
                    explained += torch.equal(acc / w.sum(), a[k])
                print(f"{method}: {len(differ)} of {len(a)} tensors differ; mergekit's output equals "
                      f"a fused multiply-add evaluation in {explained} of them")
                continue
            # The first scalar is the reduction's (cos); the others derive from it.
            sc = {k: scalars(method, models, k) for k in a}
            by_reduction = [k for k in differ if sc[k][0][0] != sc[k][1][0]]
            by_scalar_math = [k for k in differ if sc[k][0][0] == sc[k][1][0] and sc[k][0] != sc[k][1]]
            unexplained = [k for k in differ if sc[k][0] == sc[k][1]]
            print(f"{method}: {len(differ)} of {len(a)} tensors differ: {len(by_reduction)} with a "
                  f"different reduction (cos), {len(by_scalar_math)} with the same cos but different "
                  f"coefficients (f32 torch acos/sin vs f64), {len(unexplained)} unexplained "
                  f"{unexplained[:3]}")


if __name__ == "__main__":
    main()
