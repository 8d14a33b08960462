#!/usr/bin/env bash
# The reduced plan run on 2026-11-28/29 on the shared 2-core VM (1-minute load 50-340 from other
# jobs), where the full suites of run.sh (hours of mergekit there) did not fit the session. Same
# harness, fewer rounds, sizes and tools; steps in the order they ran, most important first.
# BENCHMARKS.md "Peers" says what ran and what did not.
set -euo pipefail
source "$(dirname "$0")/session-env.sh"
all=stamerge,mergekit-native,mergekit-fp32,torch
# 1. Equality and a first ratio on every recipe: 39 M parameters, 2 tasks, bf16, one round.
#    (task_arithmetic ran separately after a harness fix: the output's parent folder was missing.)
p smoke 25m bfloat16 2 ties,magnitude,sta $all 1
p smoke 25m bfloat16 2 task_arithmetic $all 1
# 2. Size scaling, TIES, 2 tasks, bf16: peers at 100 M (3 rounds), stamerge alone above.
p sizes 100m bfloat16 2 ties $peers 3
p sizes 300m bfloat16 2 ties stamerge 3 2 nocompare
p sizes 1b bfloat16 2 ties stamerge 3 3 nocompare
# 3. Task count, TIES, 100 M, bf16, stamerge (2 tasks is the size case above).
p tasks 100m bfloat16 4 ties stamerge 3 8 nocompare
p tasks 100m bfloat16 8 ties stamerge 3 8 nocompare
rm -rf "$data/100m-bfloat16-t8" "$data/300m-bfloat16-t2"  # room for the 3 B set
# 4. 3.14 B: 2 tasks, base and tasks only (make_llama.py, 19 GB): synth's gradient folders would
#    make it 31 GB, beyond the disk shared on this machine.
p sizes 3b bfloat16 2 ties stamerge 1 2 nocompare
rm -rf "$data/3b-bfloat16-t2"
# 5. fp16 on every recipe, 39 M, 2 tasks, one round with the comparisons.
p methods 25m float16 2 task_arithmetic,ties,magnitude,sta $all 1
# 6. Peers at 4 tasks and at 300 M, one round each (ratios per run need stamerge in the round).
p tasks-peers 100m bfloat16 4 ties $peers 1 4 nocompare
rm -rf "$data/100m-bfloat16-t4"
p sizes-peers 300m bfloat16 2 ties $peers 1 2 nocompare
rm -rf "$data/300m-bfloat16-t2"
