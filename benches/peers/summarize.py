"""Medians, per-run ratios, the target check and the PNG plots from results/runs.jsonl and
results/compare.jsonl (written by peers.py). Writes results/summary.md and results/*.png."""

import json
import os
import statistics
from collections import defaultdict

from peers import RESULTS, SHAPES

MIB = 1024


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
    per = defaultdict(lambda: {"time": [], "rss": [], "anon": []})
    for k, tools in rounds.items():
        st = tools.get("stamerge")
        if not st:
            continue
        for tool, r in tools.items():
            if tool == "stamerge":
                continue
            p = per[k[:-1] + (tool,)]
            p["time"].append(st["wall_s"] / r["wall_s"])
            p["rss"].append(st["maxrss_kib"] / r["maxrss_kib"])
            p["anon"].append(st["anon_peak_kib"] / max(1, r["anon_peak_kib"]))
    for k, p in per.items():
        ratios[k] = {m: statistics.median(v) for m, v in p.items()}
        ratios[k]["per_run_time"] = p["time"]
    return med, ratios


def table(med, ratios):
    lines = [
        "| suite | size | dtype | tasks | method | tool | runs | median s | input GB/s | peak RSS MiB | peak anon MiB | time ratio st/peer (per run) | RSS ratio st/peer | anon ratio st/peer | load 1-min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(med, key=lambda k: (k[0], params(k[1]), k[2], k[3], k[4], k[5] != "stamerge", k[5])):
        m = med[k]
        r = ratios.get(k)
        rt = (f"{r['time']:.3f} ({', '.join(f'{x:.2f}' for x in r['per_run_time'])})"
              if r else "")
        rr = f"{r['rss']:.3f} | {r['anon']:.3f}" if r else " | "
        lines.append(
            f"| {k[0]} | {k[1]} ({params(k[1]) / 1e6:.0f} M) | {k[2]} | {k[3]} | {k[4]} | {k[5]} "
            f"| {m['n']} | {m['wall_s']:.2f} | {m['gbps']:.3f} | {m['maxrss_mib']:.0f} "
            f"| {m['anon_mib']:.0f} | {rt} | {rr} | {m['load'][0]:.1f}–{m['load'][1]:.1f} |")
    return lines


def targets(ratios):
    """DESIGN.md §7: faster than mergekit on every recipe, at <= half its peak memory."""
    lines = ["| case | mergekit variant | time st/mk | peak RSS st/mk | peak anon st/mk | faster | <= half RSS | <= half anon |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted(ratios, key=lambda k: (k[0], params(k[1]), k[2:])):
        if not k[5].startswith("mergekit"):
            continue
        r = ratios[k]
        lines.append(
            f"| {k[0]} {k[1]} {k[2]} t{k[3]} {k[4]} | {k[5]} | {r['time']:.3f} | {r['rss']:.3f} "
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


def plots(med):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for suite, xkey, xlabel in (("sizes", "shape", "parameters per checkpoint"),
                                ("tasks", "tasks", "task models")):
        rows = [(k, m) for k, m in med.items() if k[0] == suite]
        if not rows:
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for tool in sorted({k[5] for k, _ in rows}):
            pts = sorted(
                ((params(k[1]) if xkey == "shape" else k[3]), m) for k, m in rows if k[5] == tool)
            xs = [p[0] for p in pts]
            a.plot(xs, [p[1]["wall_s"] for p in pts], "o-", label=tool)
            b.plot(xs, [p[1]["maxrss_mib"] for p in pts], "o-", label=f"{tool} total")
            b.plot(xs, [p[1]["anon_mib"] for p in pts], "x--", label=f"{tool} anon")
        for ax, ylabel in ((a, "median wall time, s"), (b, "peak RSS, MiB")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if xkey == "shape":
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
        b.legend(fontsize=7)
        fig.suptitle(f"ties merge, {suite}: 2 shared cores (see BENCHMARKS.md for load)")
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{suite}.png"), dpi=110)
        plt.close(fig)


def main():
    runs = load("runs.jsonl")
    med, ratios = summarize(runs)
    out = ["# Peers: results (generated by summarize.py)", "",
           "Machine and load: see machine.txt and the load column (1-min load average before the "
           "first and after the last run of a row). The machine was shared with other jobs.", "",
           "## Time and memory", ""]
    out += table(med, ratios)
    out += ["", "## Targets (DESIGN.md §7)", ""] + targets(ratios)
    out += ["", "## Output comparison (first round's outputs)", ""] + compare_table(load("compare.jsonl"))
    failed = [r for r in runs if r["rc"]]
    if failed:
        out += ["", "## Failed runs", ""]
        out += [f"- {r['suite']} {r['shape']} {r['method']} {r['tool']} r{r['round']}: rc {r['rc']}, "
                f"{r['wall_s']:.1f}s: `{r.get('tail', '')[-300:]!r}`" for r in failed]
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    plots(med)


if __name__ == "__main__":
    main()
