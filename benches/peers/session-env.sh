# Sourced by the session scripts: the binary, the Python with mergekit and torch, the data folder,
# and `p ARGS`, one `peers.py case` at low priority.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export STAMERGE="${STAMERGE:-$here/../../target/release/stamerge}"
export TORCH_PYTHON="${TORCH_PYTHON:-/work/venv-mergekit/bin/python}"
data="${PEERS_DATA:-/work/peers-data}"
p() { nice -n 10 "$TORCH_PYTHON" "$here/peers.py" case "$@"; }
peers=stamerge,mergekit-native,torch
