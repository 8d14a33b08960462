#!/usr/bin/env bash
# One command: stamerge beside mergekit and a plain PyTorch merge, then the summary and plots.
#
#   bash benches/peers/run.sh [SUITE..]      suites: smoke methods sizes tasks (default: all but smoke)
#
# MERGEKIT_VENV   venv with mergekit (made here when absent; default /work/venv-mergekit)
# TORCH_PYTHON    a python with torch, safetensors, matplotlib (default: the mergekit venv's)
# TORCH_SITE      site-packages of an existing torch install to reuse in the new venv (a .pth
#                 line) instead of downloading torch again; default: /work/venv-torch's if present
# PEERS_DATA      synthetic inputs and outputs (default /work/peers-data; delete when done)
# PEERS_RUNS      rounds per case (default 3); PEERS_3B_RUNS, PEERS_3B_TOOLS for the 3 B case;
# PEERS_FIRST_ROUND  the first round's number (more rounds of a case measured later)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${MERGEKIT_VENV:-/work/venv-mergekit}"
py="${PYTHON:-python3}"
mergekit_version=0.1.5

if [ ! -x "$venv/bin/mergekit-yaml" ]; then
    "$py" -m venv "$venv"
    site="${TORCH_SITE:-}"
    if [ -z "$site" ] && [ -d /work/venv-torch ]; then
        site="$(/work/venv-torch/bin/python -c 'import site; print(site.getsitepackages()[0])')"
    fi
    if [ -n "$site" ]; then
        # pip sees torch (and transformers 5, which mergekit 0.1.5 needs) as installed there and
        # adds only what is missing; the other venv is read, never written.
        "$venv/bin/python" -c 'import site, sys; open(site.getsitepackages()[0] + "/zz-torch-site.pth", "w").write(sys.argv[1] + "\n")' "$site"
    fi
    "$venv/bin/pip" install -q "mergekit==$mergekit_version" matplotlib
fi
export MERGEKIT_VENV="$venv"
export TORCH_PYTHON="${TORCH_PYTHON:-$venv/bin/python}"

(cd "$root" && cargo build --release --quiet)
export STAMERGE="$root/target/release/stamerge"

mkdir -p "$here/results"
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(methods sizes tasks)
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo "stamerge: $(git -C "$root" rev-parse --short HEAD)"
    echo "mergekit: $("$venv/bin/pip" show mergekit 2>/dev/null | awk '/^Version/ {print $2}')"
    echo "torch: $("$TORCH_PYTHON" -c 'import torch; print(torch.__version__)')"
    echo "uptime: $(uptime)"
} >> "$here/results/machine.txt"
nice -n 10 "$TORCH_PYTHON" "$here/peers.py" "${suites[@]}"
"$TORCH_PYTHON" "$here/summarize.py"
