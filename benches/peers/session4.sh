#!/usr/bin/env bash
# The fourth session's addition (2026-11-29), on the quiet 2-core VM: the peers at the largest size
# of the issue (3.14 B parameters per checkpoint), which no earlier session could fit. Same harness
# as run.sh; BENCHMARKS.md "Peers" says what ran and what it measured.
set -euo pipefail
source "$(dirname "$0")/session-env.sh"
# 1. TIES, 2 tasks, bf16, three rounds, the tools alternating. The set (base + 2 tasks, 18.9 GB) is
# made by make_llama.py (no gradient folders). It does not fit this VM's page cache beside a
# peer's working memory, so every tool reads part of it from disk, in every round.
p sizes-peers 3b bfloat16 2 ties $peers 3 2 nocompare
# (The 3.14 B set stays for step 3 and the profile; delete it by hand afterwards.)
# 2. TIES at 106 M with 2 tasks, three rounds: the one point of the size and task-count scans that
#    had only runs from the loaded machine (sessions 1-2); the plots take the quiet runs.
p sizes-peers 100m bfloat16 2 ties $peers 3 2 nocompare
rm -rf "$data/100m-bfloat16-t2"
# 3. A fourth round at 3.14 B: a nice-19 build and test job of mine ran beside round 0's mergekit
#    and PyTorch runs (05:06-05:24 UTC; mergekit took 644 s there against 532 s in round 1), so
#    round 0's three runs are marked "excluded" in runs.jsonl and the summary takes rounds 1-3.
export PEERS_FIRST_ROUND=3
p sizes-peers 3b bfloat16 2 ties $peers 1 2 nocompare
