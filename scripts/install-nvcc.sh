#!/usr/bin/env bash
# Installs nvcc for CUDA 13.0 from PyPI (pinned to match the GPU machines' driver, CUDA 13.0), only
# when those exact versions are not installed already, and prints the nvcc path
# (scripts/find-nvcc.sh). Uses `python3 -m pip`; extra pip arguments (e.g. --user) may be given
# in PIP_INSTALL_ARGS.
#
#   scripts/install-nvcc.sh && export NVCC="$(scripts/find-nvcc.sh)"
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"

PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)

missing=()
for spec in "${PACKAGES[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    have=$("$PY" -c 'import sys, importlib.metadata as m
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$name" 2>/dev/null || true)
    if [ "$have" != "$want" ]; then
        missing+=("$spec")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-nvcc.sh: installing ${missing[*]}" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install --disable-pip-version-check --quiet ${PIP_INSTALL_ARGS:-} "${PACKAGES[@]}" >&2
else
    echo "install-nvcc.sh: CUDA 13.0 nvcc wheels already installed" >&2
fi

nvcc="$("$here/find-nvcc.sh")"
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
