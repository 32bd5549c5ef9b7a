"""`python -m bench.misses RUN_DIR ...`: where a `slonn compare` run's missed requests lost their time.

For each live policy of each run directory (``slonn compare --out``), for one SLO class (default
interactive), prints JSON with:

- ``misses``: requests of the class not answered OK within their deadline, by status, and how many fell in
  each co-runner phase;
- ``per_bin``: misses per ``STEAL_BIN_S`` of the trace, beside the share of the CPU the host stole in that
  bin (``compare.json``'s ``steal_pct_per_10s``): a miss that lines up with steal is the host's;
- ``split_ms``: for the misses answered OK, and for comparison the requests answered in time, the median and
  the range of where the time went: ``queue`` (admission to batch start), ``exec`` (the model),
  ``handler_other`` (the rest of the time inside the server's handler: frontend, dispatch, IPC, reply) and
  ``outside`` (end-to-end minus the handler: the transport and the client).

It reads only the files a run leaves (docs/simulator.md, "slonn compare").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

from slonn.scheduler.report import RequestRecord, read_csv

STEAL_BIN_S = 10.0
"""`slonn compare` samples the host's steal per 10 s of the replay."""

PARTS = ("queue", "exec", "handler_other", "outside")


def time_split(r: RequestRecord) -> dict[str, float]:
    """Where one answered request's end-to-end time went, in ms (NaN where the server did not say)."""
    return {"queue": r.queue_ms, "exec": r.exec_ms, "handler_other": r.server_ms - r.queue_ms - r.exec_ms,
            "outside": r.latency_ms - r.server_ms}


def _summary(splits: list[dict[str, float]]) -> dict:
    out: dict = {"requests": len(splits)}
    for part in PARTS:
        values = [s[part] for s in splits if not math.isnan(s[part])]
        out[part] = ({"median": round(statistics.median(values), 2), "min": round(min(values), 2),
                      "max": round(max(values), 2)} if values else None)
    return out


def analyse(records: list[RequestRecord], slo_class: str, window: list[float] | None,
            steal: list[float | None] | None) -> dict:
    """The report for one policy's records."""
    mine = [r for r in records if r.slo_class == slo_class]
    missed = [r for r in mine if not r.on_time]
    when = [r.scheduled_s if r.scheduled_s is not None else r.send_s for r in missed]
    out: dict = {"requests": len(mine), "misses": len(missed),
                 "by_status": dict(Counter("OK (late)" if r.status == "OK" else r.status for r in missed))}
    if window is not None:
        start, stop = window
        out["by_phase"] = {"before": sum(t < start for t in when), "during": sum(start <= t < stop for t in when),
                           "after": sum(t >= stop for t in when)}
    bins = Counter(int(t // STEAL_BIN_S) for t in when)
    n_bins = max([len(steal or [])] + [b + 1 for b in bins])
    out["per_bin"] = [{"from_s": b * STEAL_BIN_S, "misses": bins.get(b, 0),
                       "steal_pct": steal[b] if steal is not None and b < len(steal) else None}
                      for b in range(n_bins) if bins.get(b, 0)]
    out["split_ms"] = {"missed_ok": _summary([time_split(r) for r in missed if r.status == "OK"]),
                       "on_time": _summary([time_split(r) for r in mine if r.on_time])}
    return out


def analyse_run(run_dir: Path, slo_class: str) -> dict:
    from slonn.scripts.compare import slug

    report = json.loads((run_dir / "compare.json").read_text())
    window = report.get("corunner_window_s")
    hosts = report.get("live_loadavg_1min") or {}
    out = {}
    for policy in report["policies"]:
        path = run_dir / f"live-{slug(policy)}.csv"
        if not path.exists():
            continue
        out[policy] = analyse(read_csv(path), slo_class, window, (hosts.get(policy) or {}).get("steal_pct_per_10s"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.misses", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="`slonn compare --out` directories (with live runs)")
    p.add_argument("--slo-class", default="interactive")
    args = p.parse_args(argv)
    out = {}
    for run in args.runs:
        if not (run / "compare.json").exists():
            p.error(f"{run}: no compare.json (not a `slonn compare --out` directory)")
        out[str(run)] = analyse_run(run, args.slo_class)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
