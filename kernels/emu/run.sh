#!/usr/bin/env bash
# Runs kernels/*.cu on the CPU under a small emulation of the CUDA execution model (cuda_emu.h: one
# OS thread per CUDA thread, real barriers for __syncthreads and the warp intrinsics, blocks one
# after another) and compares every kernel with an independent reference of docs/SEMANTICS.md
# (kernels_test.cpp). It checks the algorithms, indexing and block/warp cooperation, not GPU
# memory-model races or speed. Needs g++ >= 11 (C++20). About 5 minutes on 2 cores; pass a section
# name (sum, dare, keys, fuse, tensor, model) to run only that one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${TMPDIR:-/tmp}/stamerge-kernel-emu"
mkdir -p "$out"
g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -pthread -I"$here/.." -include "$here/cuda_emu.h" \
    "$here/kernels_test.cpp" -o "$out/kernels_test"
exec "$out/kernels_test" "$@"
