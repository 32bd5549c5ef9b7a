"""`slonn simulate`: discrete-event replay of a trace through the real scheduler on a virtual clock.

The simulator has no scheduling logic of its own. It drives the same
``scheduler.driver.Driver`` as the live ``Dispatcher`` — admit each arrival,
ask for a batch per idle worker after every event (arrival, finished batch,
wake-up), answer the expired DEADLINE_EXCEEDED, feed each finished batch
back, which also teaches the driver its overhead allowance — and does what
the replay client does (give up after its generous timeout, which cancels a
still-queued request). Only the worker is replaced: a batch's exec time is
drawn from the learned latency model at the true contention of that moment
(mean x a residual ratio resampled from the profile), plus the dispatch/reply
overhead. Correctness of an answer is the real model's prediction at that
level on the same held-out digit the live replay would send (request i sends
test digit i mod n).
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from slonn.policy.factory import make_policy
from slonn.policy.latency_model import profile_csv_name
from slonn.policy.planner import Policy
from slonn.policy.table import LatencyTable
from slonn.precision import DEFAULT_PRECISION, PRECISIONS
from slonn.scheduler.config import SLOClassConfig
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.driver import FRONTEND_BATCH_MS, FRONTEND_REQUEST_MS, Driver
from slonn.scheduler.simloop import CLIENT_TIMEOUT, Frontend, SimLoop, admission_times
from slonn.scheduler.report import RequestRecord
from slonn.scheduler.trace import Arrivals

__all__ = ["CLIENT_TIMEOUT", "ContentionProfile", "LatencyDraw", "SimConfig", "SimResult", "admission_times",
           "simulate"]


# --------------------------------------------------------------------------- interference and latency


@dataclass(frozen=True)
class ContentionProfile:
    """Contention over simulated time: ``base`` outside the window, ``value`` inside [start_s, stop_s)."""

    base: float = 0.0
    value: float = 0.0
    start_s: float = float("inf")
    stop_s: float = float("inf")

    def at(self, t_s: float) -> float:
        return self.value if self.start_s <= t_s < self.stop_s else self.base

    @property
    def states(self) -> tuple[float, ...]:
        return (self.base, self.value) if self.start_s < self.stop_s else (self.base,)


class LatencyDraw:
    """Exec ms of a batch = mean(contention state, level, batch) x a residual ratio (cycled from a pre-drawn pool)."""

    def __init__(self, mean_ms: Mapping[float, np.ndarray], ratios: Mapping[float, np.ndarray]) -> None:
        """``mean_ms[c]`` has shape (n_levels, max_batch); ``ratios[c]`` is a 1-D pool (>= 1 value)."""
        self._mean = {c: np.asarray(m, float).tolist() for c, m in mean_ms.items()}
        self._ratios = {c: np.asarray(r, float).tolist() for c, r in ratios.items()}
        self._pos = {c: 0 for c in ratios}

    def __call__(self, contention: float, level_index: int, batch_size: int) -> float:
        pool = self._ratios[contention]
        k = self._pos[contention]
        self._pos[contention] = (k + 1) % len(pool)
        return self._mean[contention][level_index][batch_size - 1] * pool[k]

    @classmethod
    def from_table(cls, table: LatencyTable, states: Sequence[float]) -> "LatencyDraw":
        """No noise: the table's mean at the bucket of each state (tests, a quick look)."""
        return cls({c: table.mean_ms[table.bucket(c)] for c in states}, {c: np.ones(1) for c in states})

    @classmethod
    def from_model(cls, model, levels: Sequence[float], max_batch: int, states: Sequence[float],
                   seed: int = 0, pool_size: int = 1 << 16, min_rows: int = 60,
                   edges: Sequence[float] | None = None) -> "LatencyDraw":
        """Mean from ``model.predict_mean`` at each contention state; ratios resampled from the profile's
        residuals ``exec_ms / predicted mean`` of the rows in the state's contention bucket (``edges``,
        the table's), or of the ``min_rows`` rows nearest in contention if the bucket holds fewer."""
        from slonn.policy.latency_model import DEFAULT_CONTENTION_EDGES, rows_to_arrays

        edge_arr = np.asarray(DEFAULT_CONTENTION_EDGES if edges is None else edges, float)
        rng = np.random.default_rng(seed)
        level, batch, cont, ms = rows_to_arrays(model.rows)
        ratio = ms / model.predict_mean(level, batch, cont)
        row_bucket = np.searchsorted(edge_arr, cont, side="left")
        lv = np.asarray(levels, float)[:, None]
        b = np.arange(1, max_batch + 1, dtype=float)[None, :]
        means, pools = {}, {}
        for c in states:
            means[c] = np.maximum.accumulate(model.predict_mean(lv, b, np.full_like(b, c)), axis=1)
            mine = ratio[row_bucket == np.searchsorted(edge_arr, c, side="left")]
            if len(mine) < min_rows:
                mine = ratio[np.argsort(np.abs(cont - c), kind="stable")[:min_rows]]
            pools[c] = rng.choice(mine, size=pool_size)
        return cls(means, pools)


# --------------------------------------------------------------------------- the event loop


@dataclass(frozen=True)
class SimConfig:
    """What the simulated server looks like."""

    workers: int = 1
    """Workers, each running one batch at a time (>= 1)."""
    max_batch: int = 64
    """Largest batch the planner forms (the server's --max-batch)."""
    overhead_ms: float = 1.0
    """Floor of the planner's allowance added to every predicted exec time (the server's --overhead-ms); the
    driver raises it to what batches take beyond their exec time (here ``dispatch_ms``), as the server does."""
    dispatch_ms: float = 1.0
    """Simulated dispatch + IPC + reply time of a batch, added to its exec time (>= 0)."""
    reply_ms_per_request: float = 0.05
    """Serial reply cost: the i-th answer of a batch leaves i times this later (>= 0)."""
    ingress_ms_per_request: float = 0.0
    """Serial admission cost of the frontend (>= 0; 0 = off): request k reaches the scheduler at
    ``a_k = max(send_k, a_{k-1}) + this``, a one-server FIFO in front of the queues. On a small machine the
    frontend's CPU per request turns a clump of simultaneous arrivals into a staircase (``python -m
    bench.bench_frontend``: ~1-1.3 ms for the server process on a 2-vCPU EPYC, ~3-3.9 ms for the whole
    machine with the workers and the client; 2-2.5 ms reproduces slonn's live attainment there,
    docs/results.md).
    The request's deadline still counts from its send time, as the live server's does from the caller's
    gRPC deadline; one with no time left at admission is answered DEADLINE_EXCEEDED (the live server
    already does so with 5 ms left)."""
    frontend_request_ms: float = 0.0
    """The frontend's CPU per request (>= 0): with ``frontend_batch_ms``, the frontend is modelled as one
    server (its event-loop thread; 0 and 0 = off). Half is spent admitting the request, half answering it;
    arrivals wait for the frontend, and their deadline counts from their send. Not with
    ``ingress_ms_per_request``, which models admission alone."""
    frontend_batch_ms: float = 0.0
    """The frontend's CPU per batch (>= 0): half to dispatch it (its worker starts after that), half to take
    its result. The driver learns both costs from the frontend's CPU, as the live server does from its
    event-loop thread."""
    signal_lag_s: float = 0.25
    """The planner sees the contention of this long ago (the monitor's smoothing window)."""
    max_inflight: int = 8192
    """Admitted, unanswered requests beyond this are rejected RESOURCE_EXHAUSTED (the server's --max-inflight)."""
    timeout_factor: float = 4.0
    """The client gives up after deadline x this + 1 s (as slonn.scheduler.replay does)."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_batch < 1 or self.max_inflight < 1:
            raise ValueError(f"SimConfig: workers={self.workers}, max_batch={self.max_batch}, "
                             f"max_inflight={self.max_inflight} must be >= 1")
        if min(self.overhead_ms, self.dispatch_ms, self.reply_ms_per_request, self.ingress_ms_per_request,
               self.signal_lag_s, self.frontend_request_ms, self.frontend_batch_ms) < 0:
            raise ValueError("SimConfig: overhead_ms, dispatch_ms, reply_ms_per_request, ingress_ms_per_request, "
                             "frontend_request_ms, frontend_batch_ms, signal_lag_s must be >= 0")
        if self.ingress_ms_per_request > 0 and self.frontend:
            raise ValueError("SimConfig: ingress_ms_per_request and the frontend model (frontend_request_ms, "
                             "frontend_batch_ms) both model admission: set one")

    @property
    def frontend(self) -> bool:
        """The frontend is modelled (its costs are not both 0)."""
        return self.frontend_request_ms > 0 or self.frontend_batch_ms > 0


@dataclass
class SimResult:
    records: list[RequestRecord]
    batches: int
    wall_s: float
    """Wall time of the event loop (records included, summary excluded)."""
    cpu_s: float
    """CPU time of the same (the honest figure on a shared machine)."""
    sim_s: float
    """Virtual time at the last event."""

    @property
    def requests_per_s(self) -> float:
        return len(self.records) / max(self.wall_s, 1e-9)

    @property
    def requests_per_cpu_s(self) -> float:
        return len(self.records) / max(self.cpu_s, 1e-9)


def simulate(arrivals: Arrivals, classes: Mapping[str, SLOClassConfig], policy: Policy, table: LatencyTable,
             accuracy: Sequence[float], draw: LatencyDraw, cfg: SimConfig = SimConfig(),
             contention: ContentionProfile = ContentionProfile(), correct: np.ndarray | None = None,
             model: str = "model", seed: int = 0, scheduler: Scheduler | None = None,
             on_launch: Callable[[Batch], None] | None = None) -> SimResult:
    """Replay ``arrivals`` through the real :class:`Driver` and :class:`Scheduler` with ``policy`` on a
    virtual clock.

    ``correct``: bool array (n_levels, n_inputs); request i is correct iff ``correct[level, i % n_inputs]``.
    Without it, correctness is Bernoulli(accuracy of the level), seeded. ``on_launch``: called with each
    batch as it starts (its ``planned_at_s`` is the virtual time).
    """
    # The event loop allocates a few small objects per request and frees them all; the cyclic collector
    # would walk every live record again and again for nothing (there are no cycles to find mid-run).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(arrivals, classes, policy, table, accuracy, draw, cfg, contention, correct, model, seed,
                         scheduler, on_launch)
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(arrivals: Arrivals, classes: Mapping[str, SLOClassConfig], policy: Policy, table: LatencyTable,
              accuracy: Sequence[float], draw: LatencyDraw, cfg: SimConfig, contention: ContentionProfile,
              correct: np.ndarray | None, model: str, seed: int, scheduler: Scheduler | None,
              on_launch: Callable[[Batch], None] | None) -> SimResult:
    t0, c0 = time.perf_counter(), time.process_time()
    accuracy = tuple(accuracy)
    sched = scheduler or Scheduler({model: accuracy}, classes, policy)
    n = len(arrivals)
    if correct is None:
        u = np.random.default_rng(seed).random(n)
        correct_rows: list[list[bool]] = np.stack([u < a for a in accuracy]).tolist()
        n_inputs = n
    else:
        correct_rows = np.asarray(correct, bool).tolist()
        n_inputs = correct.shape[1]
    lag_s = cfg.signal_lag_s
    seen: float | Callable[[float], float] = contention.base  # one contention level all along
    if contention.start_s < contention.stop_s:
        seen = lambda now: contention.at(now - lag_s)  # noqa: E731 - the planner sees the signal late
    frontend = Frontend(cfg.frontend_request_ms, cfg.frontend_batch_ms) if cfg.frontend else None
    # The driver starts from the live server's prior costs and learns the modelled frontend's from its CPU.
    driver = Driver(sched, {model: table}, {model: accuracy}, cfg.max_batch, cfg.overhead_ms, cfg.workers,
                    cfg.max_inflight, contention=seen, frontend_cpu=None if frontend is None else frontend.cpu_s,
                    frontend_batch_ms=FRONTEND_BATCH_MS, frontend_request_ms=FRONTEND_REQUEST_MS)
    loop = SimLoop(driver, arrivals, {c: classes[c].latency_ms for c in set(arrivals.classes)}, table, draw, cfg,
                   contention, model, on_launch, frontend)
    loop.run()
    records = []
    for k in range(n):
        st = loop.status[k] or "UNANSWERED"
        ok = st == "OK"
        records.append(RequestRecord(
            k, loop.cls_names[k], loop.deadline_ms[loop.cls_names[k]], loop.offsets[k], loop.answer_s[k], st,
            loop.out_level[k], loop.out_batch[k], correct_rows[loop.out_li[k]][k % n_inputs] if ok else None,
            loop.out_late[k], loop.out_exec[k], loop.out_pred[k]))
    return SimResult(records, loop.batches, time.perf_counter() - t0, time.process_time() - c0, loop.now_s)


# --------------------------------------------------------------------------- building blocks from disk


def held_out_correct(model_dir: Path) -> np.ndarray:
    """(n_levels, n_test) bool: the real model's answer at each level on each of the artifact's held-out rows
    is right (levels from the highest down).

    The same inputs, in the same order, as the live replay sends (request i -> held-out row i mod n; the
    packaged digits model's held-out rows are the digits split the replay sends by default).
    """
    import torch

    from slonn.workers.artifact import load_artifact, load_heldout

    net, manifest = load_artifact(model_dir, "cpu")
    x_np, y = load_heldout(model_dir)
    x = torch.from_numpy(x_np)
    with torch.inference_mode():
        preds = [net(x, lv).argmax(dim=1).numpy() for lv in sorted(manifest.levels, reverse=True)]
    return np.stack([p == y for p in preds])


def load_latency_model(profile: Path):
    """The learned latency model (policy/latency_model.py) refit from a profile CSV."""
    from slonn.policy.latency_model import (
        LatencyModel,
        LatencyModelConfig,
        read_rows_csv,
    )

    if not profile.exists():
        raise SystemExit(f"latency profile {profile} not found: run `slonn profile --model-dir DIR` "
                         f"(or pass --profile CSV)")
    return LatencyModel(LatencyModelConfig()).fit(read_rows_csv(profile))


def corunner_contention(profile: Path, intensity: float = 1.0) -> float | None:
    """Mean measured contention of the profile rows taken with ``intensity`` cores of co-runner, if recorded."""
    import csv

    with open(profile, newline="") as f:
        vals = [float(d["contention"]) for d in csv.DictReader(f)
                if d.get("intensity") not in (None, "") and abs(float(d["intensity"]) - intensity) < 1e-6]
    return float(np.mean(vals)) if vals else None


def planner_table(model, levels: Sequence[float], max_batch: int, kind: str) -> LatencyTable:
    """The table the planner reads: the learner's ("learned", contention buckets) or the server's
    contention-blind one ("linear": scheduler.latency.linear_table over quiet profile rows)."""
    if kind == "learned":
        return model.to_table(levels, max_batch)
    from slonn.scheduler.latency import WARMUP_BATCH_SIZES, linear_table

    quiet = min(r.contention for r in model.rows)
    samples = [r for r in model.rows if r.contention <= quiet + 0.1 and r.batch_size in WARMUP_BATCH_SIZES]
    return linear_table(samples, tuple(levels), max_batch)


@dataclass
class SimSetup:
    """Everything loaded once and shared by many runs (``slonn compare --sim`` runs every policy on it)."""

    classes: dict
    levels: tuple[float, ...]
    accuracy: tuple[float, ...]
    table: LatencyTable
    draw_args: tuple
    contention: ContentionProfile
    correct: np.ndarray | None
    model_name: str

    def draw(self, seed: int) -> LatencyDraw:
        model, levels, max_batch, states = self.draw_args
        return LatencyDraw.from_model(model, levels, max_batch, states, seed=seed,
                                      edges=self.table.contention_edges or None)


def build_setup(args) -> SimSetup:
    from slonn.scheduler.config import load_classes
    from slonn.workers.artifact import load_manifest

    manifest = load_manifest(args.model_dir)
    levels = tuple(sorted(manifest.levels, reverse=True))
    accuracy = tuple(manifest.accuracy[lv] for lv in levels)
    profile = args.profile or args.model_dir / profile_csv_name(args.precision)
    model = load_latency_model(profile)
    value = args.corunner_contention
    if value is None:
        value = corunner_contention(profile) or 0.5
    contention = ContentionProfile(args.quiet_contention, value, args.corunner_start_s, args.corunner_stop_s) \
        if args.corunner_start_s is not None else ContentionProfile(args.quiet_contention)
    correct = held_out_correct(args.model_dir) if args.accuracy == "predictions" else None
    table = planner_table(model, levels, args.max_batch, args.planner_table)
    return SimSetup(load_classes(args.classes), levels, accuracy, table,
                    (model, levels, args.max_batch, contention.states), contention, correct, manifest.name)


def load(args) -> tuple[Arrivals, SimSetup, SimConfig]:
    """What a set of ``slonn simulate`` arguments (:func:`add_sim_args` and the replay's arrival arguments)
    stands for: the arrivals, the loaded model and profile, the simulated server."""
    from slonn.scheduler.replay import arrivals_from_args

    return arrivals_from_args(args), build_setup(args), sim_config(args)


def sim_config(args) -> SimConfig:
    return SimConfig(workers=args.workers, max_batch=args.max_batch, overhead_ms=args.overhead_ms,
                     dispatch_ms=args.dispatch_ms, reply_ms_per_request=args.reply_ms_per_request,
                     ingress_ms_per_request=args.ingress_ms_per_request,
                     frontend_request_ms=args.frontend_request_ms if args.frontend == "on" else 0.0,
                     frontend_batch_ms=args.frontend_batch_ms if args.frontend == "on" else 0.0,
                     signal_lag_s=args.signal_lag_s)


def run_policy(setup: SimSetup, arrivals: Arrivals, policy_name: str, cfg: SimConfig, seed: int = 0) -> SimResult:
    return simulate(arrivals, setup.classes, make_policy(policy_name), setup.table, setup.accuracy,
                    setup.draw(seed), cfg, setup.contention, setup.correct, setup.model_name, seed)


def sim_parser(**kwargs) -> argparse.ArgumentParser:
    """An ``argparse.ArgumentParser(**kwargs)`` with the arrival and simulation arguments: what :func:`load`
    reads (``slonn simulate``'s, and bench_sim's)."""
    from slonn.scheduler.replay import add_arrival_args

    p = argparse.ArgumentParser(**kwargs)
    add_arrival_args(p)
    add_sim_args(p)
    return p


def add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=Path("models/digits-mlp"))
    p.add_argument("--profile", type=Path, default=None,
                   help="latency profile CSV (default: the one `slonn profile --precision` wrote in <model-dir>)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="worker weight precision (the server's --precision): picks the profile")
    p.add_argument("--classes", type=Path, default=None, help="SLO classes TOML (default: the packaged one)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--overhead-ms", type=float, default=1.0, help="planner allowance (the server's --overhead-ms)")
    p.add_argument("--dispatch-ms", type=float, default=1.0, help="simulated dispatch+IPC+reply ms per batch")
    p.add_argument("--reply-ms-per-request", type=float, default=0.05, help="simulated serial reply ms per answer")
    p.add_argument("--ingress-ms-per-request", type=float, default=0.0,
                   help="simulated serial admission ms per request in the frontend (0 = off; 2-2.5 reproduced slonn's "
                        "live attainment on a 2-vCPU VM; see slonn bench-frontend)")
    p.add_argument("--frontend", choices=("off", "on"), default="off",
                   help="model the frontend (one event-loop thread) as a one-server resource with the costs below")
    p.add_argument("--frontend-request-ms", type=float, default=FRONTEND_REQUEST_MS,
                   help="frontend CPU per request with --frontend on (default: about what a unary call cost the "
                        "server process on a 2-vCPU VM, bench.profile_frontend)")
    p.add_argument("--frontend-batch-ms", type=float, default=FRONTEND_BATCH_MS,
                   help="frontend CPU per batch with --frontend on (dispatch, IPC round trip, result fan-out)")
    p.add_argument("--signal-lag-s", type=float, default=0.25, help="contention signal lag seen by the planner")
    p.add_argument("--planner-table", choices=("learned", "linear"), default="learned",
                   help="learned: LatencyModel.to_table (contention buckets); linear: the server's cold-start table")
    p.add_argument("--corunner-start-s", type=float, default=None, help="co-runner on from (s of the replay)")
    p.add_argument("--corunner-stop-s", type=float, default=None, help="co-runner off at (s of the replay)")
    p.add_argument("--corunner-contention", type=float, default=None,
                   help="contention while the co-runner runs (default: the profile's mean at intensity 1, else 0.5)")
    p.add_argument("--quiet-contention", type=float, default=0.0)
    p.add_argument("--accuracy", choices=("predictions", "bernoulli"), default="predictions",
                   help="predictions: the real model's answers on the held-out digits; bernoulli: draw per level")
    p.add_argument("--seed", type=int, default=0)
