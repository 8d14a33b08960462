"""Fine-tuning one task's encoder through its frozen head, and the task's gradient statistic."""

import random

import torch
import torch.nn.functional as F

from model import collate, logits, lr_lambda

EPOCHS = 3
BATCH = 32
LR = 5e-5
# The calibration set (the first CALIBRATION training examples) and the training examples used
# (the first MAX_TRAIN of the shuffled, stratified train split; None: all). run.py sets both from
# its --profile: the protocol's 256 and all for "full", 64 and 320 for "quick".
CALIBRATION = 256
MAX_TRAIN = None


def finetune(model, ids, labels, w, seed, log=print):
    """AdamW (lr 5e-5, no weight decay), 10 % warm-up then linear decay, batch 32, 3 epochs."""
    ids, labels = ids[:MAX_TRAIN], labels[:MAX_TRAIN]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    steps_per_epoch = (len(ids) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(EPOCHS * steps_per_epoch))
    y = torch.as_tensor(labels)
    model.train()
    for epoch in range(EPOCHS):
        order = list(range(len(ids)))
        rng.shuffle(order)
        total = 0.0
        for s in range(0, len(order), BATCH):
            idx = order[s : s + BATCH]
            z = model(*collate([ids[i] for i in idx]))
            loss = F.cross_entropy(logits(z, w), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"  epoch {epoch + 1}: train loss {total / len(ids):.4f}")
    model.eval()
    return model


def gradients(model, ids, labels, w, path):
    """Σ_j |∂L_j/∂θ| over the first 256 training examples, through the project's gradient tool."""
    from stamerge.grads import write_gradients

    n = min(CALIBRATION, len(ids))
    y = torch.as_tensor(labels[:n])

    def batches():
        for s in range(0, n, BATCH):
            ids_b, attn_b = collate(ids[s : s + BATCH])
            yield ids_b, attn_b, y[s : s + BATCH]

    def loss_fn(m, batch):
        ids_b, attn_b, y_b = batch
        return F.cross_entropy(logits(m(ids_b, attn_b), w), y_b, reduction="none")

    # Dropout off: the statistic is taken at the fine-tuned weights, deterministically.
    model.eval()
    return write_gradients(model, loss_fn, list(batches()), path, mode="abs", dtype="float32")
