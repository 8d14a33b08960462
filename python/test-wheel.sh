#!/usr/bin/env bash
# The wheel as a user gets it, without PyTorch (run by .ci/run): builds it (scripts/build-wheel.sh),
# installs it into a fresh virtualenv, and runs python/tests_wheel there: the `stamerge` command
# from the venv on the bundled example, the Python API (plan, merge with progress, from a dict,
# cancel from a thread, Ctrl-C), output bytes against the CLI's and cargo's binary.
#
# The venv comes from `virtualenv` (installed with pip --target by build-wheel.sh), not `python3
# -m venv`: Debian's python3 has no ensurepip without the python3-venv package.
#
#   WHEEL=path    test this wheel instead of building one
#   VENV_PYTHON=path  the interpreter of the test venv (default: python3; the wheel is abi3 for
#                 CPython >= 3.9)
#   STAMERGE_BIN  a cargo-built stamerge to compare bytes with (default: target/debug/stamerge
#                 when present)
# Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PY="${PYTHON:-python3}"
tools="${STAMERGE_WHEEL_TOOLS:-$root/.cache/wheel-tools}"

wheel="${WHEEL:-$(bash "$root/scripts/build-wheel.sh")}"
if [ -z "${STAMERGE_BIN:-}" ] && [ -x "$root/target/debug/stamerge" ]; then
    export STAMERGE_BIN="$root/target/debug/stamerge"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$work/venv"
PYTHONPATH="$tools" "$PY" -m virtualenv --quiet --no-periodic-update \
    --python "${VENV_PYTHON:-$PY}" "$venv" >&2
t0=$(date +%s.%N)
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet "$wheel"
t1=$(date +%s.%N)
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet 'pytest>=8.3,<10'
# Import time of a fresh interpreter (the .so loaded from disk cache after the install).
imp="$("$venv/bin/python" -X importtime -c 'import stamerge' 2>&1 | awk -F'|' '/ stamerge$/ {gsub(/ /, "", $2); print $2}')"
echo "wheel $(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB; pip install $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s; import stamerge ${imp} us (cumulative)" >&2
cd "$work"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here/tests_wheel" "$@"
