#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh needs on a GPU machine into target/gpu-bundle/ (here, no GPU
# needed; nvcc is, for the kernels, and is installed by scripts/install-nvcc.sh):
#   stamerge        the release binary, debug info stripped (strip --strip-debug)
#   gpu-tests       the release tests/gpu binary, stripped the same way
#   sanitizer/      NVIDIA's compute-sanitizer of CUDA 13.0 (PyPI nvidia-cuda-sanitizer-api,
#                   cached in .cache/sanitizer-13.0), its libraries beside it
# and prints the sizes: everything moved to the GPU machine must stay well under 64 MiB (the
# device tool's limit for carried paths). Then, from the repository root on the GPU machine:
#   bash scripts/gpu-check.sh            (see its header for the one-line command of the tool)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC="$(bash scripts/install-nvcc.sh)"
export NVCC
cargo build --release
test_bin="$(cargo test --release --no-run --test gpu --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"
[ -x "$test_bin" ] || { echo "gpu-bundle.sh: no tests/gpu binary was built" >&2; exit 1; }
# (Without a GPU here, bench fails for want of one; without kernels it says so first.)
if target/release/stamerge bench kernels --size 8 --iters 1 2>&1 | grep -q 'no CUDA kernels'; then
    echo "gpu-bundle.sh: the build has no CUDA kernels (nvcc was not found)" >&2
    exit 1
fi

san=.cache/sanitizer-13.0
if [ ! -x "$san/nvidia/cu13/bin/compute-sanitizer" ]; then
    rm -rf "$san.tmp"
    PIP_ROOT_USER_ACTION=ignore "${PYTHON:-python3}" -m pip install --disable-pip-version-check \
        --quiet --no-deps --target "$san.tmp" nvidia-cuda-sanitizer-api==13.0.85 >&2
    rm -rf "$san"
    mv "$san.tmp" "$san"
fi

out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/sanitizer"
strip --strip-debug -o "$out/stamerge" target/release/stamerge
strip --strip-debug -o "$out/gpu-tests" "$test_bin"
cp "$san/nvidia/cu13/bin/compute-sanitizer" "$san/nvidia/cu13/bin/libsanitizer-collection.so" \
    "$out/sanitizer/"
for lib in "$san"/nvidia/cu13/lib/*.so; do
    [ -e "$out/sanitizer/$(basename "$lib")" ] || cp "$lib" "$out/sanitizer/"
done
du -b "$out"/stamerge "$out"/gpu-tests "$out"/sanitizer | awk '{printf "%8.1f MiB  %s\n", $1 / 1048576, $2}'
du -sb "$out" | awk '{printf "%8.1f MiB  in all (the limit is 64 MiB)\n", $1 / 1048576}'
