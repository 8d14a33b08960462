#!/usr/bin/env bash
# The CPU merge against reading its inputs once from a warm page cache (issue 19's targets: TIES
# and STA within 5x, task arithmetic within 2x, in CPU time), and against reading the inputs plus
# writing an output of the merge's size, in wall and CPU time.
#
# usage: scripts/bench-warm-read.sh SET_DIR [RECIPE ...]   (default: task_arithmetic ties sta)
# env:   BINS     "label=path ..." binaries to compare, run alternately in every round
#                 (default: "stamerge=target/release/stamerge")
#        ROUNDS   rounds (3); each round runs, per recipe, the read, every binary (the order
#                 rotating from round to round) and the read + write, once each
#        OUT      output folder on tmpfs, so that the disk is not part of the figure
#                 (/dev/shm/stamerge-warm-read)
#        RESULTS  one JSON line per run (benches/peers/results/warm-read.jsonl)
#        THREADS  --threads of the merge (default: every core)
#
# The references, each a process timed by /usr/bin/time like the merge:
#   read        `cat` of exactly the files the recipe reads, to /dev/null (one reader);
#   read+write  that, plus `cat` of the merge's output shards into one new file in OUT's
#               filesystem (which also reads the output once: it slightly favours the merge).
# CPU time is user + sys of the process. The inputs must fit the page cache next to the output;
# they are read once before the first round. Every run records the 1-minute load before it: on a
# shared machine, compare CPU times, and wall times only where the load was low.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,24p "$0"; exit 2; }
export SET_DIR=$(cd "$1" && pwd)
shift
export RECIPES="${*:-task_arithmetic ties sta}"
export BINS=${BINS:-stamerge=target/release/stamerge}
export ROUNDS=${ROUNDS:-3}
export OUT=${OUT:-/dev/shm/stamerge-warm-read}
export RESULTS=${RESULTS:-benches/peers/results/warm-read.jsonl}
export THREADS=${THREADS:-$(nproc)}
exec python3 - <<'PY'
import json, os, re, shutil, statistics, subprocess, sys, time

set_dir, out, results = os.environ["SET_DIR"], os.environ["OUT"], os.environ["RESULTS"]
recipes = os.environ["RECIPES"].split()
bins = [b.split("=", 1) for b in os.environ["BINS"].split()]
rounds, threads = int(os.environ["ROUNDS"]), os.environ["THREADS"]

def machine():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs ({model}), Linux {os.uname().release}, output on {out}"

def load1():
    return float(open("/proc/loadavg").read().split()[0])

def inputs(recipe):
    """The safetensors files a recipe reads: its base, models and gradient folders."""
    path = os.path.join(set_dir, recipe + ".yml")
    dirs = []
    for line in open(path):
        m = re.match(r"\s*(?:-\s*)?(base_model|model|gradients|start_model):\s*(\S+)", line)
        if m:
            d = m.group(2)
            dirs.append(d if os.path.isabs(d) else os.path.join(os.path.dirname(path), d))
    files = []
    for d in dict.fromkeys(dirs):
        files += sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".safetensors"))
    return files

def timed(cmd, env=None):
    """(wall s, user s, sys s, max RSS KiB) of one process."""
    tf = "/tmp/bench-warm-read-time.txt"
    p = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf] + cmd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.decode(errors='replace')}")
    wall, user, sys_, rss = open(tf).read().split()[-4:]
    return float(wall), float(user), float(sys_), int(rss)

def record(**r):
    r["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")
    return r

print(f"machine: {machine()}; {rounds} rounds; threads {threads}; "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load {load1()}", flush=True)
runs = []
for recipe in recipes:
    files = inputs(recipe)
    nbytes = sum(os.path.getsize(f) for f in files)
    subprocess.run(["cat"] + files, stdout=subprocess.DEVNULL, check=True)  # warm
    for rnd in range(1, rounds + 1):
        order = bins[(rnd - 1) % len(bins):] + bins[:(rnd - 1) % len(bins)]
        for what, path in [("read", None)] + order + [("read+write", None)]:
            load = load1()
            if what == "read":
                w, u, s, rss = timed(["sh", "-c", 'cat "$@" > /dev/null', "sh"] + files)
            elif what == "read+write":
                shards = sorted(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".safetensors"))
                copy = out + ".copy"
                w, u, s, rss = timed(["sh", "-c", 'c=$1; shift; cat "$@" > /dev/null; cat '
                                      + " ".join(f'"{x}"' for x in shards) + ' > "$c"', "sh", copy] + files)
                os.remove(copy)
                shutil.rmtree(out)
            else:
                shutil.rmtree(out, ignore_errors=True)
                w, u, s, rss = timed([path, "-q", "merge", os.path.join(set_dir, recipe + ".yml"), out,
                                      "--device", "cpu", "--threads", threads])
            r = record(set=set_dir, recipe=recipe, input_bytes=nbytes, what=what, round=rnd,
                       binary=path, wall_s=w, user_s=u, sys_s=s, cpu_s=round(u + s, 3),
                       maxrss_kib=rss, load1_before=load, machine=machine())
            runs.append(r)
            print(f"  {recipe:16} round {rnd} {what:12} wall {w:7.2f} s  cpu {u + s:7.2f} s  "
                  f"(user {u:.2f}, sys {s:.2f})  load {load}", flush=True)

def med(rs, key):
    return statistics.median(r[key] for r in rs)

print()
print("| recipe | input GB | binary | wall s | CPU s | read: wall / CPU s | read+write: wall / CPU s "
      "| wall ÷ read | CPU ÷ read | wall ÷ (read+write) | CPU ÷ (read+write) | load |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for recipe in recipes:
    rr = [r for r in runs if r["recipe"] == recipe]
    rd = [r for r in rr if r["what"] == "read"]
    rw = [r for r in rr if r["what"] == "read+write"]
    for label, _ in bins:
        m = [r for r in rr if r["what"] == label]
        loads = [r["load1_before"] for r in m + rd + rw]
        print(f"| {recipe} | {rr[0]['input_bytes'] / 1e9:.2f} | {label} | {med(m, 'wall_s'):.2f} "
              f"| {med(m, 'cpu_s'):.2f} | {med(rd, 'wall_s'):.2f} / {med(rd, 'cpu_s'):.2f} "
              f"| {med(rw, 'wall_s'):.2f} / {med(rw, 'cpu_s'):.2f} "
              f"| {med(m, 'wall_s') / med(rd, 'wall_s'):.1f} | {med(m, 'cpu_s') / med(rd, 'cpu_s'):.1f} "
              f"| {med(m, 'wall_s') / med(rw, 'wall_s'):.1f} | {med(m, 'cpu_s') / med(rw, 'cpu_s'):.1f} "
              f"| {min(loads)}–{max(loads)} |")
print("\n(medians of the rounds; per-run values in " + results + ")")
PY
