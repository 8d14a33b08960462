#!/usr/bin/env bash
# Runs tests/gpu/ (the CUDA backend against the CPU backend, bit for bit) without a GPU: builds
# a fake libcuda.so (scripts/emu/fake_libcuda.cpp) whose cuLaunchKernel runs the real
# kernels/*.cu under kernels/emu/cuda_emu.h, and puts it first on LD_LIBRARY_PATH. This checks
# the host side (src/backend/cuda*: launch arguments, buffer layout, sequencing, statistics and
# fault decoding) together with the kernels' algorithms; it cannot see GPU memory-ordering races
# or speed, so the real check remains scripts/gpu-check.sh on a GPU machine.
#
# The emulation runs one OS thread per CUDA thread: tensors are capped at
# STAMERGE_TEST_MAX_ELEMS elements (default 70000) and the fake GPU has FAKE_CUDA_SMS (2) SMs.
#   scripts/emu-gpu-tests.sh                  # all of tests/gpu/
#   scripts/emu-gpu-tests.sh ties_matches     # a filter, as for cargo test
#   FAKE_CUDA_EAGER_STREAM=3 scripts/emu-gpu-tests.sh deferred   # the download stream runs
#       each operation when queued (2: the copy stream), the others stay lazy: finds a missing
#       cross-stream wait that the lazy order hides (docs/STREAMING.md)
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
cargo test --test gpu -- --include-ignored --nocapture --test-threads 1 "$@"
