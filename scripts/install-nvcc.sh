#!/usr/bin/env bash
# Installs nvcc for CUDA 13.0 from PyPI (pinned to match the GPU machines' driver, CUDA 13.0) into
# a folder of this checkout, .cache/nvcc-13.0 (or $STAMERGE_NVCC_DIR), with `pip install
# --target`: no Python environment is changed, so a system Python that refuses installs (Debian's,
# PEP 668) works as well as any other. Does nothing when that folder already holds these exact
# versions. Prints the nvcc path; build.rs and scripts/find-nvcc.sh look in the same folder.
#
#   export NVCC="$(bash scripts/install-nvcc.sh)"
#
# Needs python3 with pip (Debian: apt-get install python3-pip) and the network to PyPI; extra pip
# arguments (e.g. --index-url) may be given in PIP_INSTALL_ARGS.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY="${PYTHON:-python3}"
dest="${STAMERGE_NVCC_DIR:-$root/.cache/nvcc-13.0}"

PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)

# A wheel installed with --target leaves NAME-VERSION.dist-info (name with underscores).
missing=()
for spec in "${PACKAGES[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    [ -d "$dest/${name//-/_}-$want.dist-info" ] || missing+=("$spec")
done

if [ ${#missing[@]} -gt 0 ]; then
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        echo "install-nvcc.sh: $PY has no pip (Debian: apt-get install python3-pip), or set NVCC" \
             "to an nvcc of CUDA 13.0" >&2
        exit 1
    fi
    echo "install-nvcc.sh: installing ${PACKAGES[*]} into $dest" >&2
    # A fresh folder: --target does not replace what an older version left there.
    tmp="$dest.tmp-$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$dest")"
    trap 'rm -rf "$tmp"' EXIT
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --disable-pip-version-check --no-warn-script-location --quiet \
        --target "$tmp" ${PIP_INSTALL_ARGS:-} "${PACKAGES[@]}" >&2
    rm -rf "$dest"
    mv "$tmp" "$dest"
    trap - EXIT
else
    echo "install-nvcc.sh: CUDA 13.0 nvcc wheels already in $dest" >&2
fi

nvcc="$dest/nvidia/cu13/bin/nvcc"
NVCC="$nvcc" "$here/find-nvcc.sh" >/dev/null
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
