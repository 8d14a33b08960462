#!/usr/bin/env bash
# The CPU merge against the time to read its inputs once from a warm page cache (the 2x target of
# issue 5), and the AVX2 loops (src/simd.rs) against the baseline ones, in one binary.
#
# usage: scripts/bench-warm-read.sh SET_DIR [RECIPE ...] (default recipes: task_arithmetic ties sta)
# env:   BIN (default target/release/stamerge), ROUNDS (3), OUT (/dev/shm/stamerge-warm-read),
#        RESULTS (benches/peers/results/warm-read.jsonl)
# The inputs must fit the page cache next to the output (the output goes to OUT, tmpfs by default,
# so the disk is not part of the figure). Per recipe: the read of exactly the files the recipe uses,
# with `cat` (one reader) and with one reader per core (best of 3 each), then ROUNDS rounds of the
# merge with STAMERGE_SIMD=baseline and with the default (AVX2 where the CPU has it), alternating.
set -euo pipefail
cd "$(dirname "$0")/.."
set_dir=$(cd "$1" && pwd)
shift
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(task_arithmetic ties sta)
bin=${BIN:-target/release/stamerge}
rounds=${ROUNDS:-3}
out=${OUT:-/dev/shm/stamerge-warm-read}
results=${RESULTS:-benches/peers/results/warm-read.jsonl}
cores=$(nproc)

# The safetensors files a recipe reads: its base, models and gradient folders.
inputs() {
  python3 - "$set_dir/$1.yml" <<'PY'
import os, re, sys
path = sys.argv[1]
dirs = []
for line in open(path):
    m = re.match(r"\s*(?:-\s*)?(base_model|model|gradients):\s*(\S+)", line)
    if m:
        d = m.group(2)
        dirs.append(d if os.path.isabs(d) else os.path.join(os.path.dirname(path), d))
for d in dict.fromkeys(dirs):
    for n in sorted(os.listdir(d)):
        if n.endswith(".safetensors"):
            print(os.path.join(d, n))
PY
}

best_of_3() { # command...: the least wall time of three runs, in seconds
  local best=""
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    best=$(python3 -c "t=$t1-$t0; b='$best'; print(min(t, float(b)) if b else t)")
  done
  echo "$best"
}

echo "| recipe | input GB | cat s | $cores readers s | mode | round | wall s | user s | sys s | max RSS MB | wall / cat | wall / parallel read |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for recipe in "${recipes[@]}"; do
  mapfile -t files < <(inputs "$recipe")
  bytes=$(du -cb "${files[@]}" | tail -1 | cut -f1)
  cat "${files[@]}" > /dev/null # warm
  cat_s=$(best_of_3 sh -c 'cat "$@" > /dev/null' sh "${files[@]}")
  par_s=$(best_of_3 sh -c 'printf "%s\n" "$@" | xargs -P '"$cores"' -n 1 cat > /dev/null' sh "${files[@]}")
  for round in $(seq 1 "$rounds"); do
    modes=(baseline default)
    [ $((round % 2)) -eq 0 ] && modes=(default baseline)
    for mode in "${modes[@]}"; do
      rm -rf "$out"
      simd=""
      [ "$mode" = baseline ] && simd=baseline
      load=$(cut -d' ' -f1 /proc/loadavg)
      STAMERGE_SIMD=$simd /usr/bin/time -f "%e %U %S %M" -o /tmp/warm-read-time.txt \
        "$bin" -q merge "$set_dir/$recipe.yml" "$out" --device cpu
      read -r wall user sys rss < /tmp/warm-read-time.txt
      sum=$(cat "$out"/*.safetensors | sha256sum | cut -c1-16)
      python3 - "$results" <<PY
import json, sys, time
rec = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), set="$set_dir",
           recipe="$recipe", input_bytes=$bytes, cat_s=$cat_s, parallel_read_s=$par_s,
           readers=$cores, mode="$mode", round=$round, wall_s=$wall, user_s=$user, sys_s=$sys,
           maxrss_kib=$rss, load1_before=$load, output_sha256_16="$sum")
open(sys.argv[1], "a").write(json.dumps(rec) + "\n")
print(f"| $recipe | {$bytes/1e9:.2f} | {$cat_s:.2f} | {$par_s:.2f} | $mode | $round | $wall | $user "
      f"| $sys | {$rss/1024:.0f} | {$wall/$cat_s:.1f} | {$wall/$par_s:.1f} |")
PY
    done
  done
  rm -rf "$out"
done
