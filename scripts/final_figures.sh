#!/usr/bin/env bash
# Final figures, one after another on a quiet machine.
cd "$(dirname "$0")/.."
out=${1:-runs/final}; mkdir -p $out
date; uptime
python -m scripts.bench_kernels --json > $out/bench_kernels.json 2> $out/bench_kernels.err; echo "bench rc=$?"; uptime
python -m scripts.profile --precision fp32 > $out/profile-fp32.json 2> $out/profile-fp32.err; echo "profile fp32 rc=$?"
python -m scripts.eval_latency --json --online > $out/eval_latency.json 2> $out/eval_latency.err; echo "eval rc=$?"
slonn --log-level WARNING adapt --json > $out/adapt.json 2> $out/adapt.err; echo "adapt rc=$?"; uptime
slonn --log-level WARNING compare --sim --live --duration-s 1200 --speedup 20.41 --out $out/compare > $out/compare.out 2>&1; echo "compare rc=$?"; uptime
slonn --log-level WARNING compare --sim --live --duration-s 1200 --speedup 20.41 --corunner --out $out/compare-co > $out/compare-co.out 2>&1; echo "compare-co rc=$?"; uptime
slonn --log-level WARNING compare --sim --live --duration-s 1200 --speedup 20.41 --precision fp32 --out $out/compare-fp32 > $out/compare-fp32.out 2>&1; echo "compare fp32 rc=$?"; uptime
slonn --log-level WARNING compare --sim --live --duration-s 1200 --speedup 20.41 --precision fp32 --corunner --out $out/compare-fp32-co > $out/compare-fp32-co.out 2>&1; echo "compare fp32 co rc=$?"; uptime
slonn --log-level WARNING compare --sim --duration-s 3600 --rate 50 --out $out/compare-sim-full > $out/compare-sim-full.out 2>&1; echo "sim-full rc=$?"
slonn --log-level WARNING reliability --json > $out/reliability.json 2> $out/reliability.err; echo "reliability rc=$?"; uptime
slonn --log-level WARNING demo --out $out/demo > $out/demo.out 2>&1; echo "demo rc=$?"
slonn --log-level WARNING simulate --duration-s 3600 --rate 50 --json > $out/simulate50.json 2>/dev/null
slonn --log-level WARNING simulate --duration-s 3600 --rate 400 --json > $out/simulate400.json 2>/dev/null
date; echo ALLDONE
