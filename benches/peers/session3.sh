#!/usr/bin/env bash
# The third session's additions (2026-11-29), on the 2-core VM while nothing else ran: the cases
# the earlier sessions could not fit, most important first. Same harness as run.sh/session.sh.
# BENCHMARKS.md "Peers" says what ran.
set -euo pipefail
source "$(dirname "$0")/session-env.sh"
# 1. Peers at 1.06 B parameters (TIES, 2 tasks, bf16), one round (about 6 minutes on the quiet
#    machine; rounds 2-3 in step 4).
p sizes-peers 1b bfloat16 2 ties $peers 1 2 nocompare
rm -rf "$data/1b-bfloat16-t2"
# 2. Peers at 8 tasks (TIES, 106 M, bf16), one round.
p tasks-peers 100m bfloat16 8 ties $peers 1 8 nocompare
rm -rf "$data/100m-bfloat16-t8"
# 3. fp16 beyond 39 M: every recipe at 106 M, 3 tasks, one round, outputs compared (rounds 2-3
#    in step 4).
p methods 100m float16 3 task_arithmetic,ties,magnitude,sta $peers 1
rm -rf "$data/100m-float16-t3"
# 4. Rounds 2 and 3 of steps 1-3 (the machine stayed quiet, so there was time), and mergekit in
#    fp32 on the fp16 recipes of step 3 (the comparison that separates mergekit's fp16 arithmetic
#    from the top-k tie rule).
export PEERS_FIRST_ROUND=1
p sizes-peers 1b bfloat16 2 ties $peers 2 2 nocompare
rm -rf "$data/1b-bfloat16-t2"
p tasks-peers 100m bfloat16 8 ties $peers 2 8 nocompare
rm -rf "$data/100m-bfloat16-t8"
p methods 100m float16 3 task_arithmetic,ties,magnitude,sta $peers 2 3 nocompare
export PEERS_FIRST_ROUND=0
p methods-fp32 100m float16 3 task_arithmetic,ties,magnitude stamerge,mergekit-fp32 1
rm -rf "$data/100m-float16-t3"
# 5. The two cases whose total-RSS ratio missed the target before input pages were released
#    (271 M and 4 tasks), again with the current binary, three rounds (new suite names, so the old
#    rows stay as they were measured).
p sizes-peers-dontneed 300m bfloat16 2 ties $peers 3 2 nocompare
rm -rf "$data/300m-bfloat16-t2"
p tasks-peers-dontneed 100m bfloat16 4 ties $peers 3 4 nocompare
rm -rf "$data/100m-bfloat16-t4"
