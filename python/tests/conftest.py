"""Shared fixtures: tiny models, and the straightforward per-sample loop the tool is checked against."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn


def reference_statistic(model: nn.Module, per_sample_losses, mode: str):
    """One backward pass per sample through `.grad`, the plainest way there is.

    `per_sample_losses` yields one scalar loss per sample. Returns (name -> fp32 tensor for every
    name the trainable parameters have, sample count, mean loss)."""
    model.eval()
    by_id = {id(p): p for p in model.parameters() if p.requires_grad}
    acc = {pid: torch.zeros(p.shape, dtype=torch.float64) for pid, p in by_id.items()}
    n, total = 0, 0.0
    for loss in per_sample_losses:
        for p in by_id.values():
            p.grad = None
        loss.backward()
        for pid, p in by_id.items():
            if p.grad is not None:
                g = p.grad.double()
                acc[pid] += g.abs() if mode == "abs" else g
        n += 1
        total += loss.item()
    out = {
        name: acc[id(p)].float()
        for name, p in model.named_parameters(remove_duplicate=False)
        if id(p) in acc
    }
    return out, n, total / n


def assert_close_stats(got, want, rtol=1e-5):
    """Equal up to fp32 rounding, measured against the largest entry of the whole statistic
    (entries whose true value is 0, e.g. attention key biases, come out as rounding noise)."""
    assert set(got) == set(want)
    scale = max(t.abs().max().item() for t in want.values())
    assert scale > 0
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * scale, msg=k)


def cli_args(model, data, task, out, **options):
    """`python -m stamerge.grads` arguments; options become `--name value` (`_` -> `-`)."""
    args = ["--model", str(model), "--data", str(data), "--task", task, "--out", str(out)]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "fast",
    "slow",
    "big",
    "small",
    "red",
    "blue",
]


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(11):
            words = [r.choice(WORDS) for _ in range(r.randint(2, 9))]
            f.write(json.dumps({"text": " ".join(words), "label": r.randint(0, 2)}) + "\n")
    return path


def _tokenizer(**special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", **special), len(vocab)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 with tied input/output embeddings and no pad token."""
    tf = pytest.importorskip("transformers")
    return _tiny(
        tmp_path_factory.mktemp("tiny-gpt2"),
        1,
        {"eos_token": "[EOS]"},
        tf.GPT2LMHeadModel,
        tf.GPT2Config,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=2,
    )


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT with a 3-class head."""
    tf = pytest.importorskip("transformers")
    return _tiny(
        tmp_path_factory.mktemp("tiny-bert"),
        2,
        {"pad_token": "[PAD]"},
        tf.BertForSequenceClassification,
        tf.BertConfig,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        label2id={"neg": 0, "neu": 1, "pos": 2},
        id2label={0: "neg", 1: "neu", 2: "pos"},
    )


def _tiny(folder, seed, special, model_cls, config_cls, **config):
    tok, vocab = _tokenizer(**special)
    torch.manual_seed(seed)
    model_cls(config_cls(vocab_size=vocab, **config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
