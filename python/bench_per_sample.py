"""Time of the two per-sample paths of gradient_statistic (mode abs) on a small transformer
classifier (with the wheel installed): `python python/bench_per_sample.py [--samples N] [--batch-size B] [--threads T]`."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from stamerge.grads import gradient_statistic


class Classifier(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Classifier()
    ids = torch.randint(0, 1000, (a.samples, a.seq))
    labels = torch.randint(0, 4, (a.samples,))
    batches = [
        (ids[i : i + a.batch_size], labels[i : i + a.batch_size])
        for i in range(0, a.samples, a.batch_size)
    ]

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    params = sum(p.numel() for p in model.parameters())
    print(
        f"{params} parameters, {a.samples} samples, batch {a.batch_size}, seq {a.seq}, "
        f"{torch.get_num_threads()} threads"
    )
    res = {}
    for path in ("vmap", "loop"):
        t = time.perf_counter()
        res[path] = gradient_statistic(model, loss, batches, per_sample=path)
        dt = time.perf_counter() - t
        print(f"{path}: {dt:.2f} s ({a.samples / dt:.1f} samples/s)")
    diff = max((res["vmap"][k] - res["loop"][k]).abs().max().item() for k in res["loop"])
    top = max(t.abs().max().item() for t in res["loop"].values())
    print(f"max |vmap - loop| = {diff:.3g} (largest entry {top:.3g})")


if __name__ == "__main__":
    main()
