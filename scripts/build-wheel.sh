#!/usr/bin/env bash
# Builds the stamerge wheel: manylinux2014 (glibc 2.17), abi3 (one wheel for CPython >= 3.9), with
# the CUDA kernels compiled by the pinned nvcc from PyPI (scripts/install-nvcc.sh), into
# target/wheels. maturin, zig (the linker that targets the old glibc), auditwheel and virtualenv
# come from PyPI into .cache/wheel-tools with `pip install --target`: no Python environment is
# changed, so Debian's own python3 (PEP 668, no python3-venv) works. Prints the wheel's path.
#
#   bash scripts/build-wheel.sh            # the wheel, checked with `auditwheel show`
#   SDIST=1 bash scripts/build-wheel.sh    # also the source distribution (target/wheels/*.tar.gz)
#
# Needs python3 with pip (Debian: apt-get install python3-pip), a Rust toolchain, and PyPI.
# STAMERGE_NO_KERNELS=1 builds without nvcc (the wheel then merges on the CPU only).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY="${PYTHON:-python3}"
tools="${STAMERGE_WHEEL_TOOLS:-$root/.cache/wheel-tools}"
# Pinned: a new maturin or zig release must not change a build silently.
TOOLS=(maturin==1.16.0 ziglang==0.17.1 auditwheel==6.8.2 virtualenv==21.15.7)

stamp="$tools/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "${TOOLS[*]}" ]; then
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        echo "build-wheel.sh: $PY has no pip (Debian: apt-get install python3-pip)" >&2
        exit 1
    fi
    echo "build-wheel.sh: installing ${TOOLS[*]} into $tools" >&2
    rm -rf "$tools"
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --disable-pip-version-check \
        --no-warn-script-location --quiet --target "$tools" ${PIP_INSTALL_ARGS:-} "${TOOLS[@]}" >&2
    echo "${TOOLS[*]}" > "$stamp"
fi
# maturin finds zig as `python3 -m ziglang`, which needs the tools folder on the path.
export PYTHONPATH="$tools${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$tools/bin:$PATH"

if [ -z "${STAMERGE_NO_KERNELS:-}" ] && [ -z "${NVCC:-}" ]; then
    NVCC="$(bash "$here/install-nvcc.sh")"
    export NVCC
fi

cd "$root"
out="$root/target/wheels"
mkdir -p "$out"
rm -f "$out"/stamerge-*.whl "$out"/stamerge-*.tar.gz
# --strip: the release profile keeps line tables for profiling; a wheel has no use for them.
maturin build --release --zig --compatibility manylinux2014 --strip \
    --interpreter "$PY" --out "$out" >&2
wheel="$(ls "$out"/stamerge-*.whl)"

# The tag must be what auditwheel itself finds (maturin's own check agrees, but is maturin's).
show="$("$PY" -m auditwheel show "$wheel")"
echo "$show" >&2
if ! grep -q 'consistent with the following platform tag' <<<"$show" \
    || ! grep -q '"manylinux_2_17_x86_64"' <<<"$show"; then
    echo "build-wheel.sh: auditwheel does not find $wheel manylinux_2_17 (manylinux2014)" >&2
    exit 1
fi

if [ -n "${SDIST:-}" ]; then
    maturin sdist --out "$out" >&2
fi
echo "$wheel"
