"""The written statistic loads in `stamerge` and an STA merge on it matches a numpy reference of
docs/SEMANTICS.md bit for bit. Runs the `stamerge` command installed beside this Python (the
wheel's; python/run-tests.sh installs it), or STAMERGE_BIN=path."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli_args
from safetensors import safe_open

from stamerge.grads import write_gradients
from stamerge.grads.cli import main

transformers = pytest.importorskip("transformers")

DENSITY, LAMBDA = 0.25, 0.7


def stamerge_bin():
    path = os.environ.get("STAMERGE_BIN") or os.path.join(
        os.path.dirname(sys.executable), "stamerge"
    )
    if not os.path.isfile(path):
        pytest.fail(f"no stamerge command at {path}: install the wheel or set STAMERGE_BIN")
    return path


def read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).float().numpy() for k in f.keys()}


def sta_reference(base, tasks, grads, density, lam):
    """SEMANTICS.md: s = |f32(θ)·f32(G)|, top k = max(1, floor(d·n)) per tensor (ties: lower flat
    index first), out = b + λ·Σ m·τ, every operation one fp32 rounding, tasks in recipe order."""
    out = {}
    for name, b in base.items():
        b = b.reshape(-1)
        n = b.size
        k = max(1, math.floor(density * n))
        acc = np.zeros(n, dtype=np.float32)
        for th, g in zip(tasks, grads):
            th, gg = th[name].reshape(-1), g[name].reshape(-1)
            s = np.abs(th * gg)
            keep = np.zeros(n, dtype=bool)
            keep[np.argsort(-s, kind="stable")[:k]] = True
            tau = th - b
            acc = acc + np.where(keep, tau, np.float32(0))
        out[name] = (b + np.float32(lam) * acc).reshape(base[name].shape)
    return out


def perturbed_copy(src, dst, seed):
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(dst)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def test_sta_merge_on_written_statistics(tiny_gpt2, jsonl, tmp_path):
    from stamerge.grads import hf

    exe = stamerge_bin()
    tasks = [tmp_path / "task_0", tmp_path / "task_1"]
    for i, t in enumerate(tasks):
        perturbed_copy(tiny_gpt2, t, seed=10 + i)
    # stamerge refuses an output folder inside the folder of a file input, so the statistics get
    # their own folder.
    gdir = tmp_path / "grads"
    gdir.mkdir()
    # Task 0 through the CLI (fp32 file), task 1 through the Python API (bf16 file).
    assert main(cli_args(tasks[0], jsonl, "causal-lm", gdir / "grads_0.safetensors")) == 0
    model, tok = hf.load(str(tasks[1]), "causal-lm", "cpu")
    texts, _ = hf.read_jsonl(str(jsonl), "causal-lm", None, {})
    with hf.vmap_friendly_masks():
        s = write_gradients(
            model,
            hf.causal_lm_loss,
            hf.batches(tok, texts, None, 4, 64, "cpu"),
            gdir / "grads_1.safetensors",
            dtype="bfloat16",
            names=hf.name_mapper(model, hf.checkpoint_names(str(tasks[1]))),
        )
    assert s.per_sample == "vmap" and "lm_head.weight" not in s
    recipe = tmp_path / "sta.yml"
    recipe.write_text(
        f"merge_method: sta\nbase_model: {tiny_gpt2}\nparameters:\n  density: {DENSITY}\n"
        f"  lambda: {LAMBDA}\nmodels:\n"
        "  - model: task_0\n    gradients: grads/grads_0.safetensors\n"
        "  - model: task_1\n    gradients: grads/grads_1.safetensors\n"
    )
    r = subprocess.run(
        [exe, "merge", str(recipe), str(tmp_path / "out"), "--device", "cpu", "--quiet"],
        capture_output=True,
        check=False,
        text=True,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    got = read(tmp_path / "out" / "model.safetensors")
    base = read(os.path.join(tiny_gpt2, "model.safetensors"))
    thetas = [read(t / "model.safetensors") for t in tasks]
    grads = [read(gdir / f"grads_{i}.safetensors") for i in range(2)]
    want = sta_reference(base, thetas, grads, DENSITY, LAMBDA)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k].view(np.uint32), want[k].view(np.uint32), err_msg=k)
        # The merge is neither the base nor a plain sum of task vectors: the selection mattered.
        assert not np.array_equal(got[k], base[k]), k


def test_missing_tensor_in_statistic_is_named_by_stamerge(tiny_gpt2, jsonl, tmp_path):
    exe = stamerge_bin()
    perturbed_copy(tiny_gpt2, tmp_path / "task_0", seed=3)
    grads = tmp_path / "grads_0.safetensors"
    assert main(cli_args(tmp_path / "task_0", jsonl, "causal-lm", grads, max_samples=3)) == 0
    # Drop one tensor, as a user's hand-made name mapping might: stamerge must name it.
    from safetensors.torch import save_file

    with safe_open(grads, framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "transformer.wpe.weight"}
    save_file(kept, grads)
    recipe = tmp_path / "sta.yml"
    recipe.write_text(
        f"merge_method: sta\nbase_model: {tiny_gpt2}\nparameters:\n  density: 0.5\n"
        "models:\n  - model: task_0\n    gradients: grads_0.safetensors\n"
    )
    r = subprocess.run([exe, "plan", str(recipe)], capture_output=True, text=True, check=False)
    assert r.returncode != 0
    assert (
        "transformer.wpe.weight" in r.stderr + r.stdout
        and "grads_0.safetensors" in r.stderr + r.stdout
    )
