#!/usr/bin/env bash
# The MiniLM-7 quality benchmark in one command: builds stamerge, then runs (or resumes) every
# stage. Arguments go to run.py (--seeds 1,2,3, --methods ..., --work DIR; see --help).
# PYTHON: an interpreter with requirements.txt installed (default: python3).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
cargo build --release --quiet
# The gradient tool is part of the stamerge wheel (stamerge.grads).
"${PYTHON:-python3}" -m pip install --quiet --force-reinstall --no-deps "$(bash scripts/build-wheel.sh)"
export PYTHONPATH="$repo/benches/quality${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$repo/benches/quality/run.py" "$@"
