#!/usr/bin/env bash
# Runs kernels/*.cu on the CPU under a small emulation of the CUDA execution model (cuda_emu.h: a
# block's threads are user-space fibers on one OS thread, switched at __syncthreads and at the warp
# intrinsics' exchanges, blocks one after another) and compares every kernel with an independent
# reference of docs/SEMANTICS.md (kernels_test.cpp). It checks the algorithms, indexing and
# block/warp cooperation, not GPU memory-model races or speed. Needs g++ >= 11 (C++20) on x86-64
# (elsewhere the fibers fall back to ucontext). One core: about 11 s on the 2-core build machine,
# compile included (2026-12-07; 315 s when every CUDA thread was an OS thread). Pass a section name
# (sum, dare, keys, fuse, tensor, band, model, chunked, overlap, fisher, interp) to run only that one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A folder of this run's own: two runs at once never overwrite each other's binary.
out="$(mktemp -d "${TMPDIR:-/tmp}/stamerge-kernel-emu.XXXXXX")"
trap 'rm -rf "$out"' EXIT
g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -pthread -I"$here/.." -include "$here/cuda_emu.h" \
    "$here/kernels_test.cpp" -o "$out/kernels_test"
"$out/kernels_test" "$@"
