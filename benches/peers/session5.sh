#!/usr/bin/env bash
# The fifth session's addition (2026-12-08, issue 17): speed and memory beside mergekit for the
# methods issue 17 added, which until now had only their element-level parity measured
# (sparse_parity.py, interp_parity.py). Same harness as run.sh; 39 M parameters per checkpoint,
# bf16, 3 tasks, stamerge against mergekit with `dtype: float32` (the arithmetic stamerge does),
# two rounds, the order alternating; outputs not compared again (the parity scripts do that).
# BENCHMARKS.md "Issue 17's methods beside mergekit: speed and memory" gives the figures.
set -euo pipefail
source "$(dirname "$0")/session-env.sh"
methods=dare_ties,della,breadcrumbs,sce,ram,linear,slerp,nuslerp,multislerp,karcher,model_stock,nearswap,arcee_fusion
p methods17 25m bfloat16 3 "$methods" stamerge,mergekit-fp32 2 3 nocompare
# slerp, nearswap and arcee_fusion take the base and one model, nuslerp two (both tools refuse
# more; the first case above recorded those refusals): the same set, fewer models.
p methods17 25m bfloat16 1 slerp,nearswap,arcee_fusion stamerge,mergekit-fp32 2 3 nocompare
p methods17 25m bfloat16 2 nuslerp stamerge,mergekit-fp32 2 3 nocompare
