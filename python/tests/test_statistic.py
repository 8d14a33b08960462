"""gradient_statistic / save_statistic / write_gradients on plain nn.Modules."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import assert_close_stats, reference_statistic
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from stamerge.grads import (
    Statistic,
    StatisticError,
    gradient_statistic,
    save_statistic,
    write_gradients,
)

V, D, T = 13, 8, 6


class TinyLM(nn.Module):
    """Embedding tied to the output head, a frozen float parameter, an integer parameter, a
    buffer, dropout (the statistic runs in eval mode), and a parameter no loss reaches."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.frozen_scale = nn.Parameter(torch.linspace(0.5, 1.5, D), requires_grad=False)
        self.steps = nn.Parameter(torch.tensor([3, 4]), requires_grad=False)
        self.unused = nn.Parameter(torch.ones(3))
        self.register_buffer("offset", torch.full((D,), 0.1))
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        h = self.emb(ids) * self.frozen_scale + self.offset
        h = self.drop(torch.tanh(self.mix(h)))
        return self.head(self.norm(h))


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def make_data(batches=3, bsz=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (bsz, T), generator=g) for _ in range(batches)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyLM()


def reference(model, data, mode):
    return reference_statistic(
        model, (lm_loss(model, b[j : j + 1])[0] for b in data for j in range(b.shape[0])), mode
    )


@pytest.mark.parametrize("mode", ["abs", "sum"])
@pytest.mark.parametrize("per_sample", ["vmap", "loop", "auto"])
def test_matches_per_sample_loop(model, mode, per_sample):
    data = make_data()
    model.train()
    stats = gradient_statistic(model, lm_loss, data, mode=mode, per_sample=per_sample)
    assert model.training, "the train/eval state is restored"
    want, n, mean = reference(model, data, mode)
    assert_close_stats(stats, want)
    assert set(stats) == {
        "emb.weight",
        "head.weight",
        "mix.weight",
        "mix.bias",
        "norm.weight",
        "norm.bias",
        "unused",
    }
    assert torch.equal(stats["emb.weight"], stats["head.weight"])
    assert torch.count_nonzero(stats["unused"]) == 0
    assert stats.samples == n == 12
    assert stats.mean_loss == pytest.approx(mean, rel=1e-6)
    assert stats.mode == mode
    assert stats.per_sample == (
        None if mode == "sum" else ("loop" if per_sample == "loop" else "vmap")
    )
    assert stats.skipped == {
        "frozen_scale": "frozen (requires_grad is False)",
        "steps": "not a float tensor (torch.int64)",
    }


def test_abs_differs_from_abs_of_sum(model):
    # Guards the tests above against a model on which per-sample |g| and |Σ g| coincide.
    data = make_data()
    a = gradient_statistic(model, lm_loss, data, mode="abs")
    s = gradient_statistic(model, lm_loss, data, mode="sum")
    assert (a["mix.weight"] - s["mix.weight"].abs()).min() >= -1e-6
    assert (a["mix.weight"] - s["mix.weight"].abs()).max() > 1e-3


def test_batch_containers_and_uneven_batches(model):
    data = make_data(batches=2, bsz=5) + [torch.randint(0, V, (1, T))]
    want, n, _ = reference(model, data, "abs")
    as_dict = gradient_statistic(
        model, lambda m, b: lm_loss(m, b["ids"]), ({"ids": b, "tag": "x"} for b in data)
    )
    as_tuple = gradient_statistic(model, lambda m, b: lm_loss(m, b[0]), ((b, 7) for b in data))
    for s in (as_dict, as_tuple):
        assert s.per_sample == "vmap" and s.samples == n == 11
        assert_close_stats(s, want)


def per_sample_bytes(model):
    return sum(p.numel() * (p.element_size() + 4) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("chunk", [1, 3])
def test_vmap_bytes_splits_batches(model, chunk):
    data = make_data(bsz=4)
    want, _, _ = reference(model, data, "abs")
    s = gradient_statistic(model, lm_loss, data, vmap_bytes=chunk * per_sample_bytes(model))
    assert s.per_sample == "vmap" and s.samples == 12
    assert_close_stats(s, want)


def test_fallback_in_the_middle_of_a_batch_loses_and_repeats_nothing(model):
    # vmap runs the loss once per chunk: fail the second chunk (samples 2-3 of the first batch).
    calls = []

    def flaky(m, ids):
        calls.append(ids.shape[0])
        if len(calls) == 2:
            raise RuntimeError("simulated: no batching rule")
        return lm_loss(m, ids)

    data = make_data(bsz=4)
    want, _, mean = reference(model, data, "abs")
    with pytest.warns(UserWarning, match="simulated"):
        s = gradient_statistic(model, flaky, data, vmap_bytes=2 * per_sample_bytes(model))
    assert s.per_sample == "loop" and s.fallback == "RuntimeError: simulated: no batching rule"
    assert calls == [1, 1] + [1] * 10  # 2 vmapped chunks traced at batch 1, then 10 single samples
    assert s.samples == 12 and s.mean_loss == pytest.approx(mean, rel=1e-6)
    assert_close_stats(s, want)


class Branchy(nn.Module):
    """Python control flow on tensor values: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        y = self.lin(x)[:, 0]
        return y * 2 if bool(x.sum() > 0) else y * -3


def test_falls_back_to_loop_where_vmap_fails():
    torch.manual_seed(0)
    m = Branchy()
    data = [torch.randn(3, 4) for _ in range(2)]
    loss = lambda model, x: model(x) ** 2
    with pytest.warns(UserWarning, match="falling back"):
        s = gradient_statistic(m, loss, data, per_sample="auto")
    assert s.per_sample == "loop" and "RuntimeError" in s.fallback
    want, _, _ = reference_statistic(
        m, (loss(m, x[j : j + 1])[0] for x in data for j in range(3)), "abs"
    )
    assert_close_stats(s, want)
    assert s.samples == 6
    with pytest.raises(RuntimeError):
        gradient_statistic(m, loss, data, per_sample="vmap")


def test_names_rename_drop_and_collide(model):
    data = make_data(batches=1)
    s = gradient_statistic(model, lm_loss, data, names={"head.weight": None, "mix.bias": "layer.b"})
    assert (
        "head.weight" not in s and "head.weight" not in s.skipped
    )  # its tie emb.weight is written
    assert "layer.b" in s and "mix.bias" not in s
    s = gradient_statistic(
        model, lm_loss, data, names=lambda n: f"m.{n}" if n.startswith("mix") else None
    )
    assert set(s) == {"m.mix.weight", "m.mix.bias"}
    assert s.skipped["unused"] == "mapped to None by `names`"
    with pytest.raises(StatisticError, match="different parameters"):
        gradient_statistic(model, lm_loss, data, names={"mix.bias": "x", "norm.bias": "x"})


@pytest.mark.parametrize(
    "loss, match",
    [
        (lambda m, b: lm_loss(m, b).mean(), r"shape \(\)"),
        (lambda m, b: lm_loss(m, b)[None], r"shape \(1, "),
        (lambda m, b: 1.0, "returned float"),
    ],
)
@pytest.mark.parametrize("mode", ["abs", "sum"])
def test_loss_shape_errors(model, loss, match, mode):
    with pytest.raises(StatisticError, match=match):
        gradient_statistic(model, loss, make_data(batches=1), mode=mode, per_sample="loop")


def test_non_finite_statistic_warns(model):
    def kinked(m, ids):
        # sqrt at 0 (m.unused is all ones): a finite loss with a non-finite gradient.
        return lm_loss(m, ids) + (m.unused - 1).abs().sqrt().sum()

    with pytest.warns(UserWarning, match=r"non-finite values in the statistic of 1 tensor"):
        s = gradient_statistic(model, kinked, make_data(batches=1))
    assert not torch.isfinite(s["unused"]).any() and math.isfinite(s.mean_loss)


def test_input_errors(model):
    with pytest.raises(StatisticError, match="no samples"):
        gradient_statistic(model, lm_loss, [])
    with pytest.raises(StatisticError, match="disagree"):
        gradient_statistic(
            model,
            lambda m, b: lm_loss(m, b[0]),
            [(torch.zeros(2, T, dtype=torch.long), torch.zeros(3))],
        )
    with pytest.raises(StatisticError, match="mode"):
        gradient_statistic(model, lm_loss, make_data(), mode="mean")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(StatisticError, match="no trainable"):
        gradient_statistic(frozen, lambda m, x: m(x).sum(1), [torch.ones(1, 2)])


def bf16_round(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 -> fp32 with round to nearest even, on the bits (finite inputs)."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
    return b.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_round_trip_and_metadata(model, tmp_path, dtype):
    stats = gradient_statistic(model, lm_loss, make_data())
    path = tmp_path / "g.safetensors"
    save_statistic(stats, path, dtype=dtype, metadata={"task": "t0"})
    assert os.listdir(tmp_path) == ["g.safetensors"], "no temporary file is left behind"
    with safe_open(path, framework="pt") as f:
        md = f.metadata()
        assert set(f.keys()) == set(stats)
        for k in stats:
            t = f.get_tensor(k)
            assert t.dtype == getattr(torch, dtype)
            want = stats[k].numpy()
            if dtype == "bfloat16":
                want = bf16_round(want)
            np.testing.assert_array_equal(t.float().numpy(), want, err_msg=k)
    assert md["mode"] == "abs" and md["samples"] == "12" and md["task"] == "t0"
    assert float(md["mean_loss"]) == stats.mean_loss
    assert md["stamerge_grads_version"] and md["skipped"] == "frozen_scale,steps"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(model, tmp_path, umask):
    stats = gradient_statistic(model, lm_loss, make_data())
    old = os.umask(umask)
    try:
        save_statistic(stats, tmp_path / "g.safetensors")
        # Replacing a file gives the new one the same mode, not the old file's.
        save_statistic(stats, tmp_path / "g.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "g.safetensors").st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["g.safetensors"]


def test_bf16_round_is_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5], dtype=np.float32)
    np.testing.assert_array_equal(bf16_round(x), [1.0, 1.0, 1.0 + 2**-6, 1.0 + 2**-7, -2.5])


def test_write_gradients_and_its_errors(model, tmp_path):
    data = make_data()
    path = tmp_path / "w.safetensors"
    s = write_gradients(model, lm_loss, data, path, mode="sum")
    assert isinstance(s, Statistic)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["mode"] == "sum"
        for k in s:
            assert torch.equal(f.get_tensor(k), s[k])
    calls = []
    with pytest.raises(StatisticError, match=r"\.safetensors"):
        write_gradients(model, lambda m, b: calls.append(1), data, tmp_path / "w.bin")
    assert not calls, "the output path is checked before any gradient work"
    with pytest.raises(StatisticError, match="float32 or bfloat16"):
        save_statistic(s, tmp_path / "x.safetensors", dtype="float16")
    with pytest.raises(StatisticError, match="does not exist"):
        save_statistic(s, tmp_path / "no" / "x.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
