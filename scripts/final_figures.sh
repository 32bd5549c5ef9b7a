#!/usr/bin/env bash
# The closing notes' figures for issues #4 and #5, one after another: run on an otherwise idle machine
# (nothing else CPU-heavy meanwhile: every figure here is a timing). About 40 minutes on 2 vCPUs.
#   bash scripts/final_figures.sh [OUT]     (default runs/final; runs/ is not committed)
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/final}; mkdir -p "$out"
speed() { python -c "import time; t=time.perf_counter(); sum(range(10**7)); print('host speed check', round(time.perf_counter()-t, 3), 's')"; }
step() { echo "== $1 rc=$2 $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)"; }
date; speed
# Issue #4: the latency profiles of the day's host, their held-out accuracy, time to adapt.
python -m scripts.profile > "$out/profile-bf16.json" 2> "$out/profile-bf16.err"; step profile-bf16 $?
python -m scripts.profile --precision fp32 --worker-nice -10 > "$out/profile-fp32.json" 2> "$out/profile-fp32.err"
step profile-fp32 $?
slonn eval-latency --json --online > "$out/eval-bf16.json" 2> "$out/eval-bf16.err"; step eval-bf16 $?
slonn eval-latency --json --online --precision fp32 > "$out/eval-fp32.json" 2> "$out/eval-fp32.err"; step eval-fp32 $?
slonn --log-level WARNING adapt --json > "$out/adapt.json" 2> "$out/adapt.err"; step adapt $?
slonn --log-level WARNING adapt --json --rate 200 > "$out/adapt-200.json" 2> "$out/adapt-200.err"; step adapt-200 $?
# Issue #5: every policy on the same load, simulated and live; then slonn with the co-runner.
live=(--sim --live --duration-s 1200 --speedup 5 --precision fp32 --serve-nice -10 --client-nice -10
      --event-loop uvloop --transport stream)
slonn --log-level WARNING compare "${live[@]}" --policies slonn,triton,fixed:0.1,aimd --out "$out/cmp-all" \
    > "$out/cmp-all.out" 2>&1; step cmp-all $?
slonn --log-level WARNING compare "${live[@]}" --policies slonn --corunner --out "$out/cmp-co" \
    > "$out/cmp-co.out" 2>&1; step cmp-co $?
python -m scripts.misses "$out/cmp-all" "$out/cmp-co" > "$out/misses.txt" 2>&1; step misses $?
speed; date; echo ALLDONE
