#!/usr/bin/env bash
# Prints the path of a usable nvcc (CUDA >= 11.8, for sm_90), searching in the same order as
# build.rs: $NVCC, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc,
# the wheels scripts/install-nvcc.sh puts in this checkout (.cache/nvcc-13.0, or
# $STAMERGE_NVCC_DIR), then the PyPI wheels of the Python on PATH
# (site-packages/nvidia/cu13/bin/nvcc from `pip install nvidia-cuda-nvcc`,
# nvidia/cuda_nvcc/bin/nvcc for the 12.x wheels). Exits 1 with a message on stderr if none.
#
#   export NVCC="$(scripts/find-nvcc.sh)"
#
# The pip layout needs no extra environment: the wheel's bin/nvcc.profile points nvcc at its own
# cicc (nvvm/bin), libdevice (nvvm/libdevice) and headers (include, include/cccl). nvcc still
# needs a host C++ compiler (g++) on PATH, even for -fatbin.
set -euo pipefail

usable() {  # usable PATH: runs and reports release >= 11.8
    local v
    [ -n "$1" ] && [ -x "$1" ] && [ -f "$1" ] || return 1
    v=$("$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 11 ] || { [ "$1" -eq 11 ] && [ "$2" -ge 8 ]; }
}

candidates() {
    [ -n "${NVCC:-}" ] && echo "$NVCC"
    [ -n "${CUDA_HOME:-}" ] && echo "$CUDA_HOME/bin/nvcc"
    [ -n "${CUDA_PATH:-}" ] && echo "$CUDA_PATH/bin/nvcc"
    command -v nvcc 2>/dev/null || true
    echo /usr/local/cuda/bin/nvcc
    echo "${STAMERGE_NVCC_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.cache/nvcc-13.0}/nvidia/cu13/bin/nvcc"
    local py roots root
    for py in python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        roots=$("$py" -c 'import nvidia
for p in nvidia.__path__: print(p)' 2>/dev/null) || continue
        while IFS= read -r root; do
            [ -n "$root" ] || continue
            echo "$root/cu13/bin/nvcc"
            echo "$root/cu12/bin/nvcc"
            echo "$root/cuda_nvcc/bin/nvcc"
            for d in "$root"/*/; do echo "${d%/}/bin/nvcc"; done
        done <<< "$roots"
        break
    done
}

while IFS= read -r c; do
    if usable "$c"; then
        echo "$c"
        exit 0
    fi
done < <(candidates)

echo "find-nvcc.sh: no usable nvcc (CUDA >= 11.8) found; run scripts/install-nvcc.sh" >&2
exit 1
