#!/usr/bin/env bash
# The latency-model, time-to-adapt and policy-comparison figures of docs/results.md, one command after
# another. About 55 minutes on 2 vCPUs.
#   bash bench/final_figures.sh [OUT]     (default runs/final; runs/ is not committed)
# Run it on an otherwise idle machine: every figure here is a timing. It needs uvloop
# (pip install -e '.[uvloop]') and CAP_SYS_NICE (root) for niceness -10; without the latter the servers, the
# workers and the client stay at 0 with a warning, and the figures are not those of the documented setup.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/final}; mkdir -p "$out"
python -c "import uvloop" 2>/dev/null || { echo "uvloop is missing: pip install -e '.[uvloop]'"; exit 2; }
speed() {
    python -c "import time; t = time.perf_counter(); sum(range(10**7)); print('host speed check', \
round(time.perf_counter() - t, 3), 's')"
}
step() { echo "== $1 rc=$2 $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)"; }
date; speed
[ -f models/digits-mlp/manifest.json ] || { slonn train > "$out/train.log" 2>&1; step train $?; }
# The latency profiles of the day's host (kept beside the figures), their held-out accuracy, time to adapt.
slonn profile > "$out/profile-bf16.json" 2> "$out/profile-bf16.err"; step profile-bf16 $?
slonn profile --precision fp32 --worker-nice -10 > "$out/profile-fp32.json" 2> "$out/profile-fp32.err"
step profile-fp32 $?
cp models/digits-mlp/latency_profile*.csv "$out/"
python -m bench.eval_latency --json --online > "$out/eval-bf16.json" 2> "$out/eval-bf16.err"; step eval-bf16 $?
python -m bench.eval_latency --json --online --precision fp32 > "$out/eval-fp32.json" 2> "$out/eval-fp32.err"; step eval-fp32 $?
python -m bench.adapt --json > "$out/adapt.json" 2> "$out/adapt.err"; step adapt $?
python -m bench.adapt --json --rate 200 > "$out/adapt-200.json" 2> "$out/adapt-200.err"; step adapt-200 $?
# A deadline at which the co-runner makes the levels shift (at 25 ms they may not need to).
python -m bench.adapt --json --deadline-ms 10 > "$out/adapt-d10.json" 2> "$out/adapt-d10.err"
step adapt-d10 $?
# Every policy on the same load, simulated and live; then slonn with the co-runner.
cmp_args=(--sim --live --duration-s 1200 --precision fp32 --serve-nice -10 --client-nice -10
          --event-loop uvloop --transport stream)
slonn --log-level WARNING compare "${cmp_args[@]}" --speedup 5 --policies slonn,triton,fixed:0.1,aimd \
    --out "$out/cmp-all" > "$out/cmp-all.out" 2>&1; step cmp-all $?
slonn --log-level WARNING compare "${cmp_args[@]}" --speedup 5 --policies slonn --corunner --out "$out/cmp-co" \
    > "$out/cmp-co.out" 2>&1; step cmp-co $?
# x7: a load at which triton falls under 90% on a quiet host.
slonn --log-level WARNING compare "${cmp_args[@]}" --speedup 7 --policies slonn,triton --out "$out/x7-all" \
    > "$out/x7-all.out" 2>&1; step x7-all $?
slonn --log-level WARNING compare "${cmp_args[@]}" --speedup 7 --policies slonn --corunner --out "$out/x7-co" \
    > "$out/x7-co.out" 2>&1; step x7-co $?
python -m bench.misses "$out/cmp-all" "$out/cmp-co" "$out/x7-all" "$out/x7-co" > "$out/misses.txt" 2>&1
step misses $?
speed; date; echo ALLDONE
