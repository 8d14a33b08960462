#!/usr/bin/env bash
# Runs the stamerge_grads tests. PyTorch is too heavy for every CI run, so this is not part of
# .ci/run: run it when python/ or the gradient file format changes.
#   VENV=DIR   the virtualenv to use (created, and given torch/transformers/pytest, if it lacks
#              them); default python/.venv
#   STAMERGE_BIN=PATH  use this stamerge binary instead of building target/release/stamerge
# Extra arguments go to pytest (e.g. -k cli, -x).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, safetensors, numpy, transformers, tokenizers, pytest, setuptools' 2>/dev/null; then
  "$venv/bin/python" -m pip install "$here[test]" setuptools
fi
if [ -z "${STAMERGE_BIN:-}" ]; then
  (cd "$repo" && cargo build --release)
fi
cd "$here"
exec "$venv/bin/python" -m pytest -q tests "$@"
