#!/usr/bin/env bash
# CPU end-to-end figures for BENCHMARKS.md: a synthetic Llama-style model of ~1.06 B parameters
# (2.1 GB per bf16 checkpoint; 3 tasks + base + 3 gradient statistics), and a 2-layer model with
# the same largest tensors, to show that peak memory follows the largest tensor, not the model.
# Usage: scripts/bench-cpu.sh [DATA_DIR]   (needs ~20 GB of disk; synthesis takes minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
bin=target/release/stamerge
cargo build --release -q
mkdir -p "$data"
gen() { # name layers
  [ -f "$data/$1/ties.yml" ] || $bin -q synth "$data/$1" --layers "$2" --hidden 2048 --intermediate 5632 \
    --vocab 32000 --tasks 3 --shard-size 1GB
}
gen llama1b 18
gen llama2l 2
echo "| model | recipe | input GB read | wall s | GB/s | peak anon MB | max RSS MB |"
echo "|---|---|---|---|---|---|---|"
for model in llama2l llama1b; do
  for recipe in ties sta sta_model; do
    # Warm the page cache (reading the inputs once), as the warm-read target assumes (§7 of the
    # project's design notes, DESIGN.md, kept outside this repository).
    cat "$data/$model"/{base,task_*,grads_*}/*.safetensors > /dev/null
    /usr/bin/time -f "%M" -o "$data/time.txt" $bin -q merge "$data/$model/$recipe.yml" "$data/out-$model-$recipe" \
      --overwrite --report "$data/$model-$recipe.json"
    rss_kb=$(tail -1 "$data/time.txt")
    python3 - "$data/$model-$recipe.json" "$model" "$recipe" "$rss_kb" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {sys.argv[3]} | {r['bytes_read']/1e9:.2f} | {r['seconds']:.1f} | {r['gb_per_s']:.3f} | "
      f"{r['peak_rss_anon_bytes']/1e6:.0f} | {int(sys.argv[4])/1e3:.0f} |")
PY
    rm -rf "$data/out-$model-$recipe"
  done
done
