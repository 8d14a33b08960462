"""Results over seeds: the Markdown table, results.json, and the PNG plots."""

import json
import os
import statistics

import merges

ORDER = ["zero_shot", "fine_tuned", *merges.METHODS]
# What the tables and plots call the benchmark and its per-task score (run_lm.py sets them).
NAME, SCORE = "MiniLM-7", "accuracy"


def configure(name, score):
    global NAME, SCORE
    NAME, SCORE = name, score


def _mean_spread(xs):
    """Mean and spread; spread is the sample standard deviation over seeds (0 with one seed)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_difference(runs, tasks, method, against="task_arithmetic"):
    """The 7-task mean test accuracy of `method` minus `against`'s, in points, with a paired 95 %
    interval over test examples: per seed and task, d_i = correct_method(i) − correct_against(i)
    on the same test items of the same fine-tuned checkpoints; D = mean over seeds of the mean
    over tasks of mean(d); Var(D) = Σ_s Σ_t var(d_st) / n_st / (S² T²) (normal approximation).
    Conditional on the seeds' checkpoints: it says whether the two merges differ on these
    checkpoints, not how much fine-tuning noise moves them. None without per-example results."""
    ds, var = [], 0.0
    for r in runs:
        a = r["methods"].get(method, {}).get("test_items")
        b = r["methods"].get(against, {}).get("test_items")
        if not a or not b:
            return None
        per_task = []
        for t in tasks:
            d = [x - y for x, y in zip(a[t], b[t])]
            n = len(d)
            mu = statistics.fmean(d)
            per_task.append(mu)
            var += (statistics.variance(d) if n > 1 else 0.0) / n / (len(tasks) ** 2)
        ds.append(statistics.fmean(per_task))
    s = len(ds)
    diff = 100.0 * statistics.fmean(ds)
    half = 100.0 * 1.96 * (var / s**2) ** 0.5
    lo, hi = diff - half, diff + half
    return {
        "against": against,
        "difference": round(diff, 2),
        "interval_95": [round(lo, 2), round(hi, 2)],
        "verdict": "higher" if lo > 0 else ("lower" if hi < 0 else "no difference shown"),
    }


def summarise(runs, tasks):
    out = {"seeds": [r["seed"] for r in runs], "spread": "sample standard deviation over seeds", "methods": {}}
    for m in ORDER:
        per_seed = [r for r in runs if m in r["methods"]]
        if not per_seed:
            continue
        avgs, norms, task_vals, task_norms = [], [], {t: [] for t in tasks}, {t: [] for t in tasks}
        for r in per_seed:
            test = r["methods"][m]["test"]
            ft = r["methods"]["fine_tuned"]["test"]
            avgs.append(statistics.fmean(test[t] for t in tasks))
            norms.append(statistics.fmean(100.0 * test[t] / ft[t] for t in tasks))
            for t in tasks:
                task_vals[t].append(test[t])
                task_norms[t].append(100.0 * test[t] / ft[t])
        avg, spread = _mean_spread(avgs)
        navg, nspread = _mean_spread(norms)
        entry = {
            "avg": round(avg, 2),
            "spread": round(spread, 2),
            "normalized_avg": round(navg, 2),
            "normalized_spread": round(nspread, 2),
            "tasks": {t: round(statistics.fmean(v), 2) for t, v in task_vals.items()},
            "normalized_tasks": {t: round(statistics.fmean(v), 2) for t, v in task_norms.items()},
            "per_seed_avg": [round(a, 2) for a in avgs],
        }
        axis = merges.AXIS.get(m, "density")
        chosen = [{axis: r["methods"][m]["density"], "lambda": r["methods"][m]["lambda"]} for r in per_seed if "lambda" in r["methods"][m]]
        if chosen:
            entry["chosen_on_validation"] = chosen
        if m not in ("zero_shot", "fine_tuned", "task_arithmetic"):
            paired = paired_difference(per_seed, tasks, m)
            if paired:
                entry["vs_task_arithmetic"] = paired
        # Issue 22 asks whether STA beats TIES too.
        if m not in ("zero_shot", "fine_tuned", "ties"):
            paired = paired_difference(per_seed, tasks, m, against="ties")
            if paired:
                entry["vs_ties"] = paired
        robust = _robustness(per_seed, m, tasks)
        if robust:
            entry["robustness"] = robust
        masks = [r["mask_stats"][m] for r in per_seed if m in r.get("mask_stats", {})]
        if m == "task_arithmetic":
            entry["mask"] = {"mean_energy_kept": 1.0, "mean_pairwise_overlap": 1.0, "note": "every entry kept"}
        elif masks:
            entry["mask"] = {
                k: round(statistics.fmean(x[k] for x in masks), 4) for k in ("mean_energy_kept", "mean_pairwise_overlap")
            }
        out["methods"][m] = entry
    forget = [row | {"seed": r["seed"]} for r in runs for row in r.get("forgetting", [])]
    if forget:
        out["forgetting"] = _forgetting(forget, runs)
    return out


def _robustness(runs, method, tasks):
    """How much the choice of λ and density matters: per seed, the 7-task mean test accuracy at
    every point of the method's validation grid (its min, max and range), and at the untuned
    default (`merges.default_point`: λ = 1); then the mean over seeds (± the spread of the
    default). None when the runs hold no test accuracy for the grid."""
    per_seed = []
    for r in runs:
        grid = r.get("grid", {}).get(method, [])
        pts = [g for g in grid if "test" in g]
        if not pts:
            return None
        d0, l0 = merges.default_point(method)
        acc = {(g["density"], g["lambda"]): statistics.fmean(g["test"][t] for t in tasks) for g in pts}
        if (d0, l0) not in acc:
            return None
        # The grid's range only where every point has a test score (run_lm.py tests the default).
        whole = len(pts) == len(grid)
        per_seed.append((min(acc.values()) if whole else None, max(acc.values()) if whole else None, acc[(d0, l0)], len(grid)))
    if not per_seed:
        return None
    lo, hi, dflt, n = zip(*per_seed)
    dm, ds = _mean_spread(dflt)
    d0, l0 = merges.default_point(method)
    whole = None not in lo
    return {
        "grid_points": max(n),
        "test_min": round(statistics.fmean(lo), 2) if whole else None,
        "test_max": round(statistics.fmean(hi), 2) if whole else None,
        "test_range": round(statistics.fmean(h - l for h, l in zip(hi, lo)), 2) if whole else None,
        # fisher has no λ (nor density): its grid is one point.
        "default": {} if merges.METHODS[method][0] == "fisher" else {merges.AXIS.get(method, "density"): d0, "lambda": l0},
        "at_default": round(dm, 2),
        "at_default_spread": round(ds, 2),
    }


def _forgetting(rows, runs):
    """Per (kind, λ scale): mean over tasks and seeds of the forgotten task's test accuracy and of
    the other six tasks' mean, next to the start merge's accuracy on the same tasks."""
    summary = {
        "start": "the chosen 7-task STA merge of each seed",
        "lambda_forget": "scale × the merge's λ; the same for both kinds (matched λ)",
        "by_scale": {},
    }
    start = {r["seed"]: r["methods"]["sta"]["test"] for r in runs if "sta" in r["methods"]}
    for scale in sorted({r["scale"] for r in rows}):
        entry = {}
        for kind in ("sta", "negation"):
            sel = [r for r in rows if r["kind"] == kind and r["scale"] == scale]
            f = statistics.fmean(r["forgotten"] for r in sel)
            o = statistics.fmean(r["others"] for r in sel)
            entry[kind] = {
                "forgotten": round(f, 2),
                "others": round(o, 2),
                "per_task": {r["task"]: {"forgotten": round(r["forgotten"], 2), "others": round(r["others"], 2)} for r in sel if r["seed"] == sel[0]["seed"]},
            }
        before_f, before_o = [], []
        for r in (r for r in rows if r["kind"] == "sta" and r["scale"] == scale):
            s = start[r["seed"]]
            before_f.append(s[r["task"]])
            before_o.append(statistics.fmean(a for t, a in s.items() if t != r["task"]))
        entry["before"] = {"forgotten": round(statistics.fmean(before_f), 2), "others": round(statistics.fmean(before_o), 2)}
        summary["by_scale"][f"{scale:g}"] = entry
    return summary


def markdown(summary, tasks):
    short = {t: t.replace("_", " ") for t in tasks}
    lines = [
        "| method | " + " | ".join(short[t] for t in tasks) + " | avg | normalised |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for m, e in summary["methods"].items():
        cells = [f"{e['tasks'][t]:.1f}" for t in tasks]
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {e['avg']:.1f} ± {e['spread']:.1f} | {e['normalized_avg']:.1f} ± {e['normalized_spread']:.1f} |"
        )
    lines += [
        "",
        "Against task arithmetic and TIES (test, paired 95 % interval over test examples; a difference only where it excludes 0), and the masks of the chosen configuration (energy kept ‖m⊙τ‖²/‖τ‖², mean pairwise overlap |m_i∧m_j|/|m_i|):",
        "",
        "| method | − task arithmetic (points) | 95 % interval | verdict | − TIES (points) | 95 % interval | verdict | energy kept | overlap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in summary["methods"].items():
        p, q, mk = e.get("vs_task_arithmetic"), e.get("vs_ties"), e.get("mask")
        if not p and not q and not mk:
            continue
        cells = []
        for x in (p, q):
            cells += [f"{x['difference']:+.2f}", f"[{x['interval_95'][0]:+.2f}, {x['interval_95'][1]:+.2f}]", x["verdict"]] if x else ["", "", ""]
        cells += [f"{mk['mean_energy_kept']:.3f}", f"{mk['mean_pairwise_overlap']:.3f}"] if mk else ["", ""]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    robust = {m: e["robustness"] for m, e in summary["methods"].items() if "robustness" in e}
    if robust:
        lines += [
            "",
            f"Robustness (test, {len(tasks)}-task mean, mean over seeds): the range over each method's validation grid, the untuned default (λ = 1), and the configuration chosen on validation:",
            "",
            "| method | grid points | test min | test max | range | default | at default | chosen (test avg) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, rb in robust.items():
            dflt = ", ".join(f"{k} {v:g}" for k, v in rb["default"].items() if v is not None) or "—"
            lo, hi, rg = ("—" if rb[k] is None else f"{rb[k]:.1f}" for k in ("test_min", "test_max", "test_range"))
            lines.append(
                f"| {m} | {rb['grid_points']} | {lo} | {hi} | {rg} | {dflt} | "
                f"{rb['at_default']:.1f} ± {rb['at_default_spread']:.1f} | {summary['methods'][m]['avg']:.1f} |"
            )
    lines += ["", f"Normalised (merged ÷ the task's fine-tuned {SCORE}, %):", ""]
    lines += lines[:2]
    for m, e in summary["methods"].items():
        cells = [f"{e['normalized_tasks'][t]:.1f}" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | | {e['normalized_avg']:.1f} ± {e['normalized_spread']:.1f} |")
    if "forgetting" in summary:
        lines += ["", "| forgetting (λ_f / λ) | kind | forgotten task | other six (mean) |", "|---|---|---|---|"]
        for scale, e in summary["forgetting"]["by_scale"].items():
            lines.append(f"| before | start merge | {e['before']['forgotten']:.1f} | {e['before']['others']:.1f} |")
            for kind in ("sta", "negation"):
                lines.append(f"| {scale} | {kind} | {e[kind]['forgotten']:.1f} | {e[kind]['others']:.1f} |")
    return "\n".join(lines) + "\n"


def plots(runs, summary, work, tasks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Accuracy vs density (and sta_threshold's threshold): for each value the λ best on
    # validation, its test accuracy where the run has it (else validation), averaged over seeds.
    def curve(m):
        pts, split = {}, "test"
        for r in runs:
            best = {}
            for g in r.get("grid", {}).get(m, []):
                if g["density"] is None:
                    continue
                v = statistics.fmean(g["val"].values())
                if g["density"] not in best or v > best[g["density"]][0] + 1e-9:
                    best[g["density"]] = (v, g)
            for d, (v, g) in best.items():
                if "test" in g:
                    pts[(r["seed"], d)] = statistics.fmean(g["test"].values())
                else:
                    pts[(r["seed"], d)], split = v, "val"
        xs = sorted({d for _, d in pts})
        return xs, [statistics.fmean(v for (s, d), v in pts.items() if d == x) for x in xs], split

    for axis, xlabel, name in (
        ("density", "density (fraction of each task vector kept)", "accuracy_vs_density.png"),
        ("threshold", "threshold on the normalised importance (sta_threshold)", "accuracy_vs_threshold.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        splits = set()
        for m in merges.METHODS:
            if merges.AXIS.get(m, "density") != axis:
                continue
            xs, ys, split = curve(m)
            if xs:
                splits.add(split)
                ax.plot(xs, ys, marker="o", label=m)
        if not splits:
            plt.close(fig)
            continue
        for m, style in (("task_arithmetic", "--"), ("zero_shot", ":")):
            if m in summary["methods"]:
                ax.axhline(summary["methods"][m]["avg"], linestyle=style, color="grey", label=f"{m} (test)")
        if axis == "density":
            ax.set_xscale("log")
        which = "test" if splits == {"test"} else "validation"
        _finish(
            fig,
            ax,
            xlabel,
            f"{len(tasks)}-task mean {which} {SCORE} (%)",
            f"{NAME}: {SCORE} vs {axis} (λ chosen on validation)",
            os.path.join(work, name),
        )

    if "forgetting" in summary:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        by_scale = summary["forgetting"]["by_scale"]
        for kind, marker in (("sta", "o"), ("negation", "s")):
            xs = [by_scale[s][kind]["forgotten"] for s in by_scale]
            ys = [by_scale[s][kind]["others"] for s in by_scale]
            ax.plot(xs, ys, marker=marker, label=kind)
            for s, x, y in zip(by_scale, xs, ys):
                ax.annotate(f"λ_f={s}·λ", (x, y), fontsize=7)
        b = next(iter(by_scale.values()))["before"]
        ax.plot([b["forgotten"]], [b["others"]], marker="*", markersize=12, linestyle="", label="7-task STA merge")
        _finish(
            fig,
            ax,
            "forgotten task's test accuracy (%) (lower is better)",
            "other six tasks' mean test accuracy (%)",
            "MiniLM-7: forgetting one task",
            os.path.join(work, "forgetting.png"),
        )


def _finish(fig, ax, xlabel, ylabel, title, path):
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(runs, tasks, work, results_path, profile):
    summary = {"profile": profile} | summarise(runs, tasks)
    with open(results_path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(markdown(summary, tasks))
    plots(runs, summary, work, tasks)
    return summary
