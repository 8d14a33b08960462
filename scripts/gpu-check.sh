#!/usr/bin/env bash
# The one script to run on a GPU machine: the CUDA backend checked against the CPU backend (bit
# for bit), under compute-sanitizer, on one tensor over 2^31 elements, then measured against a
# warm read of its inputs and the CPU merge. Prebuilt binaries only: the GPU machine needs the
# NVIDIA driver and bash/coreutils/tar, not Rust, nvcc or Python.
#
# Transport. Here (no GPU needed):
#     bash scripts/gpu-bundle.sh
# builds target/gpu-bundle/ (stamerge and the tests/gpu binary, release, `strip --strip-debug`,
# and compute-sanitizer 13.0 from PyPI; it prints the sizes, about 45 MiB in all, under the 64 MiB
# that may be carried). The GPU machine needs the repository's tracked files (this script) and
# that folder; the one-line command, from the repository root there, is
#     bash scripts/gpu-check.sh
# (with the device tool: command "bash scripts/gpu-check.sh", carry ["target/gpu-bundle"],
# timeout_s 600). It leaves exactly two files in the caller's folder: results.md (the summary)
# and gpu-check-logs.tar.gz (every step's full output). That folder is the first argument, else
# the caller's $OUT (only read: the caller may fetch at most 8 files from it), else
# ./gpu-check-results. Step logs and data live in a private folder (mktemp) until the end.
#
# Steps, correctness first, each under a cap (seconds); the caps add up to the budget (480 s),
# so the run ends within 8 minutes even if every step times out:
#   preflight   20  ldd and --version of both binaries, the kernels in the build (exit 2 at once
#                   when it has none), nvidia-smi with other compute processes and throttle
#                   reasons, nvcc and compute-sanitizer --version
#   tiny        30  a tiny synthetic set (synth --layers 1 --hidden 64 --intermediate 128
#                   --vocab 256 --tasks 2), every recipe merged by the CLI on cuda and on cpu,
#                   the files compared byte for byte
#   gpu-tests   90  the tests/gpu binary (--include-ignored, one thread), all but `huge`
#   reruns      30  each failed GPU test again, alone in its own process (a kernel fault poisons
#                   the context for every later test of a process)
#   huge        90  huge::over_2_31_elements_match_cpu: 2^31 + 8191 bf16 elements, ties and sta
#   memcheck    50  compute-sanitizer memcheck over the GPU tests, tensors capped at 4097 elements
#                   (the CLI test aside: the chunked CLI merge below covers that path)
#   racecheck   20  } compute-sanitizer on three tests (4097 elements) and one chunked CLI merge
#   synccheck   20  } (the tiny set's sta_model under --max-memory 256KiB); "device not
#   initcheck   20  } supported" and the like count as skipped, not failed; a sanitizer step
#                   that reaches its cap without an error is "partial", not failed
#   synth       50  a streamed-merge set of about 5.4 GB (base, 2 tasks, 2 statistics; bf16)
#   read        15  a warm read of the files the sta merge reads (one reader per core)
#   cuda-merge  20  `stamerge merge sta.yml --device cuda` on it
#   cpu-merge   25  the same on the CPU; the output files compared with the cuda ones
# results.md gives CUDA ÷ read and CUDA ÷ CPU as measured on that machine.
#
# GPU_CHECK_STEPS=perf runs, instead of the steps above after preflight, the measurements that
# check issue 20's predictions (BENCHMARKS.md, "Issue 20"), each printing the figure to compare:
#   synth       50  the ~5.4 GB set above (kept with GPU_CHECK_DATA)
#   staging     25  `stamerge bench staging`: a warm mapped 2 GiB file into 16 MiB slots by
#                   1, 2, 4, 8, 16 threads, GB/s (predicted: 55 GB/s, the link, by 10-12 threads)
#   kernels     40  `stamerge bench kernels` at 2^27 bf16 elements, 3 tasks: each kernel's GB/s as
#                   a % of a device copy (predicted: fuse_linear and fuse_ties >= 85 %)
#   ratio-ties  60  `stamerge bench merge --recipe ties --device cuda` on that set: GPU ÷ warm read
#                   (predicted <= 1.3), ÷ CPU, bytes over the link (1.0x the inputs read)
#   ratio-sta-model 60  the same for sta_model (model-wide selection: its keys stay on the GPU
#                   when they fit, predicted, and seen under the fake, 2.0x the inputs over the
#                   link; 6.1x before; `stamerge plan` prints the prediction for the set)
#   register    40  ties again with STAMERGE_CUDA_INPUTS=register STAMERGE_CUDA_OUTPUTS=register
#                   (predicted slower than ratio-ties' copy paths; if faster, make it the default)
# Its budget is 295 s, preflight included; the same two files come back.
#
# Exit status: 0 when every step passed, was skipped or was partial, 1 otherwise, 2 when the
# binaries are missing or have no kernels.
#
# Environment: STAMERGE_BIN, GPU_TEST_BIN, COMPUTE_SANITIZER (default: target/gpu-bundle/...,
# else target/release/..., else compute-sanitizer on PATH or in /usr/local/cuda), GPU_CHECK_DATA
# (the 5.4 GB set is kept there between runs; default: made in the private folder, removed),
# GPU_CHECK_FAKE=1 (a dry run on a machine without a GPU: builds the fake libcuda of
# scripts/emu/ and runs every step against it at small sizes; needs g++; the results say so).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
DEST="${1:-${OUT:-$root/gpu-check-results}}"
mkdir -p "$DEST" && DEST="$(cd "$DEST" && pwd)" || exit 1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/stamerge-gpu-check.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
START=$SECONDS
FAKE="${GPU_CHECK_FAKE:-}"

# A path the caller gives is used as given (and must work); otherwise the first that exists.
pick() { for f in "$@"; do [ -n "$f" ] && [ -x "$f" ] && { echo "$f"; return; }; done; }
abs() { [ -x "${1:-}" ] && echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
newest_tests="$(ls -t target/release/deps/gpu-* 2>/dev/null | grep -v '\.d$' | head -n1)"
BIN="$(abs "${STAMERGE_BIN:-$(pick target/gpu-bundle/stamerge target/release/stamerge)}")"
TEST_BIN="$(abs "${GPU_TEST_BIN:-$(pick target/gpu-bundle/gpu-tests "$newest_tests")}")"
SAN="$(abs "${COMPUTE_SANITIZER:-$(pick target/gpu-bundle/sanitizer/compute-sanitizer \
    "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer)}")"

# Sizes: the real ones, or the dry run's.
TINY=(--layers 1 --hidden 64 --intermediate 128 --vocab 256 --tasks 2)
PERF=(--layers 8 --hidden 2048 --intermediate 5632 --vocab 32000 --tasks 2)
HUGE_TEST=huge::over_2_31_elements_match_cpu
SAN_TESTS=(methods::ties_matches_cpu methods::sta_finetuned_matches_cpu chunked::chunked_model_selection_matches_cpu)
if [ -n "$FAKE" ]; then
    PERF=(--layers 1 --hidden 256 --intermediate 512 --vocab 2048 --tasks 2)
    export STAMERGE_TEST_MAX_ELEMS="${STAMERGE_TEST_MAX_ELEMS:-4097}"
    export STAMERGE_HUGE_ELEMS="${STAMERGE_HUGE_ELEMS:-70000}"
fi

ROWS=()
FAILED=0
STATUS=""
SECS=0
say() { echo "$*" | tee -a "$LOGS/gpu-check.log"; }

# The caller's folder gets results.md and the tarball, nothing else; the private folder goes.
finish() {
    local code=$1
    write_results > "$DEST/results.md"
    tar -czf "$DEST/gpu-check-logs.tar.gz" -C "$WORK" logs
    rm -rf "$WORK"  # (a GPU_CHECK_DATA set lives outside it)
    cat "$DEST/results.md"
    exit "$code"
}
trap 'finish 1' INT TERM

# run_step NAME CAP CMD...: CMD under a timeout of CAP seconds (less if the budget is nearly
# spent), its output in $LOGS/NAME.txt; sets STATUS and SECS, returns CMD's status.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 3)); then
        STATUS="skipped (budget of ${BUDGET}s spent)"
        SECS=0
        say "== $name: $STATUS"
        return 99
    fi
    say "== $name (cap ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.txt" 2>&1
    local rc=$?
    SECS=$((SECONDS - t0))
    if ((rc == 0)); then
        STATUS=ok
    elif ((rc == 124 || rc == 137)); then
        STATUS="TIMEOUT after ${limit}s"
    else
        STATUS="FAILED (exit $rc)"
    fi
    tail -n 3 "$LOGS/$name.txt" | cut -c1-300 | sed 's/^/   /' | tee -a "$LOGS/gpu-check.log"
    say "   -> $STATUS in ${SECS}s"
    return $rc
}

# row NAME CAP SUMMARY: a line of the table; a step that neither passed nor was skipped fails
# the check (its last line stands in for a missing summary).
row() {
    local summary=$3
    if [ -z "$summary" ] && [ -f "$LOGS/$1.txt" ]; then
        summary="$(grep -v '^\s*$' "$LOGS/$1.txt" | tail -n1 | cut -c1-200)"
    fi
    ROWS+=("| $1 | $STATUS | $SECS | $2 | ${summary//|//} |")
    case "$STATUS" in ok | skipped* | partial*) ;; *) FAILED=1 ;; esac
}

MODE="${GPU_CHECK_STEPS:-all}"
case "$MODE" in all | perf) ;; *) echo "GPU_CHECK_STEPS: all or perf, not $MODE" >&2; exit 2 ;; esac
if [ "$MODE" = all ]; then
    declare -A CAP=([preflight]=20 [tiny]=30 [gpu-tests]=90 [reruns]=30 [huge]=90 [memcheck]=50
        [racecheck]=20 [synccheck]=20 [initcheck]=20 [synth]=50 [read]=15 [cuda-merge]=20
        [cpu-merge]=25)
else
    declare -A CAP=([preflight]=20 [synth]=50 [staging]=25 [kernels]=40 [ratio-ties]=60
        [ratio-sta-model]=60 [register]=40)
fi
BUDGET=0
for c in "${CAP[@]}"; do BUDGET=$((BUDGET + c)); done

READ_S="" CUDA_S="" CPU_S="" READ_BYTES=""
write_results() {
    echo "# stamerge GPU check, steps: $MODE ($(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s of a ${BUDGET} s budget)"
    echo
    if [ -n "$FAKE" ]; then
        echo "**Dry run on a machine without a GPU ($(uname -m), $(nproc) cores): every step ran"
        echo "against the fake libcuda of scripts/emu/ at small sizes (tests capped at"
        echo "$STAMERGE_TEST_MAX_ELEMS elements, the huge test at $STAMERGE_HUGE_ELEMS, a $(du -sh "${DATA:-/nonexistent}" 2>/dev/null | cut -f1) set). Nothing here is a GPU"
        echo "result; times are the emulation's.**"
        echo
    fi
    local gpu
    gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
    echo "GPU: ${gpu:-none found (no nvidia-smi)}"
    echo "stamerge: $BIN ($("$BIN" --version 2>/dev/null)); tests: ${TEST_BIN:-none}; compute-sanitizer: ${SAN:-none}"
    echo
    echo "| step | status | s | cap s | summary |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    if [ -n "$READ_S" ] && [ -n "$CUDA_S" ]; then
        echo
        echo "Streamed merge (sta, $(awk -v b="$READ_BYTES" 'BEGIN{printf "%.2f", b/1e9}') GB of input):"
        echo
        echo "| | s | GB/s of input | CUDA ÷ this |"
        echo "|---|---|---|---|"
        local gbs="awk -v b=$READ_BYTES -v s"
        echo "| warm read (one reader per core) | $READ_S | $($gbs="$READ_S" 'BEGIN{printf "%.2f", b/1e9/s}') | $(awk -v a="$CUDA_S" -v b="$READ_S" 'BEGIN{printf "%.2f", a/b}') |"
        echo "| stamerge merge --device cuda | $CUDA_S | $($gbs="$CUDA_S" 'BEGIN{printf "%.2f", b/1e9/s}') | 1 |"
        if [ -n "$CPU_S" ]; then
            echo "| stamerge merge --device cpu | $CPU_S | $($gbs="$CPU_S" 'BEGIN{printf "%.2f", b/1e9/s}') | $(awk -v a="$CUDA_S" -v b="$CPU_S" 'BEGIN{printf "%.2f", a/b}') |"
        fi
    fi
    echo
    echo "Logs of every step: gpu-check-logs.tar.gz (logs/<step>.txt)."
}

# ------------------------------------------------------------------------------------------------
if [ -n "$FAKE" ]; then
    mkdir -p "$WORK/fake"
    g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -pthread -shared -fPIC \
        -I"$root/kernels" -include "$root/kernels/emu/cuda_emu.h" \
        "$root/scripts/emu/fake_libcuda.cpp" -o "$WORK/fake/libcuda.so" || exit 1
    export LD_LIBRARY_PATH="$WORK/fake${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ -z "$BIN" ] || { [ -z "$TEST_BIN" ] && [ "$MODE" = all ]; }; then
    STATUS=FAILED SECS=0
    row binaries - "missing: stamerge (${BIN:-${STAMERGE_BIN:-not found}}) or the tests/gpu binary (${TEST_BIN:-${GPU_TEST_BIN:-not found}}); build them with scripts/gpu-bundle.sh"
    finish 2
fi
export STAMERGE_BIN="$BIN"  # the CLI tests of the test binary run this one

preflight() {
    for b in "$BIN" "$TEST_BIN"; do
        echo "## $b"
        ldd "$b" 2>&1 | sed 's/^/  /'
    done
    "$BIN" --version
    echo "## kernels"
    "$BIN" bench kernels --size 8 --iters 1 2>&1 | tail -n 3
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.used,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw --format=csv
        echo "## other compute processes"
        nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
        echo "other compute processes: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -c .)"
        echo "## throttle reasons"
        nvidia-smi -q -d PERFORMANCE
    else
        echo "nvidia-smi: not found"
    fi
    echo "## nvcc"
    command -v nvcc >/dev/null && nvcc --version || echo "nvcc: not found (not needed)"
    echo "## compute-sanitizer"
    [ -n "$SAN" ] && "$SAN" --version || echo "compute-sanitizer: not found"
    echo "## host"
    nproc
    free -g 2>/dev/null
    df -h "$WORK" 2>/dev/null | tail -n1
}
export -f preflight
export BIN TEST_BIN SAN WORK
run_step preflight "${CAP[preflight]}" bash -c preflight
if grep -q 'no CUDA kernels' "$LOGS/preflight.txt"; then
    STATUS="FAILED (no kernels)"
    row preflight "${CAP[preflight]}" "$(grep -m1 'no CUDA kernels' "$LOGS/preflight.txt")"
    finish 2
fi
row preflight "${CAP[preflight]}" "$(grep -m1 -oE 'Driver Version: [0-9.]*|nvidia-smi: not found' "$LOGS/preflight.txt"); $(grep -m1 '^other compute processes' "$LOGS/preflight.txt")"

if [ "$MODE" = all ]; then
# The tiny set first: the CLI path (context on the merging thread, staging, deferred outputs)
# end to end, on every recipe.
tiny() {
    local dir=$WORK/tiny status=0
    "$BIN" synth "$dir" "$@" || return 1
    for recipe in "$dir"/*.yml; do
        local name
        name="$(basename "$recipe" .yml)"
        # One folder name on both devices: the model card (README.md) is titled with it.
        local refused=""
        for dev in cpu cuda; do
            mkdir -p "$dir/$dev"
            if ! "$BIN" --quiet merge "$recipe" "$dir/$dev/$name" --device "$dev" --overwrite 2> "$dir/err"; then
                cat "$dir/err"
                # Methods and settings without kernels (della, sce, ties' L1 rescale, ...) must
                # be refused clearly on cuda, with nothing written.
                if [ "$dev" = cuda ] && grep -q 'no CUDA kernels yet' "$dir/err" && [ ! -e "$dir/cuda/$name" ]; then
                    refused=1
                    break
                fi
                return 1
            fi
        done
        if [ -n "$refused" ]; then
            echo "$name: refused on cuda (no kernels yet)"
            continue
        fi
        local diff=""
        for f in "$dir/cpu/$name"/*; do
            local b
            b="$(basename "$f")"
            [ "$b" = stamerge_report.json ] && continue
            cmp -s "$f" "$dir/cuda/$name/$b" || diff="$diff $b"
        done
        if [ -n "$diff" ]; then
            echo "$name: DIFFERENT:$diff"
            status=1
        else
            echo "$name: identical"
        fi
    done
    return $status
}
export -f tiny
run_step tiny "${CAP[tiny]}" bash -c 'tiny "$@"' tiny "${TINY[@]}"
row tiny "${CAP[tiny]}" "$(grep -cE ': identical$' "$LOGS/tiny.txt") recipes identical, $(grep -cE ': refused on cuda' "$LOGS/tiny.txt") refused on cuda$(grep -E ': DIFFERENT' "$LOGS/tiny.txt" | tr '\n' ';' | sed 's/^/; /')"

run_step gpu-tests "${CAP[gpu-tests]}" "$TEST_BIN" --include-ignored --test-threads 1 --nocapture --skip huge::
failed_tests="$(sed -n '/^failures:$/,/^test result/p' "$LOGS/gpu-tests.txt" | grep -E '^    [a-z_0-9:]+$' | sort -u | tr -d ' ' | tr '\n' ' ')"
row gpu-tests "${CAP[gpu-tests]}" "$(grep -m1 '^test result:' "$LOGS/gpu-tests.txt")${failed_tests:+; failed: $failed_tests}"

if [ -n "$failed_tests" ]; then
    reruns() {
        local status=0
        for t in "$@"; do
            echo "=== $t, alone"
            if "$TEST_BIN" --include-ignored --exact "$t" --nocapture; then
                echo "RERUN $t: passed alone"
            else
                echo "RERUN $t: failed alone"
                status=1
            fi
        done
        return $status
    }
    export -f reruns
    # shellcheck disable=SC2086
    run_step reruns "${CAP[reruns]}" bash -c 'reruns "$@"' reruns $failed_tests
    row reruns "${CAP[reruns]}" "$(grep '^RERUN' "$LOGS/reruns.txt" | sed 's/^RERUN //' | tr '\n' ';')"
else
    STATUS="skipped (no test failed)" SECS=0
    row reruns "${CAP[reruns]}" ""
fi

run_step huge "${CAP[huge]}" "$TEST_BIN" --include-ignored --exact "$HUGE_TEST" --nocapture
row huge "${CAP[huge]}" "$(grep -E '^huge' "$LOGS/huge.txt" | tr '\n' ';' | cut -c1-300)"

# compute-sanitizer: a tool that cannot attach to this device (or to the fake) is skipped.
sanitize() {
    local name=$1
    shift
    if [ -z "$SAN" ]; then
        STATUS="skipped (compute-sanitizer not found)" SECS=0
        row "$name" "${CAP[$name]}" ""
        return
    fi
    run_step "$name" "${CAP[$name]}" "$@"
    local why
    why="$(grep -m1 -iE 'device not supported|not supported on|no supported device|Target application terminated before first instrumented API call' "$LOGS/$name.txt")"
    if [ -n "$why" ] && [ "$STATUS" != ok ]; then
        STATUS="skipped (${why#========= })"
    elif [[ "$STATUS" == TIMEOUT* ]] && ! grep -qE 'ERROR SUMMARY: [1-9]' "$LOGS/$name.txt"; then
        # The cap is the budget's, not a verdict: what ran had no error.
        STATUS="partial (cap reached; no error in what ran)"
    fi
    row "$name" "${CAP[$name]}" "$(grep -E 'ERROR SUMMARY' "$LOGS/$name.txt" | sort | uniq -c | tr '\n' ';' | sed 's/  */ /g')"
}
STAMERGE_TEST_MAX_ELEMS="${STAMERGE_TEST_MAX_ELEMS:-4097}" sanitize memcheck \
    "$SAN" --tool memcheck --error-exitcode 1 --target-processes application-only \
    "$TEST_BIN" --include-ignored --test-threads 1 --skip huge:: --skip host::cli_merges
san_tool() {
    local tool=$1 status=0
    shift
    STAMERGE_TEST_MAX_ELEMS="${STAMERGE_TEST_MAX_ELEMS:-4097}" "$SAN" --tool "$tool" --error-exitcode 1 \
        "$TEST_BIN" --include-ignored --test-threads 1 --exact "${SAN_TESTS[@]}" || status=1
    [ -f "$WORK/tiny/sta_model.yml" ] || "$BIN" synth "$WORK/tiny" "$@" >/dev/null 2>&1
    "$SAN" --tool "$tool" --error-exitcode 1 "$BIN" merge "$WORK/tiny/sta_model.yml" \
        "$WORK/out-san" --device cuda --max-memory 256KiB --overwrite || status=1
    return $status
}
export -f san_tool
export SAN_TESTS_LIST="${SAN_TESTS[*]}"
for tool in racecheck synccheck initcheck; do
    sanitize "$tool" bash -c 'SAN_TESTS=($SAN_TESTS_LIST); san_tool "$@"' san_tool "$tool" "${TINY[@]}"
done

fi  # MODE all: the correctness steps

# The streamed merge measured: a ~5.4 GB set, its warm read, cuda and cpu.
DATA="${GPU_CHECK_DATA:-$WORK/data}"
if [ ! -f "$DATA/sta.yml" ]; then
    run_step synth "${CAP[synth]}" "$BIN" synth "$DATA" "${PERF[@]}" --dtype bfloat16 --grad-dtype bfloat16
    row synth "${CAP[synth]}" "$(tail -n1 "$LOGS/synth.txt")"
else
    STATUS="skipped (kept from an earlier run: $DATA)" SECS=0
    row synth "${CAP[synth]}" ""
fi

if [ "$MODE" = perf ]; then
    # Issue 20's predictions, one step each (the header lists what each should show).
    [ -n "$FAKE" ] && STAGE_MIB=64 KSIZE=65536 || STAGE_MIB=2048 KSIZE=134217728
    run_step staging "${CAP[staging]}" "$BIN" bench staging --file "$WORK/staging.bin" \
        --mib "$STAGE_MIB" --threads 1,2,4,8,16 --runs 3
    rm -f "$WORK/staging.bin"
    # "before 4.3; 1t 5.5; 2t 10.9; ..." (GB/s of wall time; the log has the CPU seconds too)
    row staging "${CAP[staging]}" "$(grep -E 'thread' "$LOGS/staging.txt" | awk '{for (i = 1; i <= NF; i++) if ($i == "GB/s") w = $(i - 1); printf "%s %s; ", (index($0, "before") ? "before" : $1 "t"), w}') GB/s"
    run_step kernels "${CAP[kernels]}" "$BIN" bench kernels --size "$KSIZE" --tasks 3 --dtype bfloat16 --iters 10
    row kernels "${CAP[kernels]}" "$(grep -E '^(copy|fuse|score|select|dare).*%$' "$LOGS/kernels.txt" | awk '{print $1, $NF}' | tr '\n' ';' | cut -c1-400)"
    ratio() {
        local name=$1
        shift
        run_step "$name" "${CAP[$name]}" "$@"
        row "$name" "${CAP[$name]}" "$(grep -E '^(merge|over the link|same merge)' "$LOGS/$name.txt" | sed 's/  */ /g' | tr '\n' ';' | cut -c1-500)"
    }
    ratio ratio-ties "$BIN" bench merge --dir "$DATA" --recipe ties --device cuda --runs 2
    ratio ratio-sta-model "$BIN" bench merge --dir "$DATA" --recipe sta_model --device cuda --runs 1
    ratio register env STAMERGE_CUDA_INPUTS=register STAMERGE_CUDA_OUTPUTS=register \
        "$BIN" bench merge --dir "$DATA" --recipe ties --device cuda --runs 2 --no-cpu
    finish "$FAILED"
fi
FILES=()
for d in base task_0 task_1 grads_0 grads_1; do
    for f in "$DATA/$d"/*.safetensors; do [ -f "$f" ] && FILES+=("$f"); done
done
READ_BYTES="$( ((${#FILES[@]})) && du -cb "${FILES[@]}" | tail -n1 | cut -f1)"
warm_read() {
    local t0 t1
    cat "$@" > /dev/null  # into the page cache (synth has mostly put them there already)
    t0=$(date +%s.%N)
    printf '%s\n' "$@" | xargs -P "$(nproc)" -n 1 cat > /dev/null
    t1=$(date +%s.%N)
    echo "read $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}') s"
}
export -f warm_read
if ((${#FILES[@]} > 0)) && run_step read "${CAP[read]}" bash -c 'warm_read "$@"' warm_read "${FILES[@]}"; then
    READ_S="$(sed -n 's/^read \([0-9.]*\) s$/\1/p' "$LOGS/read.txt")"
fi
row read "${CAP[read]}" "$(tail -n1 "$LOGS/read.txt" 2>/dev/null) of ${READ_BYTES:-0} bytes in ${#FILES[@]} files"
timed_merge() {
    local dev=$1 t0 t1
    t0=$(date +%s.%N)
    mkdir -p "$WORK/$dev"
    "$BIN" merge "$DATA/sta.yml" "$WORK/$dev/out" --device "$dev" --overwrite || return 1
    t1=$(date +%s.%N)
    echo "merged in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}') s"
}
export -f timed_merge
export DATA
if run_step cuda-merge "${CAP[cuda-merge]}" bash -c 'timed_merge cuda'; then
    CUDA_S="$(sed -n 's/^merged in \([0-9.]*\) s$/\1/p' "$LOGS/cuda-merge.txt")"
fi
row cuda-merge "${CAP[cuda-merge]}" "$(grep -E '^merged' "$LOGS/cuda-merge.txt" | head -n1 | cut -c1-200)"
if run_step cpu-merge "${CAP[cpu-merge]}" bash -c 'timed_merge cpu'; then
    CPU_S="$(sed -n 's/^merged in \([0-9.]*\) s$/\1/p' "$LOGS/cpu-merge.txt")"
    for f in "$WORK/cpu/out"/*; do
        b="$(basename "$f")"
        [ "$b" = stamerge_report.json ] && continue
        cmp -s "$f" "$WORK/cuda/out/$b" || { echo "DIFFERENT: $b" >> "$LOGS/cpu-merge.txt"; STATUS="FAILED (cuda and cpu outputs differ)"; }
    done
fi
row cpu-merge "${CAP[cpu-merge]}" "$(grep -E '^merged|^DIFFERENT' "$LOGS/cpu-merge.txt" | tr '\n' ';' | cut -c1-200)"

finish "$FAILED"
