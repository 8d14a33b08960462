"""Medians, per-run ratios, the target check and the PNG plots from results/runs.jsonl and
results/compare.jsonl (written by peers.py). Writes results/summary.md and results/*.png."""

import json
import os
import statistics
from collections import defaultdict

from peers import RESULTS, SHAPES

MIB = 1024
# Runs that started at a 1-minute load average at most this are "quiet" (nothing else ran);
# the plots use only those where a point has any.
QUIET_LOAD = 4.0


def params(shape):
    s = SHAPES[shape]
    h, i, layers, v = s["hidden"], s["intermediate"], s["layers"], 32000
    return 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h


def load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def case_key(r):
    return (r["suite"], r["shape"], r["dtype"], r["tasks"], r["method"])


def summarize(runs):
    """Per case and tool: medians; per case and peer: median of the per-round ratios."""
    by = defaultdict(list)
    for r in runs:
        if r["rc"] == 0:
            by[case_key(r) + (r["tool"],)].append(r)
    med = {}
    for k, rs in by.items():
        med[k] = {
            "n": len(rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "gbps": statistics.median(r["input_gbps"] for r in rs),
            "cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in rs),
            "maxrss_mib": statistics.median(r["maxrss_kib"] for r in rs) / MIB,
            "anon_mib": statistics.median(r["anon_peak_kib"] for r in rs) / MIB,
            "input_gb": rs[0]["input_bytes"] / 1e9,
            "load": (min(r["load1_before"] for r in rs), max(r["load1_after"] for r in rs)),
        }
    ratios = {}
    rounds = defaultdict(dict)
    for r in runs:
        if r["rc"] == 0:
            rounds[case_key(r) + (r["round"],)][r["tool"]] = r
    per = defaultdict(lambda: {"time": [], "cpu": [], "rss": [], "anon": []})
    for k, tools in rounds.items():
        st = tools.get("stamerge")
        if not st:
            continue
        for tool, r in tools.items():
            if tool == "stamerge":
                continue
            p = per[k[:-1] + (tool,)]
            p["time"].append(st["wall_s"] / r["wall_s"])
            p["cpu"].append((st["user_s"] + st["sys_s"]) / (r["user_s"] + r["sys_s"]))
            p["rss"].append(st["maxrss_kib"] / r["maxrss_kib"])
            p["anon"].append(st["anon_peak_kib"] / max(1, r["anon_peak_kib"]))
    for k, p in per.items():
        ratios[k] = {m: statistics.median(v) for m, v in p.items()}
        ratios[k]["per_run_time"] = p["time"]
    return med, ratios


def table(med, ratios):
    lines = [
        "| suite | size | dtype | tasks | method | tool | runs | median s | CPU s (user+sys) | input GB/s | peak RSS MiB | peak anon MiB | time ratio st/peer (per run) | CPU ratio st/peer | RSS ratio st/peer | anon ratio st/peer | load 1-min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(med, key=lambda k: (k[0], params(k[1]), k[2], k[3], k[4], k[5] != "stamerge", k[5])):
        m = med[k]
        r = ratios.get(k)
        rt = (f"{r['time']:.3f} ({', '.join(f'{x:.2f}' for x in r['per_run_time'])})"
              if r else "")
        rr = f"{r['cpu']:.3f} | {r['rss']:.3f} | {r['anon']:.3f}" if r else " | | "
        lines.append(
            f"| {k[0]} | {k[1]} ({params(k[1]) / 1e6:.0f} M) | {k[2]} | {k[3]} | {k[4]} | {k[5]} "
            f"| {m['n']} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['gbps']:.3f} | {m['maxrss_mib']:.0f} "
            f"| {m['anon_mib']:.0f} | {rt} | {rr} | {m['load'][0]:.1f}–{m['load'][1]:.1f} |")
    return lines


def targets(ratios):
    """§7 of the project's design notes (DESIGN.md, kept outside this repository): faster than
    mergekit on every recipe, at <= half its peak memory."""
    lines = ["| case | mergekit variant | time st/mk | CPU time st/mk | peak RSS st/mk | peak anon st/mk | faster | <= half RSS | <= half anon |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(ratios, key=lambda k: (k[0], params(k[1]), k[2:])):
        if not k[5].startswith("mergekit"):
            continue
        r = ratios[k]
        lines.append(
            f"| {k[0]} {k[1]} {k[2]} t{k[3]} {k[4]} | {k[5]} | {r['time']:.3f} | {r['cpu']:.3f} "
            f"| {r['rss']:.3f} "
            f"| {r['anon']:.3f} | {'yes' if r['time'] < 1 else 'NO'} "
            f"| {'yes' if r['rss'] <= 0.5 else 'NO'} | {'yes' if r['anon'] <= 0.5 else 'NO'} |")
    return lines


def compare_table(cmp):
    lines = ["| size | dtype | tasks | method | stamerge vs | tensors | elements | 1 ulp | > 1 ulp | max ulp | differing, not at a top-k tie | worst tensor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cmp:
        if "error" in c:
            lines.append(f"| {c['shape']} | {c['dtype']} | {c['tasks']} | {c['method']} | {c['peer']} | error: {c['error'][-200:]!r} |")
            continue
        lines.append(
            f"| {c['shape']} | {c['dtype']} | {c['tasks']} | {c['method']} | {c['peer']} "
            f"| {c['tensors']} | {c['elements']} | {c['diff_1ulp']} | {c['diff_gt1ulp']} "
            f"| {c['max_ulp']} | {c.get('diff_not_at_tie', '')} | {c['worst_tensor'] or ''} |")
    return lines


def plot_points(runs, which):
    """{tool: [(x, median wall s, median CPU s, median RSS MiB, median anon MiB, quiet)]} over every
    TIES run, bf16, that belongs to the scan: by size at 2 tasks, or by task count at 100 M. A point
    takes its quiet runs when it has any (quiet = True), else every run."""
    pts = defaultdict(list)
    for r in runs:
        if r["rc"] or r["method"] != "ties" or r["dtype"] != "bfloat16":
            continue
        if which == "sizes" and r["tasks"] == 2:
            pts[(r["tool"], params(r["shape"]))].append(r)
        elif which == "tasks" and r["shape"] == "100m":
            pts[(r["tool"], r["tasks"])].append(r)
    out = defaultdict(list)
    for (tool, x), rs in sorted(pts.items()):
        quiet = [r for r in rs if r["load1_before"] <= QUIET_LOAD]
        rs = quiet or rs
        out[tool].append((x, statistics.median(r["wall_s"] for r in rs),
                          statistics.median(r["user_s"] + r["sys_s"] for r in rs),
                          statistics.median(r["maxrss_kib"] for r in rs) / MIB,
                          statistics.median(r["anon_peak_kib"] for r in rs) / MIB,
                          bool(quiet)))
    return out


def plots(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for which, xlabel in (("sizes", "parameters per checkpoint (2 tasks)"),
                          ("tasks", "task models (106 M parameters each)")):
        series = plot_points(runs, which)
        if not series:
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for tool, pts in sorted(series.items()):
            xs = [p[0] for p in pts]
            (line,) = a.plot(xs, [p[1] for p in pts], "o-", label=f"{tool}: wall")
            a.plot(xs, [p[2] for p in pts], "x:", color=line.get_color(),
                   label=f"{tool}: CPU (user+sys)")
            b.plot(xs, [p[3] for p in pts], "o-", color=line.get_color(),
                   label=f"{tool}: RSS (with mapped inputs)")
            b.plot(xs, [p[4] for p in pts], "x--", color=line.get_color(),
                   label=f"{tool}: anonymous")
        for ax, ylabel in ((a, "median time, s"), (b, "peak memory, MiB")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
        b.legend(fontsize=7, loc="upper left")
        for tool, pts in series.items():
            for p in pts:
                if not p[5]:
                    a.annotate("loaded", (p[0], p[1]), fontsize=6, alpha=0.6)
        fig.suptitle(f"TIES merge by {'model size' if which == 'sizes' else 'task count'}, 2 vCPUs: "
                     f"median of the quiet runs (load ≤ {QUIET_LOAD:g}); 'loaded': only runs beside "
                     "other jobs (BENCHMARKS.md)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{which}.png"), dpi=110)
        plt.close(fig)


def main():
    # A run marked "excluded" (with the reason) stays in runs.jsonl but not in the figures.
    every = load("runs.jsonl")
    runs = [r for r in every if not r.get("excluded")]
    med, ratios = summarize(runs)
    out = ["# Peers: results (generated by summarize.py)", "",
           "Machine and load: see machine.txt and the load column (1-min load average before the "
           "first and after the last run of a row). The machine was shared with other jobs.", "",
           "## Time and memory", ""]
    out += table(med, ratios)
    out += ["", "## Targets (§7 of the project's design notes, DESIGN.md, kept outside this repository)", ""] + targets(ratios)
    out += ["", "## Output comparison (first round's outputs)", ""] + compare_table(load("compare.jsonl"))
    excluded = [r for r in every if r.get("excluded")]
    if excluded:
        out += ["", "## Runs left out of the figures", ""]
        out += [f"- {r['suite']} {r['shape']} {r['method']} {r['tool']} r{r['round']} "
                f"({r['wall_s']:.1f}s): {r['excluded']}" for r in excluded]
    failed = [r for r in runs if r["rc"]]
    if failed:
        out += ["", "## Failed runs", ""]
        out += [f"- {r['suite']} {r['shape']} {r['method']} {r['tool']} r{r['round']}: rc {r['rc']}, "
                f"{r['wall_s']:.1f}s: `{r.get('tail', '')[-300:]!r}`" for r in failed]
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    plots(runs)


if __name__ == "__main__":
    main()
