"""`stamerge-grads` (`python -m stamerge.grads`): a gradient statistic for a Hugging Face model
folder and JSONL calibration data.

Only the standard library is imported before the arguments are read: `--help` and `--version`
work without PyTorch, and a missing `grads` extra is one line naming the install command, not a
traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from .options import CLI_NEEDS, MODES, PER_SAMPLE, TASKS, message, missing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stamerge-grads",
        description="Write the gradient statistic stamerge reads for STA (`gradients:` in a recipe).",
    )
    p.add_argument(
        "--model", required=True, help="Hugging Face model folder (config, weights, tokenizer)"
    )
    p.add_argument(
        "--data", required=True, help='JSONL calibration data: {"text": ..., "label": ...} per line'
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument(
        "--mode",
        default="abs",
        choices=MODES,
        help="abs: sum of |per-sample grad| (default); sum: summed grad",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="stored dtype (accumulation is fp32)",
    )
    p.add_argument("--max-samples", type=int, default=None, help="use the first N samples")
    p.add_argument("--batch-size", type=int, default=8, help="samples per (vmap) micro-batch")
    p.add_argument("--max-length", type=int, default=512, help="truncate texts to this many tokens")
    p.add_argument(
        "--per-sample",
        default="auto",
        choices=PER_SAMPLE,
        help="how abs mode gets per-sample gradients",
    )
    p.add_argument(
        "--vmap-mib",
        type=int,
        default=1024,
        help="MiB of per-sample gradients one vmap call may hold (larger batches are split)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument("--version", action="version", version=f"stamerge-grads {__version__}")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from . import hf, write_gradients
    from .save import check_out_path
    from .statistic import NONE_REASON, StatisticError

    if args.batch_size < 1:
        raise StatisticError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.vmap_mib < 1:
        raise StatisticError(f"--vmap-mib must be at least 1, not {args.vmap_mib}")
    if args.max_samples is not None and args.max_samples < 1:
        raise StatisticError(f"--max-samples must be at least 1, not {args.max_samples}")
    check_out_path(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = hf.checkpoint_names(args.model)
    model, tok = hf.load(args.model, args.task, device)
    texts, labels = hf.read_jsonl(
        args.data, args.task, args.max_samples, dict(getattr(model.config, "label2id", {}) or {})
    )
    loss_fn = hf.causal_lm_loss if args.task == "causal-lm" else hf.seq_cls_loss
    with hf.vmap_friendly_masks():
        stats = write_gradients(
            model,
            loss_fn,
            hf.batches(tok, texts, labels, args.batch_size, args.max_length, device),
            args.out,
            mode=args.mode,
            dtype=args.dtype,
            names=hf.name_mapper(model, ckpt),
            per_sample=args.per_sample,
            vmap_bytes=args.vmap_mib << 20,
            metadata={"task": args.task, "data": args.data},
        )
    err = sys.stderr
    path = f", per-sample path {stats.per_sample}" if stats.per_sample else ""
    print(
        f"wrote {args.out}: {len(stats)} tensors, mode {stats.mode}, {stats.samples} samples, "
        f"mean loss {stats.mean_loss:.6g}{path}",
        file=err,
    )
    if stats.fallback:
        print(f"  vmap was not usable ({stats.fallback}); used a per-sample loop", file=err)
    for name, why in sorted(stats.skipped.items()):
        if why == NONE_REASON:
            why = "the checkpoint has no tensor of this name"
        print(f"  left out {name}: {why}", file=err)
    if ckpt is not None:
        for name in sorted(ckpt - set(stats) - set(stats.skipped)):
            print(
                f"  left out {name}: a checkpoint tensor that is not a trainable parameter",
                file=err,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    gone = missing(CLI_NEEDS)
    if gone:
        print(f"error: {message('stamerge-grads', gone)}", file=sys.stderr)
        return 2
    from .statistic import StatisticError

    try:
        return run(args)
    except StatisticError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
