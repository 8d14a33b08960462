"""stamerge beside its peers (mergekit, a plain PyTorch merge) on the same synthetic inputs.

Runs every tool on the same recipe, alternating (the order rotates each round), and records per
run: wall time, peak RSS (total, from wait4; anonymous and file-backed, sampled from /proc), GB/s
of input and the load average. The first round's outputs are compared (compare.py). See
BENCHMARKS.md "Peers" and benches/peers/run.sh, the one command that drives this.

usage: peers.py SUITE [SUITE..]   suites: methods, sizes, tasks, smoke
       peers.py case SUITE SHAPE DTYPE TASKS METHODS TOOLS RUNS [SET_TASKS [nocompare]]
environment: STAMERGE (binary), MERGEKIT_VENV, TORCH_PYTHON, PEERS_DATA, PEERS_RESULTS, PEERS_RUNS, PEERS_FIRST_ROUND
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STAMERGE = os.environ.get("STAMERGE", os.path.join(HERE, "../../target/release/stamerge"))
MERGEKIT_VENV = os.environ.get("MERGEKIT_VENV", "/work/venv-mergekit")
TORCH_PYTHON = os.environ.get("TORCH_PYTHON", sys.executable)
DATA = os.environ.get("PEERS_DATA", "/work/peers-data")
RESULTS = os.environ.get("PEERS_RESULTS", os.path.join(HERE, "results"))
RUNS = int(os.environ.get("PEERS_RUNS", "3"))
# The first round's number: more rounds of a case measured later continue its numbering, so that
# the per-round ratios pair each tool with the stamerge run of its own round.
FIRST_ROUND = int(os.environ.get("PEERS_FIRST_ROUND", "0"))
SHARD_BYTES = 2 << 30

# Llama layouts (vocab 32000): parameters per checkpoint in the comment.
SHAPES = {
    "25m": dict(layers=2, hidden=512, intermediate=1408),  # 39 M (the embeddings are 33 M): smoke
    "100m": dict(layers=8, hidden=768, intermediate=2048),  # 106 M
    "300m": dict(layers=16, hidden=1024, intermediate=2816),  # 271 M
    "1b": dict(layers=18, hidden=2048, intermediate=5632),  # 1.06 B
    "3b": dict(layers=26, hidden=3072, intermediate=8192),  # 3.14 B
}
# Sets made without gradient files (ties/task_arithmetic/magnitude only), to fit the disk.
NO_GRADIENTS = {"3b"}
# An existing 1.06 B bf16 set (3 tasks with gradients) is reused instead of generating one.
SHARED_1B = "/work/bench-data/llama1b"

METHODS = {
    # name: (stamerge/mergekit method, global parameters, per-model parameters)
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
    "ties": ("ties", {"normalize": True}, {"weight": 1.0, "density": 0.3}),
    "magnitude": ("magnitude", {"lambda": 0.8}, {"weight": 1.0, "density": 0.2}),
    "sta": ("sta", {}, {"density": 0.1}),
    # Issue 17's sparsifying methods (stamerge and mergekit only: torch_merge.py lacks them).
    "dare_ties": ("dare_ties", {}, {"weight": 1.0, "density": 0.3}),
    "della": ("della", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "breadcrumbs": ("breadcrumbs", {}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "sce": ("sce", {"select_topk": 0.5}, {}),
    "ram": ("ram", {}, {}),
    # The interpolating methods (issue 17); slerp, nearswap and arcee_fusion take one model,
    # nuslerp two. linear weighs the base as one more input (the global weight).
    "linear": ("linear", {"weight": 0.5}, {"weight": 1.0}),
    "slerp": ("slerp", {"t": 0.4}, {}),
    "nuslerp": ("nuslerp", {}, {"weight": 1.0}),
    "multislerp": ("multislerp", {}, {"weight": 1.0}),
    "karcher": ("karcher", {}, {}),
    "model_stock": ("model_stock", {}, {}),
    "nearswap": ("nearswap", {"t": 0.001}, {}),
    "arcee_fusion": ("arcee_fusion", {}, {}),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def dataset(shape, dtype, tasks):
    """The folder of a synthetic set with at least `tasks` tasks, generating it when absent."""
    if shape == "1b" and dtype == "bfloat16" and tasks <= 3 and os.path.isdir(SHARED_1B):
        return SHARED_1B
    path = os.path.join(DATA, f"{shape}-{dtype}-t{tasks}")
    if shape in NO_GRADIENTS:
        # Base and tasks only (make_llama.py): a full synth set would not fit the disk.
        if not os.path.exists(os.path.join(path, f"task_{tasks - 1}", "config.json")):
            s = SHAPES[shape]
            log(f"make_llama {path}")
            subprocess.run([TORCH_PYTHON, os.path.join(HERE, "make_llama.py"), path,
                            str(s["layers"]), str(s["hidden"]), str(s["intermediate"]),
                            str(tasks), dtype], check=True)
        return path
    if not os.path.exists(os.path.join(path, "base", "config.json")):
        s = SHAPES[shape]
        args = [STAMERGE, "synth", path, "--layers", str(s["layers"]), "--hidden",
                str(s["hidden"]), "--intermediate", str(s["intermediate"]), "--vocab", "32000",
                "--tasks", str(tasks), "--dtype", dtype, "--grad-dtype", dtype,
                "--shard-size", "2GB"]
        log("synth " + " ".join(args[1:]))
        subprocess.run(args, check=True)
    return path


def input_bytes(folders):
    total = 0
    for d in folders:
        for name in os.listdir(d):
            if name.endswith(".safetensors"):
                total += os.path.getsize(os.path.join(d, name))
    return total


def warm(folders):
    """Reads the inputs once so that every tool, the first one included, meets a warm cache."""
    for d in folders:
        for name in sorted(os.listdir(d)):
            if name.endswith(".safetensors"):
                with open(os.path.join(d, name), "rb") as f:
                    while f.read(64 << 20):
                        pass


def recipes(method, setdir, tasks, out_dtype):
    """(stamerge YAML, mergekit YAML, torch JSON) of one merge, with absolute paths."""
    mname, glob, per = METHODS[method]
    models = [os.path.join(setdir, f"task_{t}") for t in range(tasks)]
    grads = [os.path.join(setdir, f"grads_{t}") for t in range(tasks)]

    def yaml(method_name, glob, per, with_grads, dtype_lines):
        lines = [f"merge_method: {method_name}", f"base_model: {setdir}/base"]
        if glob:
            lines.append("parameters:")
            lines += [f"  {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in glob.items()]
        lines.append("models:")
        for t, m in enumerate(models):
            lines.append(f"  - model: {m}")
            if with_grads:
                lines.append(f"    gradients: {grads[t]}")
            if per:
                lines.append("    parameters:")
                lines += [f"      {k}: {v}" for k, v in per.items()]
        return "\n".join(lines + dtype_lines) + "\n"

    # The same arithmetic on both sides: mergekit loads the inputs as fp32 and writes out_dtype.
    dtype_lines = ["dtype: float32", f"out_dtype: {out_dtype}"]
    st = yaml(mname, glob, per, method == "sta", dtype_lines)
    mk = None
    if method != "sta":
        # mergekit has no `magnitude` method: `breadcrumbs` with gamma 0 is magnitude pruning
        # followed by a linear sum, which is what stamerge's `magnitude` is.
        mk_name, mk_per = mname, dict(per)
        if method == "magnitude":
            mk_name, mk_per = "breadcrumbs", dict(per, gamma=0.0)
        mk = {
            "fp32": yaml(mk_name, glob, mk_per, False, dtype_lines),
            # What a mergekit user gets by default: arithmetic in the inputs' own dtype.
            "native": yaml(mk_name, glob, mk_per, False, [f"dtype: {out_dtype}"]),
        }
    tj = {
        "method": method,
        "base": f"{setdir}/base",
        "models": [dict(per, model=m, **({"gradients": grads[t]} if method == "sta" else {}))
                   for t, m in enumerate(models)],
        "out_dtype": out_dtype,
        "shard_bytes": SHARD_BYTES,
        **{k: v for k, v in glob.items()},
    }
    return st, mk, tj


def measure(cmd, env=None):
    """Runs cmd; returns wall time, exit code, peak RSS and sampled anon/file peaks (KiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"anon": 0, "file": 0, "sum": 0}
    done = threading.Event()
    out = []

    def pids(root):
        todo, seen = [root], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return seen

    def sample():
        while not done.is_set():
            anon = file = 0
            for pid in pids(p.pid):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                anon += int(line.split()[1])
                            elif line.startswith(("RssFile:", "RssShmem:")):
                                file += int(line.split()[1])
                except OSError:
                    pass
            peak["anon"] = max(peak["anon"], anon)
            peak["file"] = max(peak["file"], file)
            peak["sum"] = max(peak["sum"], anon + file)
            done.wait(0.02)

    def drain():
        out.append(p.stdout.read())

    th = threading.Thread(target=sample)
    th.start()
    dr = threading.Thread(target=drain)
    dr.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    dr.join()
    return {
        "wall_s": wall,
        "rc": p.returncode,
        "maxrss_kib": ru.ru_maxrss,
        "anon_peak_kib": peak["anon"],
        "file_peak_kib": peak["file"],
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "tail": out[0].decode(errors="replace")[-2000:] if out else "",
    }


def tool_commands(tool, method, recipe_dir, st, mk, tj, out):
    if tool == "stamerge":
        path = os.path.join(recipe_dir, f"{method}.stamerge.yml")
        open(path, "w").write(st)
        return [STAMERGE, "merge", path, out, "--device", "cpu", "--overwrite", "--quiet",
                "--out-shard-size", "2GB"], None
    if tool.startswith("mergekit"):
        variant = tool.split("-", 1)[1]
        path = os.path.join(recipe_dir, f"{method}.mergekit-{variant}.yml")
        open(path, "w").write(mk[variant])
        # 2 GB shards of bf16 (mergekit counts parameters), no tokenizer or model card to copy.
        return [os.path.join(MERGEKIT_VENV, "bin", "mergekit-yaml"), path, out, "--device",
                "cpu", "--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card",
                "--out-shard-size", "1B", "--quiet"], None
    if tool == "torch":
        path = os.path.join(recipe_dir, f"{method}.torch.json")
        json.dump(tj, open(path, "w"))
        return [TORCH_PYTHON, os.path.join(HERE, "torch_merge.py"), path, out], None
    raise ValueError(tool)


def compare(a, b, explain=None):
    args = [TORCH_PYTHON, os.path.join(HERE, "compare.py"), a, b]
    if explain:
        args += ["--explain", explain]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout)


def case(suite, shape, dtype, tasks, methods, tools, runs, do_compare=True, set_tasks=None):
    setdir = dataset(shape, dtype, set_tasks or tasks)
    recipe_dir = os.path.join(DATA, "recipes", f"{suite}-{shape}-{dtype}-t{tasks}")
    os.makedirs(recipe_dir, exist_ok=True)
    for method in methods:
        st, mk, tj = recipes(method, setdir, tasks, dtype)
        folders = [os.path.join(setdir, "base")] + [
            os.path.join(setdir, f"task_{t}") for t in range(tasks)]
        if method == "sta":
            folders += [os.path.join(setdir, f"grads_{t}") for t in range(tasks)]
        nbytes = input_bytes(folders)
        use = [t for t in tools if not (t.startswith("mergekit") and mk is None)]
        warm(folders)
        for r in range(FIRST_ROUND, FIRST_ROUND + runs):
            order = use[r % len(use):] + use[: r % len(use)]
            outs = {}
            for tool in order:
                out = os.path.join(DATA, "out", tool)
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                cmd, env = tool_commands(tool, method, recipe_dir, st, mk, tj, out)
                load0 = loadavg()
                m = measure(cmd, env)
                rec = {
                    "suite": suite, "shape": shape, "dtype": dtype, "tasks": tasks,
                    "method": method, "tool": tool, "round": r, "input_bytes": nbytes,
                    "input_gbps": nbytes / m["wall_s"] / 1e9, "load1_before": load0,
                    "load1_after": loadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime()),
                    "cmd": " ".join(cmd), **m,
                }
                if m["rc"]:
                    log(f"FAILED {tool} {method}: {m['tail']}")
                else:
                    rec.pop("tail")
                log(f"{suite} {shape} {dtype} t{tasks} {method} {tool} r{r}: "
                    f"{m['wall_s']:.2f}s maxrss {m['maxrss_kib'] / 1024:.0f} MiB anon "
                    f"{m['anon_peak_kib'] / 1024:.0f} MiB load {load0:.1f}")
                with open(os.path.join(RESULTS, "runs.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if r == 0 and do_compare and not m["rc"]:
                    outs[tool] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)
            if outs:
                for peer in [t for t in outs if t != "stamerge"]:
                    if "stamerge" not in outs:
                        break
                    tie_rule = method in ("ties", "magnitude") and peer.startswith("mergekit")
                    explain = os.path.join(recipe_dir, f"{method}.torch.json") if tie_rule else None
                    if explain and not os.path.exists(explain):
                        json.dump(tj, open(explain, "w"))
                    c = compare(outs["stamerge"], outs[peer], explain)
                    c.update(suite=suite, shape=shape, dtype=dtype, tasks=tasks, method=method,
                             peer=peer)
                    log(f"compare stamerge vs {peer} {method}: " + json.dumps(
                        {k: c.get(k) for k in ("tensors", "diff_1ulp", "diff_gt1ulp", "max_ulp",
                                               "diff_not_at_tie", "error")}))
                    with open(os.path.join(RESULTS, "compare.jsonl"), "a") as f:
                        f.write(json.dumps(c) + "\n")
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)


ALL_TOOLS = ["stamerge", "mergekit-native", "mergekit-fp32", "torch"]
ALL_METHODS = ["task_arithmetic", "ties", "magnitude", "sta"]


def main():
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(DATA, exist_ok=True)
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "case":
        # One case by hand: case SUITE SHAPE DTYPE TASKS METHODS TOOLS RUNS [SET_TASKS [nocompare]]
        a = sys.argv[2:]
        case(a[0], a[1], a[2], int(a[3]), a[4].split(","), a[5].split(","), int(a[6]),
             do_compare=not (len(a) > 8 and a[8] == "nocompare"),
             set_tasks=int(a[7]) if len(a) > 7 else None)
        return
    for suite in sys.argv[1:]:
        if suite == "smoke":
            case("smoke", "25m", "bfloat16", 2, ALL_METHODS, ALL_TOOLS, 1)
        elif suite == "methods":
            for dtype in ("bfloat16", "float16"):
                case("methods", "100m", dtype, 3, ALL_METHODS, ALL_TOOLS, RUNS)
        elif suite == "sizes":
            for shape in ("100m", "300m", "1b", "3b"):
                tools = ["stamerge", "mergekit-native", "torch"]
                if shape == "3b":
                    tools = os.environ.get("PEERS_3B_TOOLS", "stamerge,mergekit-native").split(",")
                case("sizes", shape, "bfloat16", 2, ["ties"], tools,
                     RUNS if shape != "3b" else int(os.environ.get("PEERS_3B_RUNS", "1")),
                     do_compare=shape != "3b", set_tasks=3 if shape == "1b" else 2)
        elif suite == "tasks":
            for tasks in (2, 4, 8):
                case("tasks", "100m", "bfloat16", tasks, ["ties"],
                     ["stamerge", "mergekit-native", "torch"], RUNS, do_compare=False,
                     set_tasks=8)
        else:
            raise SystemExit(f"unknown suite {suite}")


if __name__ == "__main__":
    main()
