"""Hugging Face models from a folder, JSONL calibration data, and their per-sample losses."""

from __future__ import annotations

import contextlib
import glob
import json
import os

import torch
from torch import nn
from torch.nn import functional as F

from .statistic import StatisticError


def checkpoint_names(folder: str) -> set[str] | None:
    """Tensor names of the folder's safetensors checkpoint (headers only), or None if it has none."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                names.update(h.keys())
        except Exception as e:  # safetensors raises its own error types
            raise StatisticError(f"{f}: cannot read the safetensors header: {e}") from e
    return names


def name_mapper(model: nn.Module, ckpt: set[str] | None):
    """Maps module parameter names to the names the checkpoint uses.

    A task head model (e.g. BertForSequenceClassification, `bert.` + encoder) may have been saved
    from, or be merged with, the bare backbone, so the base model prefix is tried both ways.
    Parameters the checkpoint lacks map to None (left out and listed)."""
    if ckpt is None:
        return None
    prefix = getattr(model, "base_model_prefix", "") or ""

    def to_ckpt(name: str) -> str | None:
        cands = [name]
        if prefix:
            if name.startswith(prefix + "."):
                cands.append(name[len(prefix) + 1 :])
            else:
                cands.append(f"{prefix}.{name}")
        for c in cands:
            if c in ckpt:
                return c
        return None

    return to_ckpt


def read_jsonl(path: str, task: str, max_samples: int | None, label2id: dict):
    """(texts, labels or None). Errors name the file and line."""
    texts, labels = [], []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except OSError as e:
        raise StatisticError(f"{path}: cannot read: {e}") from e
    for lineno, line in enumerate(lines, 1):
        if max_samples is not None and len(texts) >= max_samples:
            break
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise StatisticError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise StatisticError(f'{where}: expected an object with a string "text"')
        texts.append(rec["text"])
        if task == "seq-cls":
            labels.append(_label(rec.get("label"), label2id, where))
    if not texts:
        raise StatisticError(f"{path}: no samples")
    return texts, (labels if task == "seq-cls" else None)


def _label(v, label2id: dict, where: str):
    if v is None:
        raise StatisticError(f'{where}: seq-cls needs a "label" on every line')
    if isinstance(v, bool):
        raise StatisticError(f"{where}: label {v!r} is not an integer, float or class name")
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str) and v in label2id:
        return label2id[v]
    raise StatisticError(
        f"{where}: label {v!r} is not a class of the model (config.label2id has {sorted(label2id)})"
    )


def load(folder: str, task: str, device: str):
    """(model, tokenizer) in fp32 on `device`."""
    import transformers

    if not os.path.isdir(folder):
        raise StatisticError(f"{folder}: not a model folder")
    auto = (
        transformers.AutoModelForCausalLM
        if task == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = auto.from_pretrained(folder, **{_dtype_kwarg(transformers): torch.float32})
    except (OSError, ValueError, KeyError) as e:
        raise StatisticError(f"{folder}: cannot load the model or tokenizer: {e}") from e
    if tok.pad_token is None:
        # Padding only fills the batch; the attention mask and the loss mask ignore it.
        if tok.eos_token is None:
            raise StatisticError(f"{folder}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if task == "seq-cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok


def _dtype_kwarg(transformers) -> str:
    # transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def batches(tok, texts, labels, batch_size: int, max_length: int, device: str):
    for i in range(0, len(texts), batch_size):
        enc = tok(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        b = {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
        }
        if labels is not None:
            b["labels"] = torch.tensor(labels[i : i + batch_size]).to(device)
        yield b


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per sample: mean next-token cross-entropy over the sample's own (unpadded) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, reduction="none")
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1)


def seq_cls_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per sample: cross-entropy of the label (MSE for a single-output regression head)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = batch["labels"]
    if logits.shape[-1] == 1:
        return (logits[:, 0].float() - y.float()) ** 2
    return F.cross_entropy(logits.float(), y.long(), reduction="none")


@contextlib.contextmanager
def vmap_friendly_masks():
    """Lets torch.func.vmap trace Hugging Face attention masks, while the context is open.

    transformers (4.5x/5.x `masking_utils`) skips building the attention mask when a batch has no
    padding, a check that reads tensor values (`mask.all()`) and so stops vmap. The skip is an
    optimisation only: building the mask always gives the same attention. Outside those versions
    this does nothing, and `per_sample="auto"` falls back to a per-sample loop if vmap fails."""
    try:
        import transformers.masking_utils as mu
    except ImportError:
        yield
        return
    names = [
        n for n in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa") if hasattr(mu, n)
    ]
    saved = {n: getattr(mu, n) for n in names}
    try:
        for n in names:
            setattr(mu, n, _never)
        yield
    finally:
        for n, f in saved.items():
            setattr(mu, n, f)


def _never(*args, **kwargs) -> bool:
    return False
