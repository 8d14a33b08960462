#!/usr/bin/env bash
# Runs kernels/*.cu on the CPU under a small emulation of the CUDA execution model (cuda_emu.h: one
# OS thread per CUDA thread, real barriers for __syncthreads and the warp intrinsics, blocks one
# after another) and compares every kernel with an independent reference of docs/SEMANTICS.md
# (kernels_test.cpp). It checks the algorithms, indexing and block/warp cooperation, not GPU
# memory-model races or speed. Needs g++ >= 11 (C++20). About 6 minutes on a quiet 2-core machine
# (353 s on 2026-12-02), much longer under load: a block's barriers need all of its threads alive at
# once, so up to 1025 OS threads run. Pass a section name (sum, dare, keys, fuse, tensor, model)
# to run only that one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A folder of this run's own: two runs at once never overwrite each other's binary.
out="$(mktemp -d "${TMPDIR:-/tmp}/stamerge-kernel-emu.XXXXXX")"
trap 'rm -rf "$out"' EXIT
g++ -std=c++20 -O1 -ffp-contract=off -fno-fast-math -pthread -I"$here/.." -include "$here/cuda_emu.h" \
    "$here/kernels_test.cpp" -o "$out/kernels_test"
"$out/kernels_test" "$@"
