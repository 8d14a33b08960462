"""stamerge's sparsifying methods beside mergekit 0.1.5's, element by element.

For each recipe below, on one set of random Llama-shaped checkpoints (a base and three
fine-tunes), this runs mergekit's own merge (`run_merge`, CPU, `dtype: float32` so that both tools
compute in fp32) and `stamerge merge` on the same YAML, and counts the output elements that differ
(bits, and by more than one ulp), per recipe.

Random keeps (dare_*, della*) are compared twice:
- `torch RNG`: mergekit as shipped. The draws differ (torch's generator vs stamerge's counter-based
  one), so only the statistics can agree: the kept fraction and the mean |output − base|.
- `stamerge draws`: mergekit with `torch.bernoulli` replaced by stamerge's generator (the same
  stream, index and threshold as docs/SEMANTICS.md), so everything around the draw — DELLA's
  probabilities, the L1 rescale, the fuse — is compared bit for bit.

- `f64 sums`: mergekit with its two per-tensor fp32 sums (the L1 norms of `rescaled_masked_tensor`
  and sce's mean τ²) taken in float64 and rounded once to float32, as stamerge takes them (a fixed
  f64 tree, docs/SEMANTICS.md): what is left differs for another reason than the sums' rounding.

- `tie order`: mergekit with torch's sorts (`sort`, `argsort`, `topk`) replaced by sorts that
  break ties as stamerge does (largest first, the lower index first among equal values; the
  ascending order its exact reverse): what is left after all three is a real difference.

The variants are cumulative, each applied where it matters (draws for random keeps, sums for
rescales and sce, tie order for ranked masks). A second set stores bfloat16 (values on a coarse grid, so |τ| ties are common): ranks that tie are
broken differently (stamerge: lowest index first in the largest-first order; torch's sort is not
stable), which is what the differences there count.

usage: STAMERGE=target/release/stamerge python benches/peers/sparse_parity.py [OUT.json]
       (in a venv with mergekit==0.1.5 and torch, e.g. /work/venvs/mergekit)
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import mergekit.merge
import mergekit.merge_methods.generalized_task_arithmetic as gta
import mergekit.sparsify
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mergekit_fixture import llama_tensors  # noqa: E402

STAMERGE = os.environ.get("STAMERGE", "target/release/stamerge")
LAYERS, HIDDEN, INTER, VOCAB = 2, 64, 176, 131
TASKS = 3


def make_set(root, dtype, grid):
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": dtype,
    }
    g = torch.Generator().manual_seed(1234)
    base = {}
    for name, shape in llama_tensors(LAYERS, HIDDEN, INTER, VOCAB):
        if grid:
            base[name] = (torch.randint(-8, 9, shape, generator=g) / 16.0)
        else:
            base[name] = torch.rand(shape, generator=g) * 0.2 - 0.1
    models = {"base": base}
    for t in range(TASKS):
        m = {}
        for name, x in base.items():
            if grid:
                d = torch.randint(-4, 5, x.shape, generator=g) / 64.0
            else:
                d = (torch.rand(x.shape, generator=g) * 2 - 1) * (torch.rand(x.shape, generator=g) * 0.02)
            m[name] = x + d
        models[f"task_{t}"] = m
    for folder, tensors in models.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()},
                  os.path.join(root, folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(root, folder, "config.json"), "w") as f:
            json.dump(cfg, f)


def recipe(method, glob, per, root):
    # Absolute paths: mergekit caches loaded models by path across runs in one process.
    lines = [f"merge_method: {method}", f"base_model: {root}/base", "dtype: float32"]
    if glob:
        lines.append("parameters:")
        lines += [f"  {k}: {v}" for k, v in glob.items()]
    lines.append("models:")
    for t in range(TASKS):
        lines.append(f"  - model: {root}/task_{t}")
        p = {k: v[t] if isinstance(v, list) else v for k, v in per.items()}
        if p:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in p.items()]
    return "\n".join(lines) + "\n"


W = {"weight": [1.0, 0.5, 0.75]}
RECIPES = [
    # name, method, global parameters, per-model parameters, random keeps, per-tensor sums, ranks
    ("dare_linear", "dare_linear", {"seed": 3}, dict(W, density=[0.5, 0.3, 0.7]), True, True, False),
    ("dare_ties", "dare_ties", {"seed": 3}, dict(W, density=0.4), True, True, False),
    ("della", "della", {"seed": 5}, dict(W, density=0.5), True, True, True),
    ("della_linear", "della_linear", {"seed": 5, "lambda": 0.8},
     dict(W, density=[0.5, 0.3, 0.6], epsilon=[0.2, 0.25, 0.05]), True, True, True),
    ("breadcrumbs", "breadcrumbs", {}, dict(W, density=0.9), False, False, True),
    ("breadcrumbs_ties", "breadcrumbs_ties", {"normalize": "true"},
     dict(W, density=0.8, gamma=0.3), False, False, True),
    ("breadcrumbs_gamma0_rescale", "breadcrumbs", {"rescale": "true"},
     dict(W, density=0.3, gamma=0.0), False, True, True),
    ("ties_rescale", "ties", {"rescale": "true"}, dict(W, density=0.4), False, True, True),
    ("sce", "sce", {}, {}, False, True, False),
    ("sce_topk", "sce", {"select_topk": 0.3}, {}, False, True, True),
    ("ram", "ram", {"epsilon": 0.005}, {}, False, False, False),
    ("ramplus_tl", "ramplus_tl", {"epsilon": 0.005, "r": 0.5, "alpha": 0.4}, {}, False, False, False),
]

# ----------------------------------------------------------------------------------------------
# stamerge's counter-based generator (docs/SEMANTICS.md "DARE keep decision") in numpy.

M64 = (1 << 64) - 1


def fmix_int(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def fmix_np(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream(seed, task, name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return fmix_int(fmix_int(seed ^ fmix_int(task + 1)) ^ h)


CTX = {}


def patched_bernoulli(probs, *args, **kwargs):
    n = probs.numel()
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        h = fmix_np(np.uint64(CTX["stream"]) + i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    if CTX["method"] == "random":
        th = np.full(n, int(np.floor(CTX["density"] * 4294967296.0)), dtype=np.uint64)
    else:
        p = probs.reshape(-1).to(torch.float32).numpy().astype(np.float64)
        th = np.floor(p * 4294967296.0).astype(np.uint64)
    return torch.from_numpy((h < th).astype(np.float32)).reshape(probs.shape).to(probs.dtype)


def install_f64_sums():
    import mergekit.merge_methods.sce as sce

    orig_r, orig_w = mergekit.sparsify.rescaled_masked_tensor, sce.sce_weight

    def rescaled(tensor, mask, norm, eps=1e-7):
        masked = tensor * mask
        if norm is None:
            return masked
        before = tensor.abs().double().sum().float()
        after = masked.abs().double().sum().float()
        if before < eps or after < eps:
            return masked
        return masked * (before / after)

    def weight(tvs):
        flat = tvs.square().reshape(tvs.shape[0], -1)
        weights = (flat.double().sum(dim=1) / flat.shape[1]).float()
        weight_sum = torch.sum(weights).item()
        if abs(weight_sum) < 1e-6:
            return torch.ones_like(weights) / weights.shape[0]
        return weights / weight_sum

    mergekit.sparsify.rescaled_masked_tensor = rescaled
    sce.sce_weight = weight

    def undo():
        mergekit.sparsify.rescaled_masked_tensor = orig_r
        sce.sce_weight = orig_w

    return undo


def _sorted(x, dim, descending):
    """Indices along `dim` by value, ties by index: descending (v desc, i asc), ascending its reverse."""
    a = x.detach().to(torch.float64).cpu().numpy()
    a = np.moveaxis(a, dim, -1)
    idx = np.broadcast_to(np.arange(a.shape[-1]), a.shape)
    flat_a, flat_i = a.reshape(-1, a.shape[-1]), idx.reshape(-1, a.shape[-1])
    out = np.empty(flat_a.shape, dtype=np.int64)
    for r in range(flat_a.shape[0]):
        if descending:
            out[r] = np.lexsort((flat_i[r], -flat_a[r]))
        else:
            out[r] = np.lexsort((-flat_i[r], flat_a[r]))
    out = np.moveaxis(out.reshape(a.shape), -1, dim)
    return torch.from_numpy(np.ascontiguousarray(out))


def install_tie_order():
    real = (torch.sort, torch.argsort, torch.topk)

    def argsort(x, dim=-1, descending=False, **kw):
        return _sorted(x, dim, descending)

    def sort(x, dim=-1, descending=False, **kw):
        i = _sorted(x, dim, descending)
        return torch.return_types.sort((torch.gather(x, dim, i), i))

    def topk(x, k, dim=-1, largest=True, **kw):
        i = _sorted(x, dim, largest).narrow(dim, 0, k)
        return torch.return_types.topk((torch.gather(x, dim, i), i))

    torch.sort, torch.argsort, torch.topk = sort, argsort, topk

    def undo():
        torch.sort, torch.argsort, torch.topk = real

    return undo


def install_stamerge_draws(seed, order):
    orig_merge = gta.GeneralizedTaskArithmeticMerge.merge_group
    orig_sparsify = gta.sparsify

    def merge_group(self, group, /, **parameters):
        CTX["name"] = group.metadata.name
        CTX["ids"] = [e.id for e in group.non_base]
        CTX["next"] = 0
        return orig_merge(self, group, **parameters)

    def sparsify(tensor, density, method, **kw):
        entry = CTX["ids"][CTX["next"]]
        CTX["next"] += 1
        task = order[os.path.basename(str(entry.model.path))]
        CTX.update(stream=stream(seed, task, CTX["name"]), method=method.value, density=density)
        return orig_sparsify(tensor, density, method, **kw)

    real = torch.bernoulli
    gta.GeneralizedTaskArithmeticMerge.merge_group = merge_group
    gta.sparsify = sparsify
    mergekit.sparsify.torch.bernoulli = patched_bernoulli

    def undo():
        gta.GeneralizedTaskArithmeticMerge.merge_group = orig_merge
        gta.sparsify = orig_sparsify
        mergekit.sparsify.torch.bernoulli = real

    return undo


# ----------------------------------------------------------------------------------------------


def run_mergekit(root, text, out):
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = MergeConfiguration.model_validate(__import__("yaml").safe_load(text))
        opts = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mergekit.merge.run_merge(cfg, out, options=opts)
    finally:
        os.chdir(cwd)


def run_stamerge(root, name, text, out):
    path = os.path.join(root, f"{name}.yml")
    with open(path, "w") as f:
        f.write(text)
    r = subprocess.run([STAMERGE, "-q", "merge", path, out, "--device", "cpu", "--overwrite"],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"stamerge refused {name}: {r.stderr}")


def load(folder):
    out = {}
    for fn in os.listdir(folder):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, fn)))
    return out


def ulps(a, b):
    """|a − b| in units of the last place (fp32, by the ordered integer of each float)."""
    def ordered(x):
        i = x.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


def compare(mk, st, base):
    n = diff = far = same_tensors = 0
    worst = 0.0
    delta = {"mergekit": 0.0, "stamerge": 0.0}
    for k, a in mk.items():
        b = st[k]
        a32, b32 = a.float(), b.float()
        n += a.numel()
        u = ulps(a32.contiguous(), b32.contiguous())
        diff += int((u > 0).sum())
        far += int((u > 1).sum())
        same_tensors += int(torch.equal(a, b))
        worst = max(worst, float((a32 - b32).abs().max()))
        delta["mergekit"] += float((a32 - base[k].float()).abs().sum())
        delta["stamerge"] += float((b32 - base[k].float()).abs().sum())
    return {
        "elements": n, "differ": diff, "differ_over_1ulp": far, "tensors": len(mk),
        "tensors_identical": same_tensors, "max_abs_diff": worst,
        "mean_abs_change": {k: v / n for k, v in delta.items()},
    }


def main():
    dest = sys.argv[1] if len(sys.argv) > 1 else None
    results = []
    for label, dtype, grid in (("fp32 random", "float32", False), ("bf16 grid (ties)", "bfloat16", True)):
        with tempfile.TemporaryDirectory() as root:
            make_set(root, dtype, grid)
            base = load(os.path.join(root, "base"))
            order = {f"task_{t}": t for t in range(TASKS)}
            for name, method, glob, per, random, sums, ranks in RECIPES:
                text = recipe(method, glob, per, root)
                st_out = os.path.join(root, f"{name}.stamerge")
                t0 = time.perf_counter()
                run_stamerge(root, name, text, st_out)
                t_st = time.perf_counter() - t0
                st = load(st_out)
                seed = glob.get("seed", 0) if random else None
                # Cumulative: (label, stamerge draws, f64 sums, tie order).
                variants = [("torch RNG" if random else "as shipped", False, False, False)]
                if random:
                    variants.append(("+ stamerge draws", True, False, False))
                if sums:
                    variants.append(("+ f64 sums", random, True, False))
                if ranks:
                    variants.append(("+ tie order", random, sums, True))
                for k, (variant, draws, exact, ties) in enumerate(variants):
                    undos = []
                    if draws:
                        undos.append(install_stamerge_draws(seed, order))
                    if exact:
                        undos.append(install_f64_sums())
                    if ties:
                        undos.append(install_tie_order())
                    mk_out = os.path.join(root, f"{name}.mergekit-{k}")
                    t0 = time.perf_counter()
                    try:
                        run_mergekit(root, text, mk_out)
                    finally:
                        for u in reversed(undos):
                            u()
                    t_mk = time.perf_counter() - t0
                    r = compare(load(mk_out), st, base)
                    r.update(set=label, recipe=name, variant=variant, seconds={"stamerge": t_st, "mergekit": t_mk})
                    results.append(r)
                    print(f"{label:17} {name:27} {variant:15} {r['differ']:7}/{r['elements']} differ "
                          f"({r['differ_over_1ulp']} by > 1 ulp), {r['tensors_identical']}/{r['tensors']} tensors "
                          f"identical, max |diff| {r['max_abs_diff']:.3g}, mean |change| mergekit "
                          f"{r['mean_abs_change']['mergekit']:.4g} stamerge {r['mean_abs_change']['stamerge']:.4g}",
                          flush=True)
    if dest:
        with open(dest, "w") as f:
            json.dump({"mergekit": "0.1.5", "torch": torch.__version__, "results": results}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
