"""`python -m bench.eval_latency`: held-out accuracy of the latency model on a profile.

Splits the profile rows (random ``--test-fraction``, stratified by co-runner
intensity so contended rows are held out too; or ``--holdout-intensity X``:
all rows of one intensity), fits :class:`~policy.latency_model.LatencyModel`
on the rest and reports, overall and per intensity, the MAPE of the mean
prediction (target <= 10%) and the share of rows whose measured latency
exceeds the safe prediction (target <= 2%). Also the same for the table the
planner would read (bucketed contention, batch-monotone), which is what
decisions use, and (``host_pauses``) for the rows the host did not pause,
where the profile recorded it.

``recent_slowdown``: the same predictions times the recent-slowdown factor
(``policy.planner.RecentSlowdown``, what ``--policy slonn:recent_tau_ms=60``
plans with; the default policy does not), replayed over the profile in time
order. Each row's factor comes from the rows that finished before it started
(training rows scored out of fold, as a live batch is scored by a model that
has not seen it). Its ``planning_bound`` scores the bound the planner uses
with the factor on: mean x factor x the factor's own error margin
(``RecentSlowdown.margin``), or the table's safe prediction while the margin
is not known yet.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

from slonn.policy.latency_model import (
    DEFAULT_CONTENTION_EDGES,
    PROFILE_CSV,
    LatencyModel,
    LatencyModelConfig,
    mape,
    profile_csv_name,
    profile_niceness,
    read_rows_csv,
    rows_to_arrays,
)
from slonn.policy.learner import LearnerConfig, OnlineLearner
from slonn.policy.planner import RecentSlowdown
from slonn.precision import DEFAULT_PRECISION, PRECISIONS

MAPE_TARGET_PCT = 10.0
DISTURBED_EXCESS = 0.1
"""A row whose contention exceeds its co-runner's own demand (intensity / n_cpus) by more: other load."""
PAUSE_SHARE = 0.05
"""A row whose host pause (``host_pause_ms``, time the worker's vCPU did not run) exceeds this share of its exec
ms counts as paused by the host (docs/latency-model.md, "Evaluating the model")."""


def _burn_order(label: str) -> float:
    try:
        return burn_intensity(label)
    except ValueError:
        return float("inf")


def burn_intensity(label: str) -> float:
    """'2x1' -> 2.0, '1x0.5' -> 0.5 (the co-runner's CPU demand in cores)."""
    n, _, duty = label.partition("x")
    return int(n) * (float(duty) if duty else 1.0)
EXCEED_TARGET = 0.02


def split(dicts: list[dict], test_fraction: float, holdout_intensity: str | None, seed: int):
    """Indices (train, test): per-intensity random split, or one whole intensity held out."""
    rng = np.random.default_rng(seed)
    by = collections.defaultdict(list)
    for i, d in enumerate(dicts):
        by[d.get("burn", "?")].append(i)
    train, test = [], []
    for key, idx in by.items():
        if holdout_intensity is not None:
            (test if key == holdout_intensity else train).extend(idx)
            continue
        idx = rng.permutation(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return sorted(train), sorted(test)


def _scores(mean, safe, table_mean, table_safe, actual) -> dict:
    """``mape_pct`` and ``exceed_safe_rate`` score the model; ``table_mape_pct`` and ``exceed_table_safe_rate``
    the table the planner reads (bucketed contention; see ``LatencyModel.to_table``)."""
    return {"rows": int(len(actual)), "mape_pct": round(mape(mean, actual), 2),
            "table_mape_pct": round(mape(table_mean, actual), 2),
            "exceed_safe_rate": round(float(np.mean(actual > safe)), 4),
            "exceed_table_safe_rate": round(float(np.mean(actual > table_safe)), 4),
            "mean_safe_over_actual": round(float(np.mean(safe / actual)), 3)}


def evaluate(rows, dicts, test_fraction: float = 0.25, holdout_intensity: str | None = None, seed: int = 0,
             config: LatencyModelConfig | None = None, edges=DEFAULT_CONTENTION_EDGES) -> dict:
    train, test = split(dicts, test_fraction, holdout_intensity, seed)
    if not test or not train:
        raise SystemExit(f"empty split (train {len(train)}, test {len(test)}): check --holdout-intensity")
    model = LatencyModel(config or LatencyModelConfig()).fit([rows[i] for i in train])
    level, batch, cont, actual = rows_to_arrays([rows[i] for i in test])
    mean = model.predict_mean(level, batch, cont)
    safe = model.predict_safe(level, batch, cont)
    levels = sorted({r.level for r in rows}, reverse=True)
    table = model.to_table(levels, int(max(r.batch_size for r in rows)), edges)
    cells = [(table.bucket(c), table.level_index(lv), int(b)) for lv, b, c in zip(level, batch, cont)]
    table_safe = np.array([table.safe(*cell) for cell in cells])
    table_mean = np.array([table.mean(*cell) for cell in cells])
    score = lambda sel: _scores(mean[sel], safe[sel], table_mean[sel], table_safe[sel], actual[sel])
    overall = score(slice(None))
    per = {}
    burns = np.array([dicts[i].get("burn", "?") for i in test])
    for key in sorted(set(burns), key=_burn_order):
        sel = burns == key
        per[key] = score(sel)
        per[key]["contention_mean"] = round(float(cont[sel].mean()), 3)
    # rows where the signal was no more than the co-runner's own demand: nobody else was loading the machine
    expected = np.array([float(dicts[i].get("intensity", 0) or 0) for i in test]) / model.config.n_cpus
    quiet = cont <= expected + DISTURBED_EXCESS
    undisturbed = score(quiet) if quiet.any() else {}
    unpaused = _unpaused(dicts, test, actual, mean, safe, table_mean, table_safe)
    per_bucket = {}
    buckets = np.array([table.bucket(c) for c in cont])
    bounds = [0.0, *edges, float("inf")]
    for k in range(len(edges) + 1):
        sel = buckets == k
        if sel.any():
            name = f"({bounds[k]:g}, {bounds[k + 1]:g}]"
            per_bucket[name] = score(sel)
    oracle = cell_median_oracle(rows, dicts, train, test)
    recent = recent_slowdown_scores(rows, dicts, train, test, model, mean, safe, table_mean, table_safe, actual)
    return {"train_rows": len(train), "test_rows": len(test),
            "split": f"holdout intensity {holdout_intensity}" if holdout_intensity else
            f"random {test_fraction:.0%} per intensity (seed {seed})",
            "overall": overall, "per_intensity": per, "undisturbed_rows": undisturbed,
            "host_pauses": unpaused,
            "per_contention_bucket": per_bucket,
            "targets": {"mape_pct": MAPE_TARGET_PCT, "exceed_safe_rate": EXCEED_TARGET},
            "meets_targets": overall["mape_pct"] <= MAPE_TARGET_PCT and overall["exceed_safe_rate"] <= EXCEED_TARGET,
            "noise_floor": oracle,
            "recent_slowdown": recent,
            "model": model.describe()}


def _unpaused(dicts, test: list[int], actual, mean, safe, table_mean, table_safe) -> dict:
    """Scores on the held-out rows the host did not pause (``host_pause_ms`` at most ``PAUSE_SHARE`` of the
    row's exec ms): what the model does where the machine is what its features describe. The model is the
    same (fitted on every row); {} if the profile has no ``host_pause_ms`` column (older profiles, GPU, or more
    than one torch thread)."""
    pause = np.array([float(dicts[i].get("host_pause_ms") or "nan") for i in test])
    if np.isnan(pause).all():
        return {}
    known = ~np.isnan(pause)
    ok = known & (pause <= PAUSE_SHARE * actual)
    out = {"pause_share_limit": PAUSE_SHARE, "rows_with_pause_ms": int(known.sum()),
           "paused_rows_share": round(float(1 - ok.sum() / known.sum()), 4),
           "pause_ms_mean": round(float(np.nanmean(pause)), 3)}
    if ok.any():
        out["unpaused_rows"] = _scores(mean[ok], safe[ok], table_mean[ok], table_safe[ok], actual[ok])
        burns = np.array([dicts[i].get("burn", "?") for i in test])
        per = {}
        for key in sorted(set(burns[known]), key=_burn_order):
            in_key = known & (burns == key)
            sel = ok & in_key
            if sel.any():
                per[key] = {"paused_rows_share": round(float(1 - sel.sum() / in_key.sum()), 4),
                            "mape_pct": round(mape(mean[sel], actual[sel]), 2)}
        out["unpaused_per_intensity"] = per
    return out


def recent_slowdown_scores(rows, dicts, train: list[int], test: list[int], model: LatencyModel, mean, safe,
                           table_mean, table_safe, actual, recent: RecentSlowdown | None = None) -> dict:
    """Scores of the predictions times the recent-slowdown factor, and of the planning bound with its margin
    (see the module's doc); {} when the profile has no ``t_s`` column (when each row finished)."""
    try:
        t_end = np.array([float(d["t_s"]) for d in dicts])
    except (KeyError, TypeError, ValueError):
        return {}
    recent = recent or RecentSlowdown()
    ms = rows_to_arrays(rows)[3]
    predicted = np.empty(len(rows))
    predicted[test] = mean
    predicted[train] = model.out_of_fold_mean()  # the model was fitted on the train rows, in this order
    f, margin = (x[test] for x in replay_factors(recent, t_end, ms, predicted))
    out = {"tau_s": recent.tau_s, "prior_batches": recent.prior, "max_factor": recent.max_factor,
           "factor_p5_p50_p95": [round(float(x), 3) for x in np.percentile(f, [5, 50, 95])],
           "overall": _scores(mean * f, safe * f, table_mean * f, table_safe * f, actual)}
    known = margin > 0
    if known.any():
        # What the planner plans with once the factor's margin is known: mean x factor x margin (the table's
        # safe prediction, unscaled, before). The model's mean, which the replay learned the margin against;
        # the planner's is the table's, against which it learns it live.
        bound = np.where(known, mean * f * margin, table_safe)
        out["planning_bound"] = {
            "quantile": recent.quantile, "window_batches": recent.window,
            "rows_with_margin_share": round(float(known.mean()), 4),
            "margin_p5_p50_p95": [round(float(x), 3) for x in np.percentile(margin[known], [5, 50, 95])],
            "exceed_rate": round(float(np.mean(actual > bound)), 4),
            "mean_bound_over_actual": round(float(np.mean(bound / actual)), 3),
            "table_safe_mean_over_actual": round(float(np.mean(table_safe / actual)), 3)}
    burns = np.array([dicts[i].get("burn", "?") for i in test])
    out["per_intensity"] = {key: round(mape((mean * f)[burns == key], actual[burns == key]), 2)
                            for key in sorted(set(burns), key=_burn_order)}
    out["meets_targets"] = (out["overall"]["mape_pct"] <= MAPE_TARGET_PCT
                            and out["overall"]["exceed_safe_rate"] <= EXCEED_TARGET)
    return out


def replay_factors(recent: RecentSlowdown, t_end: np.ndarray, ms: np.ndarray,
                   predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's recent-slowdown factor and margin (0: not known yet) from the rows that finished before it
    started (``t_end - ms``; a profile runs one call at a time, so that is every earlier row), fed
    ``measured / predicted`` in the order the rows finished. The model's mean stands in for the table's, which
    the planner compares with."""
    t_start = t_end - ms * 1e-3
    factor, margin = np.ones(len(ms)), np.zeros(len(ms))
    for i in np.argsort(t_end, kind="stable"):
        factor[i] = recent.factor(float(t_start[i]))
        margin[i] = recent.margin()
        recent.observe(float(t_end[i]), float(ms[i]), float(predicted[i]), float(factor[i]))
    return factor, margin


def cell_median_oracle(rows, dicts, train: list[int], test: list[int]) -> dict:
    """MAPE of an oracle that predicts each held-out row by the median of the training rows measured in
    exactly its cell (level, batch size, co-runner setting): what repeated measurement of the same
    thing scatters by. A model that only sees the contention signal cannot expect to beat it by much;
    when it is above the MAPE target, the target is below this machine's measurement noise."""
    cells: dict[tuple, list[float]] = {}
    for i in train:
        cells.setdefault((rows[i].level, rows[i].batch_size, dicts[i].get("burn", "?")), []).append(rows[i].exec_ms)
    errors: dict[str, list[float]] = {}
    for i in test:
        ms = cells.get((rows[i].level, rows[i].batch_size, dicts[i].get("burn", "?")))
        if ms:
            errors.setdefault(dicts[i].get("burn", "?"), []).append(abs(np.median(ms) - rows[i].exec_ms) / rows[i].exec_ms)
    every = [e for errs in errors.values() for e in errs]
    return {"mape_pct": round(100 * float(np.mean(every)), 2) if every else None,
            "per_intensity": {k: round(100 * float(np.mean(v)), 2)
                              for k, v in sorted(errors.items(), key=lambda kv: _burn_order(kv[0]))}}


def online_adaptation(rows, dicts, base_burn: str, live_burn: str, steps=(0, 10, 25, 50, 100, 200),
                      edges=DEFAULT_CONTENTION_EDGES) -> dict:
    """Learner started on the ``base_burn`` rows only; ``live_burn`` rows arrive in time order (first half),
    and after each step the learner's table is scored on the second half (what the planner would read)."""
    base = [r for r, d in zip(rows, dicts) if d.get("burn") == base_burn]
    live = sorted(((float(d.get("t_s", 0) or 0), r) for r, d in zip(rows, dicts) if d.get("burn") == live_burn),
                  key=lambda tr: tr[0])
    if not base or len(live) < 20:
        return {"skipped": f"need rows for burn {base_burn!r} and {live_burn!r}"}
    stream, test = [r for _, r in live[: len(live) // 2]], [r for _, r in live[len(live) // 2:]]
    levels = sorted({r.level for r in rows}, reverse=True)
    learner = OnlineLearner(base, levels, int(max(r.batch_size for r in rows)), edges,
                            LearnerConfig(max_live=512), clock=lambda: 0.0)
    out, seen = [], 0
    for n in steps:
        n = min(n, len(stream))
        for r in stream[seen:n]:
            learner.observe(r, now_s=0.0)
        seen = n
        if n:
            learner.refit_now(now_s=0.0)
        t = learner.table
        safe = np.array([t.safe(t.bucket(r.contention), t.level_index(r.level), r.batch_size) for r in test])
        mean = np.array([t.mean(t.bucket(r.contention), t.level_index(r.level), r.batch_size) for r in test])
        actual = np.array([r.exec_ms for r in test])
        out.append({"live_samples": n, "table_mape_pct": round(mape(mean, actual), 2),
                    "exceed_table_safe_rate": round(float(np.mean(actual > safe)), 4)})
    return {"base": base_burn, "live": live_burn, "test_rows": len(test), "steps": out}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.eval_latency", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--profile", type=Path, default=None,
                   help=f"CSV (default <model-dir>/{PROFILE_CSV}, or the --precision one)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="evaluate the profile `slonn profile --precision` wrote")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--holdout-intensity", default=None, help="hold out every row of this co-runner setting, e.g. 1x1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--online", action="store_true",
                   help="also: learner fitted on the quietest setting, fed live rows of the busiest one")
    p.add_argument("--json", action="store_true", help="print JSON (the only output format; accepted for the CLI)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.profile or args.model_dir / profile_csv_name(args.precision)
    if not path.exists():
        print(f"{path} not found: run `slonn profile --model-dir {args.model_dir}` first", file=sys.stderr)
        return 2
    rows, dicts = read_rows_csv(path, with_extra=True)
    result = evaluate(rows, dicts, args.test_fraction, args.holdout_intensity, args.seed)
    if args.online:
        burns = sorted({d.get("burn", "?") for d in dicts}, key=_burn_order)
        result["online_adaptation"] = online_adaptation(rows, dicts, burns[0], burns[-1])
    result["profile_csv"] = str(path)
    result["worker_niceness"] = profile_niceness(dicts) or None
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
