"""`python -m stamerge.grads` on tiny randomly initialised Hugging Face models written locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close_stats, cli_args, reference_statistic
from safetensors import safe_open

from stamerge.grads.cli import main

transformers = pytest.importorskip("transformers")


def read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def checkpoint_keys(folder):
    return set(read(os.path.join(folder, "model.safetensors"))[0])


def records(path, n=None):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    return recs[:n]


def reference(folder, task, recs, mode):
    """Each text tokenized alone (no padding) and scored by the model's own `labels=` loss."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if task == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32
        )

    def losses():
        for r in recs:
            ids = tok(r["text"], return_tensors="pt")["input_ids"]
            labels = ids if task == "causal-lm" else torch.tensor([r["label"]])
            yield model(input_ids=ids, labels=labels).loss

    want, n, mean = reference_statistic(model, losses(), mode)
    keys = checkpoint_keys(folder)
    return {k: v for k, v in want.items() if k in keys}, n, mean


def test_causal_lm_via_python_m(tiny_gpt2, jsonl, tmp_path):
    out = tmp_path / "g.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "stamerge.grads"]
        + cli_args(tiny_gpt2, jsonl, "causal-lm", out, batch_size=4),
        capture_output=True,
        check=False,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "per-sample path vmap" in r.stderr
    got, md = read(out)
    want, n, mean = reference(tiny_gpt2, "causal-lm", records(jsonl), "abs")
    # Tied lm_head.weight is not a checkpoint tensor: its gradient lives in transformer.wte.weight.
    assert set(got) == checkpoint_keys(tiny_gpt2) and "lm_head.weight" not in got
    assert_close_stats(got, want)
    assert md["mode"] == "abs" and md["samples"] == str(n) == "11" and md["task"] == "causal-lm"
    assert float(md["mean_loss"]) == pytest.approx(mean, rel=1e-5)


def test_causal_lm_sum_bf16_loop_max_samples(tiny_gpt2, jsonl, tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    opts = {
        "mode": "sum",
        "dtype": "bfloat16",
        "max_samples": 5,
        "batch_size": 2,
        "per_sample": "loop",
    }
    rc = main(cli_args(tiny_gpt2, jsonl, "causal-lm", out, **opts))
    assert rc == 0, capsys.readouterr().err
    got, md = read(out)
    want, n, _ = reference(tiny_gpt2, "causal-lm", records(jsonl, 5), "sum")
    assert md["samples"] == "5" == str(n) and md["mode"] == "sum"
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    # bf16 keeps 8 significant bits: half an ulp is 2^-9 relative.
    assert_close_stats({k: v.float() for k, v in got.items()}, want, rtol=2**-8)


@pytest.mark.parametrize("labels", ["ids", "names"])
@pytest.mark.parametrize("per_sample", ["auto", "loop"])
def test_seq_cls(tiny_bert, jsonl, tmp_path, capsys, labels, per_sample):
    recs = records(jsonl)
    data = tmp_path / "d.jsonl"
    names = ["neg", "neu", "pos"]
    with open(data, "w") as f:
        for r in recs:
            lab = r["label"] if labels == "ids" else names[r["label"]]
            f.write(json.dumps({"text": r["text"], "label": lab}) + "\n")
    out = tmp_path / "g.safetensors"
    rc = main(cli_args(tiny_bert, data, "seq-cls", out, batch_size=3, per_sample=per_sample))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"per-sample path {'vmap' if per_sample == 'auto' else 'loop'}" in err
    got, md = read(out)
    want, n, mean = reference(tiny_bert, "seq-cls", recs, "abs")
    assert md["samples"] == str(n)
    assert set(got) == checkpoint_keys(tiny_bert)
    assert_close_stats(got, want)
    assert float(md["mean_loss"]) == pytest.approx(mean, rel=1e-5)


def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_bert, jsonl, tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat", "label": 1}\n{"text": "a dog"}\n')
    assert main(cli_args(tiny_bert, data, "seq-cls", out)) == 2
    assert f"{data}:2" in capsys.readouterr().err
    data.write_text('{"text": "the cat", "label": "maybe"}\n')
    assert main(cli_args(tiny_bert, data, "seq-cls", out)) == 2
    assert "'maybe' is not a class" in capsys.readouterr().err
    data.write_text('{"text": "the cat", "label": 1}\nnot json\n')
    assert main(cli_args(tiny_bert, data, "seq-cls", out)) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err
    assert main(cli_args(tiny_bert, jsonl, "seq-cls", tmp_path / "g.bin")) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(cli_args(tiny_bert, jsonl, "seq-cls", out, vmap_mib=0)) == 2
    assert "--vmap-mib must be at least 1" in capsys.readouterr().err
    assert main(cli_args(tmp_path / "none", jsonl, "seq-cls", out)) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]
