#!/usr/bin/env bash
# The one script to run on a GPU machine: checks the CUDA backend against the CPU backend and
# measures it, with prebuilt binaries (the GPU machine needs the NVIDIA driver, not Rust or nvcc).
#
# 1. On the build machine (no GPU needed; nvcc is needed so that the kernels are built in):
#
#      export NVCC="$(scripts/install-nvcc.sh)"      # pip wheels of CUDA 13.0's nvcc
#      cargo build --release
#      cargo test --release --no-run --test gpu      # prints target/release/deps/gpu-<hash>
#
#    (Check that the build has kernels: `target/release/stamerge bench kernels` must not say
#    "this build has no CUDA kernels".)
# 2. Bring the repository with target/release/stamerge and target/release/deps/gpu-<hash> to the
#    GPU machine and run, from anywhere:
#
#      scripts/gpu-check.sh                          # results in $OUT, default ./gpu-results
#
# Steps (each under a timeout; all of them within GPU_CHECK_BUDGET seconds, default 420, so the
# whole run stays well under 8 minutes; a step that would start after the budget is skipped):
#   - nvidia-smi and the binaries' versions;
#   - the GPU tests (tests/gpu/: every method × dtype × size, bit for bit against the CPU
#     backend, and whole merges compared file by file), --nocapture --test-threads 1;
#   - `stamerge bench kernels` for bf16 and fp16 with T = 4;
#   - a synthetic Llama-style set (2 layers, hidden 1024, vocab 32000, 3 tasks, bf16), then
#     `stamerge bench merge --device cuda` and `--device cpu` for ties and sta;
#   - `stamerge merge --device cuda` (also with a --max-memory of 64MB, which splits the large
#     tensors into chunks) vs `--device cpu` on that set for five recipes, the output files
#     compared byte for byte;
#   - the streamed merge timed: `stamerge merge --device cuda` of sta and sta_model with the
#     default budget (whole groups, the next group's inputs copied in while one computes) and
#     with --max-memory 256MB and 64MB (chunks), GB/s of input from each run's summary line.
# Everything each step prints goes to $OUT/<step>.txt; $OUT/results.md is the summary table.
# Exit status: 0 when every step passed, 1 otherwise, 2 when the binaries are missing.
#
# Environment: OUT, STAMERGE_BIN (default target/release/stamerge), GPU_TEST_BIN (default the
# newest target/release/deps/gpu-*), GPU_CHECK_DATA (the synthetic set; default
# ${TMPDIR:-/tmp}/stamerge-gpu-check, outside $OUT), GPU_CHECK_BUDGET (seconds).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-420}"
DATA="${GPU_CHECK_DATA:-${TMPDIR:-/tmp}/stamerge-gpu-check}"
BIN="${STAMERGE_BIN:-target/release/stamerge}"
TEST_BIN="${GPU_TEST_BIN:-}"
if [ -z "$TEST_BIN" ]; then
    # newest executable gpu-<hash> (not the .d dependency file)
    TEST_BIN="$(ls -t target/release/deps/gpu-* 2>/dev/null | grep -v '\.d$' | while read -r f; do
        [ -x "$f" ] && echo "$f" && break; done)"
fi
SYNTH_ARGS=(--layers 2 --hidden 1024 --intermediate 2816 --vocab 32000 --tasks 3)

START=$SECONDS
LOG="$OUT/gpu-check.log"
: > "$LOG"
ROWS=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# run_step NAME MAX_SECONDS CMD...: runs CMD under a timeout (at most what is left of the
# budget), output to $OUT/NAME.txt; sets STATUS and SECS. Returns CMD's status (99: skipped).
run_step() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        STATUS="skipped (time budget of ${BUDGET}s spent)"
        SECS=0
        say "== $name: $STATUS"
        return 99
    fi
    local limit=$((max < left ? max : left))
    say "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    SECS=$((SECONDS - t0))
    if ((rc == 0)); then
        STATUS=ok
    elif ((rc == 124 || rc == 137)); then
        STATUS="TIMEOUT after ${limit}s"
    else
        STATUS="FAILED (exit $rc)"
    fi
    tail -n 4 "$OUT/$name.txt" | sed 's/^/   /' | tee -a "$LOG"
    say "   -> $STATUS in ${SECS}s"
    return $rc
}

# row NAME SUMMARY: a line of the results table; a step that is not ok fails the check, and
# shows the last line it printed when there is no summary.
row() {
    local summary=$2
    if [ "$STATUS" != ok ] && [ -z "$summary" ] && [ -f "$OUT/$1.txt" ]; then
        summary="$(grep -v '^\s*$' "$OUT/$1.txt" | tail -n1 | cut -c1-200)"
    fi
    ROWS+=("| $1 | $STATUS | $SECS | ${summary//|//} |")
    [ "$STATUS" = ok ] || FAILED=1
}

finish() {
    {
        echo "# stamerge GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s)"
        echo
        echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
        echo "stamerge: $BIN ($("$BIN" --version 2>/dev/null)); tests: ${TEST_BIN:-none}"
        echo
        echo "| step | status | s | summary |"
        echo "|---|---|---|---|"
        printf '%s\n' "${ROWS[@]}"
        for f in "$OUT"/bench-kernels-*.txt; do
            [ -f "$f" ] || continue
            echo
            echo "$(basename "$f" .txt):"
            echo '```'
            cat "$f"
            echo '```'
        done
    } > "$OUT/results.md"
    echo
    cat "$OUT/results.md"
    exit "$1"
}

# ------------------------------------------------------------------------------------------------
if [ ! -x "$BIN" ] || [ -z "$TEST_BIN" ] || [ ! -x "$TEST_BIN" ]; then
    STATUS="FAILED"
    SECS=0
    row "binaries" "missing: need $BIN and target/release/deps/gpu-<hash> (build them first: see the top of scripts/gpu-check.sh)"
    say "gpu-check: binaries missing (stamerge: $BIN, gpu tests: ${TEST_BIN:-not found})"
    finish 2
fi

run_step nvidia-smi 30 bash -c 'nvidia-smi; echo; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv'
row nvidia-smi "$(grep -m1 -o 'Driver Version: [0-9.]*' "$OUT/nvidia-smi.txt" 2>/dev/null)"

# The GPU tests, ignored by a plain run, asked for here: a backend that does not open on this
# machine fails them, with the reason ("no usable GPU: ...").
run_step gpu-tests 240 "$TEST_BIN" --include-ignored --nocapture --test-threads 1
summary="$(grep -m1 '^test result:' "$OUT/gpu-tests.txt" 2>/dev/null)"
failed_tests="$(grep -E '^test .* FAILED$' "$OUT/gpu-tests.txt" 2>/dev/null | awk '{print $2}' | tr '\n' ' ')"
if grep -q 'no usable GPU: ' "$OUT/gpu-tests.txt" 2>/dev/null && [ "$STATUS" = ok ]; then
    STATUS="$(grep -m1 -o 'no usable GPU: .*' "$OUT/gpu-tests.txt")"
fi
row gpu-tests "${summary:-no summary} ${failed_tests:+failed: $failed_tests}"

for dt in bfloat16 float16; do
    run_step "bench-kernels-$dt" 100 "$BIN" bench kernels --dtype "$dt" --tasks 4 --iters 20
    row "bench-kernels-$dt" "$(grep -E '^(copy|fuse_linear|select from)' "$OUT/bench-kernels-$dt.txt" 2>/dev/null | sed -E 's/ +/ /g' | tr '\n' ';')"
done

if [ ! -f "$DATA/ties.yml" ]; then
    run_step synth 90 "$BIN" synth "$DATA" "${SYNTH_ARGS[@]}" --dtype bfloat16 --grad-dtype bfloat16 --shard-size 1GB
    row synth "$(tail -n1 "$OUT/synth.txt" 2>/dev/null)"
fi

for recipe in ties sta; do
    for dev in cuda cpu; do
        run_step "bench-merge-$recipe-$dev" 75 "$BIN" bench merge --dir "$DATA" --recipe "$recipe" --device "$dev" "${SYNTH_ARGS[@]}" --dtype bfloat16 --runs 3
        row "bench-merge-$recipe-$dev" "$(grep -m1 '^merge ' "$OUT/bench-merge-$recipe-$dev.txt" 2>/dev/null)"
    done
done

# cuda (whole groups, and in chunks under a 64MB budget) and cpu merges of the same recipes: the
# output folders must be identical (apart from the report, which holds times and the backend's
# name).
compare_outputs() {
    local bin=$1 data=$2 status=0
    for recipe in ties sta sta_model dare_ties forget; do
        "$bin" --quiet merge "$data/$recipe.yml" "$data/cmp-cpu" --device cpu --overwrite || return 1
        "$bin" --quiet merge "$data/$recipe.yml" "$data/cmp-cuda" --device cuda --overwrite || return 1
        "$bin" --quiet merge "$data/$recipe.yml" "$data/cmp-cuda-chunked" --device cuda \
            --max-memory 64MB --overwrite || return 1
        for other in cuda cuda-chunked; do
            local diff=""
            for f in "$data/cmp-cpu"/*; do
                local b
                b="$(basename "$f")"
                [ "$b" = stamerge_report.json ] && continue
                cmp -s "$f" "$data/cmp-$other/$b" || diff="$diff $b"
            done
            if [ -n "$diff" ]; then
                echo "$recipe ($other): DIFFERENT:$diff"
                status=1
            else
                echo "$recipe ($other): identical"
            fi
        done
    done
    rm -rf "$data/cmp-cpu" "$data/cmp-cuda" "$data/cmp-cuda-chunked"
    return $status
}
export -f compare_outputs
run_step cuda-vs-cpu-files 150 bash -c 'compare_outputs "$0" "$1"' "$BIN" "$DATA"
row cuda-vs-cpu-files "$(grep -E ': (identical|DIFFERENT)' "$OUT/cuda-vs-cpu-files.txt" 2>/dev/null | tr '\n' ';')"

# The streamed path timed: each merge prints "merged ... in S s (G GB/s of input, ...)".
streamed_merges() {
    local bin=$1 data=$2
    for recipe in sta sta_model; do
        for mem in default 256MB 64MB; do
            local args=()
            [ "$mem" = default ] || args=(--max-memory "$mem")
            echo "== $recipe, --max-memory $mem"
            "$bin" merge "$data/$recipe.yml" "$data/streamed" --device cuda --overwrite "${args[@]}" \
                2>&1 | grep -E '^merged|error' || return 1
        done
    done
    rm -rf "$data/streamed"
}
export -f streamed_merges
run_step merge-streamed 90 bash -c 'streamed_merges "$0" "$1"' "$BIN" "$DATA"
row merge-streamed "$(grep -E '^(==|merged)' "$OUT/merge-streamed.txt" 2>/dev/null | sed -E 's/merged .* in ([0-9.]+ s) \(([0-9.]+ GB\/s) of input.*/\1 \2/' | paste -sd' ' | sed 's/== //g' | cut -c1-400)"

finish "$FAILED"
