#!/usr/bin/env bash
# Runs the gradient tool's tests (python/tests) against the installed wheel. PyTorch is too heavy
# for every CI run, so this is not part of .ci/run (which tests the wheel without PyTorch,
# python/test-wheel.sh): run it when python/ or the gradient file format changes.
#   VENV=DIR      the virtualenv to use (created, and given the `grads` extra and pytest, if it
#                 lacks them); default python/.venv
#   WHEEL=PATH    install this wheel instead of building one (scripts/build-wheel.sh)
#   STAMERGE_BIN=PATH  the stamerge command the merge test runs (default: the venv's, the wheel's)
# Extra arguments go to pytest (e.g. -k cli, -x).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
wheel="${WHEEL:-$(bash "$repo/scripts/build-wheel.sh")}"
if ! "$venv/bin/python" -c 'import torch, safetensors, numpy, transformers, tokenizers, pytest' 2>/dev/null; then
  "$venv/bin/python" -m pip install "$wheel[grads,test]"
fi
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
# From the repository root, not python/: the source tree's python/stamerge (without its compiled
# half) must not shadow the installed package.
cd "$repo"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests "$@"
