#!/usr/bin/env bash
# Runs tests/gpu/ (the CUDA backend against the CPU backend, bit for bit) without a GPU: builds
# a fake libcuda.so (scripts/emu/fake_libcuda.cpp) whose cuLaunchKernel runs the real
# kernels/*.cu under kernels/emu/cuda_emu.h, and puts it first on LD_LIBRARY_PATH. This checks
# the host side (src/backend/cuda/: launch arguments, buffer layout, sequencing, statistics and
# fault decoding) together with the kernels' algorithms, under a driver as strict as the real one
# where host code goes wrong (a context current on the calling thread, memory pools, streams
# running asynchronously with seeded random delays, poisoned freed memory, pinned memory in use;
# see the top of scripts/emu/fake_libcuda.cpp). It cannot see GPU memory-ordering races inside a
# kernel or speed, so the real check remains scripts/gpu-check.sh on a GPU machine.
#
# Tensors are capped at STAMERGE_TEST_MAX_ELEMS elements (default 70000) and the fake GPU has
# FAKE_CUDA_SMS (2) SMs.
#   scripts/emu-gpu-tests.sh                  # all of tests/gpu/
#   scripts/emu-gpu-tests.sh ties_matches     # a filter, as for cargo test
#   FAKE_CUDA_SEED=123 scripts/emu-gpu-tests.sh   # the random delays of an earlier run (printed)
#   STAMERGE_CUDA_INPUTS=register STAMERGE_CUDA_OUTPUTS=register STAMERGE_CUDA_REGISTER_MIN=4096 \
#       scripts/emu-gpu-tests.sh methods::     # the registered transfer paths (run by default
#       after the whole suite, on a subset)
#   FAKE_CUDA_EAGER_STREAM=3 scripts/emu-gpu-tests.sh deferred   # the download stream runs
#       each operation when queued (2: the copy stream, 1: compute), the others run on their
#       workers; FAKE_CUDA_LAZY_STREAM=k holds stream k until something waits for it
# The huge-tensor test (over 2^31 elements) is skipped here: it needs a GPU's memory (with
# STAMERGE_HUGE_ELEMS=N set it runs, at N elements).
# Needs g++ >= 11 and a build with kernels (nvcc at build time: HAVE_KERNELS).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# A folder of this run's own: another run's test binary may have the previous libcuda.so loaded.
out="$(mktemp -d "${TMPDIR:-/tmp}/stamerge-fake-cuda.XXXXXX")"
trap 'rm -rf "$out"' EXIT
g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -pthread -shared -fPIC \
    -I"$root/kernels" -include "$root/kernels/emu/cuda_emu.h" \
    "$here/emu/fake_libcuda.cpp" -o "$out/libcuda.so"
export LD_LIBRARY_PATH="$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export STAMERGE_TEST_MAX_ELEMS="${STAMERGE_TEST_MAX_ELEMS:-70000}"
cd "$root"
skip=(--skip huge::)
[ -z "${STAMERGE_HUGE_ELEMS:-}" ] || skip=()
cargo test --test gpu -- --include-ignored --nocapture --test-threads 1 "${skip[@]}" "$@"
# The other transfer paths (src/backend/cuda/fill.rs): inputs registered read-only and copied
# straight from where they lie, outputs downloaded straight into their registered buffer, from
# 4 KiB up so that the tests' small tensors take them; then the fallback when the driver refuses
# every registration. A subset: the tests that stream, defer outputs and cover every method.
# Skipped when a filter was given (STAMERGE_CUDA_INPUTS etc. can be set by hand then).
if [ $# -eq 0 ]; then
    STAMERGE_CUDA_INPUTS=register STAMERGE_CUDA_OUTPUTS=register STAMERGE_CUDA_REGISTER_MIN=4096 \
        cargo test --test gpu -- --include-ignored --nocapture --test-threads 1 methods:: streaming:: host:: chunked::
    FAKE_CUDA_NO_REGISTER=1 STAMERGE_CUDA_INPUTS=register STAMERGE_CUDA_OUTPUTS=register \
        STAMERGE_CUDA_REGISTER_MIN=4096 cargo test --test gpu -- --include-ignored --nocapture --test-threads 1 streaming::
fi
