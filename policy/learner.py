"""Online refit of the latency model from live batches; publishes immutable LatencyTables.

The dispatcher calls :meth:`OnlineLearner.observe` after every batch (O(1),
thread-safe, no scikit-learn). A daemon thread checks every
``refit_interval_s`` and refits when the samples since the last refit drifted
from the published table, or ``quiet_refit_s`` after it otherwise (the fit itself runs in a child
process when started with ``start(process=True)``, as the server does: a refit
is ~100+ ms of mostly GIL-holding scikit-learn code, and in a thread of the
server process it would delay the event loop by up to a GIL switch interval
at every turn while it runs) — profile rows plus a sliding
window of live samples (by count and age), the live ones weighted
``live_weight`` times a profile row so that a change of load shows within a
refit or two — and swaps ``learner.table`` (one attribute assignment: readers
see the old or the new table, never a mix). The planner only reads
``learner.table``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from slonn.policy.latency_model import DEFAULT_CONTENTION_EDGES, LatencyModel, LatencyModelConfig, LatencySample
from slonn.policy.table import LatencyTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerConfig:
    """How much live data to keep and how much it counts."""

    max_live: int = 512
    """Live samples kept (newest), >= 1."""
    max_age_s: float = 30.0
    """Live samples older than this are dropped at refit, > 0."""
    live_weight: float = 10.0
    """Weight of a live sample relative to a profile row (>= 1): live evidence outweighs a stale profile."""
    refit_interval_s: float = 0.5
    """Background check period (> 0): a refit happens at a check if samples arrived since the last one and
    they drifted from the published table (``drift``) or ``quiet_refit_s`` has passed."""
    quiet_refit_s: float = 10.0
    """With new samples but no drift, refit at most this often (>= refit_interval_s): slow changes and cells
    the profile missed still reach the model. Equal to ``refit_interval_s``: refit at every check."""
    drift: float = 0.15
    """Refit at the next check once recent samples run this far from the published table's mean: an
    exponentially weighted mean of log(measured / mean) (weight ``DRIFT_EWMA_ALPHA``, so the last ~10 batches
    count, not the many before a change) beyond log(1 + drift), > 0. A refit is ~40 ms of CPU in the child:
    on a 2-vCPU machine, refitting once a second under load takes one vCPU in 4% of the moments a burst
    needs both, for a table that has not changed."""
    drift_samples: int = 5
    """Samples since the last refit before drift is judged (>= 1)."""
    exceed_trigger: float = 0.2
    """Refit at the next check once this share of recent batches (the same exponential weighting as
    ``drift``) ran over the published table's safe prediction, in (0, 1]. A tail that grows without moving the
    mean (a co-runner preempting some batches) is drift too: without this trigger such a tail waits for the
    quiet refit, up to ``quiet_refit_s``. It takes three overruns within about twenty batches: from a calibrated
    99% bound, a false trigger comes about once in 2e4 batches and costs one refit. 1 turns it off (the
    average of a 0/1 signal never exceeds it)."""
    contention_trigger: float = 0.5
    """Refit at the next check once the batches' contention, averaged over the last seconds (time constant
    ``CONTENTION_TAU_S``), moved this far from where it was at the last refit, in others' runnable tasks per
    CPU, and the last refit is ``CONTENTION_MIN_GAP_S`` old (> 0; ``inf`` turns it off). A co-runner that
    starts often moves neither the mean nor the tail enough for the other triggers (a batch of one runs a
    median 0.4 ms with or without one, but its p99 goes from ~1 to ~4 ms), and the contended bucket's safe
    bound then waits for the quiet refit, up to 10 s. The average is over time, not over batches: over ten
    batches (50 ms at 300 req/s) it would follow the quiet signal's swings (0.1-1.0 under a load
    generator) and refit for nothing; in interleaved `python -m bench.adapt` pairs that cost 167 late
    answers against 15."""
    min_rows: int = 20
    """No refit below this many rows (profile + live), >= 10."""
    max_base_rows: int = 1200
    """Profile rows kept (a seeded random subset when there are more): bounds the cost of a refit and of
    sending the rows to the learner's child process, >= 10."""

    def __post_init__(self) -> None:
        if self.max_live < 1 or self.max_age_s <= 0 or self.live_weight < 1 or self.refit_interval_s <= 0 \
                or self.min_rows < 10 or self.max_base_rows < 10 or self.quiet_refit_s < self.refit_interval_s \
                or self.drift <= 0 or self.drift_samples < 1 or not 0 < self.exceed_trigger <= 1 \
                or not self.contention_trigger > 0:
            raise ValueError(f"LearnerConfig({self}): need max_live >= 1, max_age_s > 0, live_weight >= 1, "
                             "refit_interval_s > 0, min_rows >= 10, max_base_rows >= 10, "
                             "quiet_refit_s >= refit_interval_s, drift > 0, drift_samples >= 1, "
                             "0 < exceed_trigger <= 1, contention_trigger > 0")


DRIFT_EWMA_ALPHA = 0.1
"""Weight of the newest sample in the drift average: about the last ten batches count. A cumulative mean
since the last refit would let the quiet samples before a co-runner outvote it (predictions following
seconds late)."""


CONTENTION_TAU_S = 2.0
"""Time constant (s) of the contention average that ``LearnerConfig.contention_trigger`` watches: long enough
that a quiet signal's swings (0.1-1.0 within seconds under a load generator) average out, short enough that
two busy co-runners (+1 or more) cross a 0.5 threshold in about 1.4 s (2 ln 2), plus up to a check."""
CONTENTION_MIN_GAP_S = 3.0
"""The contention trigger fires only this long after the last refit: at most one refit per 3 s for it."""


def fit_table(rows: Sequence[LatencySample], weights: np.ndarray, config: LatencyModelConfig,
              levels: tuple[float, ...], max_batch: int,
              contention_edges: tuple[float, ...], knot_rows: int | None = None) -> tuple[LatencyModel, LatencyTable]:
    """Fit the model and lay out its table (pure; runs in the learner's thread or its child process). The
    first ``knot_rows`` rows (the profile) set the model's knots (:meth:`LatencyModel.fit`)."""
    model = LatencyModel(config).fit(rows, weights, knot_rows)
    return model, model.to_table(levels, max_batch, contention_edges)


CHILD_START_TIMEOUT_S = 120.0
"""Spawning the child imports scikit-learn: generous on a loaded machine."""
STOP_JOIN_S = 5.0
"""stop() waits this long for the refit thread (a child still being spawned can outlast it)."""
CHILD_FIT_TIMEOUT_S = 60.0
"""A fit takes well under a second; a child this late is hung and gets replaced by the thread."""
_CHILD_BASE: list[LatencySample] = []


def _child_init(base: list[LatencySample]) -> None:
    global _CHILD_BASE
    _CHILD_BASE = base
    # Normal priority on purpose: at nice +10 the refit starves exactly when a co-runner takes the CPUs,
    # and the levels take 3.0 s instead of 0.5 s to react (`python -m bench.adapt`).


def _child_fit(live: list[LatencySample], live_weight: float, config: LatencyModelConfig,
               levels: tuple[float, ...], max_batch: int,
               contention_edges: tuple[float, ...]) -> tuple[LatencyModel, LatencyTable]:
    """In the child: the profile rows were sent once at start; only the live window travels per refit."""
    weights = np.concatenate([np.ones(len(_CHILD_BASE)), np.full(len(live), live_weight)])
    return fit_table(_CHILD_BASE + live, weights, config, levels, max_batch, contention_edges, len(_CHILD_BASE))


def _end_child(executor: concurrent.futures.ProcessPoolExecutor | None, pid: int | None) -> None:
    """Shut a fit child's executor down and kill the child (it may hang), whichever of the two is known."""
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # already gone


class OnlineLearner:
    """Profile rows + a live window -> a refit :class:`LatencyModel` -> a published :class:`LatencyTable`."""

    def __init__(self, base_rows: Sequence[LatencySample], levels: Sequence[float], max_batch: int,
                 contention_edges: Sequence[float] = DEFAULT_CONTENTION_EDGES,
                 config: LearnerConfig = LearnerConfig(), model_config: LatencyModelConfig = LatencyModelConfig(),
                 initial_table: LatencyTable | None = None,
                 on_table: Callable[[LatencyTable], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.levels = tuple(sorted(levels, reverse=True))
        self.max_batch = max_batch
        self.contention_edges = tuple(contention_edges)
        self.config = config
        self.model_config = model_config
        self.on_table = on_table
        self._clock = clock
        self._base = list(base_rows)
        if len(self._base) > config.max_base_rows:
            keep = np.random.default_rng(0).choice(len(self._base), config.max_base_rows, replace=False)
            self._base = [self._base[i] for i in sorted(keep)]
        self._live: collections.deque[tuple[float, LatencySample]] = collections.deque(maxlen=config.max_live)
        self._lock = threading.Lock()
        self._fit_lock = threading.Lock()
        self._seen = 0          # samples observed (monotone counter)
        self._fitted_seen = 0   # value of _seen at the last refit
        self._fitted_at = clock()
        self._drift = 0.0       # EWMA of log(measured / published mean) since the last refit
        self._exceed = 0.0      # EWMA of [measured > published safe] since the last refit
        self._drift_n = 0
        self._contention = math.nan         # time-decayed mean of the batches' contention (not reset by a refit)
        self._contention_t = -math.inf      # when it was last updated
        self._fitted_contention = math.nan  # its value at the last refit (NaN: no batch before it)
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._use_process = False
        self._child_pid: int | None = None
        self._on_spawn: Callable[[int], None] | None = None
        self._on_exit: Callable[[int], None] | None = None
        self.refits = 0
        self.dropped = 0
        """Live samples ignored because their exec ms or contention was not a finite number (exec ms > 0)."""
        self.model: LatencyModel | None = None
        self.table: LatencyTable = initial_table or LatencyTable.constant(self.levels, max_batch, per_item_ms=1.0,
                                                                          fixed_ms=1.0)
        """The latest published table (immutable; swapped whole)."""
        if len(self._base) >= config.min_rows:
            self.refit_now()

    # ----------------------------------------------------------------- hot path

    def observe(self, sample: LatencySample, now_s: float | None = None) -> None:
        """Record one live batch (O(1): a table lookup and the deque's append; maxlen evicts the oldest).

        A sample whose exec ms is not a finite positive number, or whose contention is not finite, is counted
        in ``dropped`` and otherwise ignored: in the window it would make every fit fail until it left."""
        if not (0.0 < sample.exec_ms < math.inf and -math.inf < sample.contention < math.inf):
            with self._lock:
                self.dropped += 1
            log.debug("latency learner: ignored a sample with exec_ms=%r contention=%r", sample.exec_ms,
                      sample.contention)
            return
        t = self._clock() if now_s is None else now_s
        table = self.table
        try:
            cell = (table.bucket(sample.contention), table.level_index(sample.level), sample.batch_size)
            mean, safe = table.mean(*cell), table.safe(*cell)
        except (KeyError, IndexError):  # a level or batch size the table does not have: no drift evidence
            mean = safe = 0.0
        with self._lock:
            self._live.append((t, sample))
            self._seen += 1
            c = sample.contention
            if self._contention != self._contention:  # NaN: the first batch
                self._contention, self._contention_t = c, t
                if self._fitted_contention != self._fitted_contention:  # the start-up fit saw no batch: from here
                    self._fitted_contention = c
            elif t > self._contention_t:  # c is finite: the check above dropped any other
                self._contention += -math.expm1((self._contention_t - t) / CONTENTION_TAU_S) * (c - self._contention)
                self._contention_t = t
            if mean > 0 and table is self.table:  # judged against the table the averages are about
                r = math.log(sample.exec_ms / mean)
                over = 1.0 if sample.exec_ms > safe else 0.0
                if self._drift_n == 0:
                    self._drift, self._exceed = r, over * DRIFT_EWMA_ALPHA
                else:
                    self._drift += DRIFT_EWMA_ALPHA * (r - self._drift)
                    self._exceed += DRIFT_EWMA_ALPHA * (over - self._exceed)
                self._drift_n += 1

    def refit_due(self, now_s: float | None = None) -> bool:
        """New samples, and they drifted from the published table (mean or tail), or the machine's contention
        moved since the last refit, or ``quiet_refit_s`` has passed."""
        if self.pending == 0:
            return False
        now = self._clock() if now_s is None else now_s
        if now - self._fitted_at >= self.config.quiet_refit_s:
            return True
        with self._lock:
            n, drift, exceed = self._drift_n, self._drift, self._exceed
            moved = abs(self._contention - self._fitted_contention)  # NaN (never true) before a fitted batch
        moved_far = moved > self.config.contention_trigger and now - self._fitted_at >= CONTENTION_MIN_GAP_S
        return n >= self.config.drift_samples and (abs(drift) > math.log1p(self.config.drift)
                                                   or exceed > self.config.exceed_trigger or moved_far)

    # ----------------------------------------------------------------- refit

    def live_samples(self, now_s: float | None = None) -> list[LatencySample]:
        """Live samples inside the window at ``now_s`` (drops the expired ones)."""
        now = self._clock() if now_s is None else now_s
        with self._lock:
            while self._live and now - self._live[0][0] > self.config.max_age_s:
                self._live.popleft()
            return [s for _, s in self._live]

    def training_set(self, now_s: float | None = None) -> tuple[list[LatencySample], np.ndarray]:
        """Profile rows (weight 1) + live window (weight ``live_weight``)."""
        live = self.live_samples(now_s)
        rows = self._base + live
        weights = np.concatenate([np.ones(len(self._base)), np.full(len(live), self.config.live_weight)])
        return rows, weights

    def refit_now(self, now_s: float | None = None) -> LatencyTable | None:
        """Refit and publish synchronously (tests, start-up); returns the new table, or None if too few rows.

        What the triggers measure from (samples seen, the contention average, the drift and overrun averages)
        moves to this fit only when its table is published: a fit that fails (the child died or hangs) or
        finds too few rows leaves the evidence that asked for it, and the next check asks again."""
        with self._fit_lock:
            with self._lock:
                seen, contention = self._seen, self._contention
            fitted_at = self._clock() if now_s is None else now_s
            if self._executor is not None:
                live = self.live_samples(now_s)
                if len(self._base) + len(live) < self.config.min_rows:
                    return None
                t0 = time.perf_counter()
                model, table = self._executor.submit(
                    _child_fit, live, self.config.live_weight, self.model_config, self.levels, self.max_batch,
                    self.contention_edges).result(timeout=CHILD_FIT_TIMEOUT_S)
                n_rows = len(self._base) + len(live)
            else:
                rows, weights = self.training_set(now_s)
                if len(rows) < self.config.min_rows:
                    return None
                t0 = time.perf_counter()
                model, table = fit_table(rows, weights, self.model_config, self.levels, self.max_batch,
                                         self.contention_edges, len(self._base))
                n_rows = len(rows)
            with self._lock:  # publish: readers see the old or the new table, whole
                self.model, self.table = model, table
                self._fitted_seen, self._fitted_at = seen, fitted_at
                if contention == contention:  # NaN: no batch before the fit; observe() set the base since
                    self._fitted_contention = contention
                # Batches that finished during the fit were judged against the old table: start afresh.
                self._drift, self._exceed, self._drift_n = 0.0, 0.0, 0
            self.refits += 1
            log.debug("latency refit #%d: %d rows (%d live) in %.1f ms%s", self.refits, n_rows,
                      n_rows - len(self._base), (time.perf_counter() - t0) * 1e3,
                      " (child process)" if self._executor is not None else "")
        if self.on_table is not None:
            self.on_table(table)
        return table

    @property
    def observed(self) -> int:
        """Samples observed since the start (dropped ones not counted)."""
        return self._seen

    @property
    def pending(self) -> int:
        """Samples observed since the last refit."""
        return self._seen - self._fitted_seen

    def start(self, process: bool = False, on_spawn: Callable[[int], None] | None = None,
              on_exit: Callable[[int], None] | None = None) -> "OnlineLearner":
        """Refit in a daemon thread every ``refit_interval_s`` when new samples arrived.

        ``process``: the thread hands each fit to a child process (spawned once; the profile rows are
        sent to it once) and only waits for its answer, so scikit-learn never holds this process's GIL.
        ``on_spawn(pid)`` is told the child's pid (the contention monitor must not count it: it is us),
        ``on_exit(pid)`` when it is gone. If the child dies or hangs, fits go on in the thread.
        """
        if self._thread is not None and self._thread.is_alive():
            return self
        self._use_process, self._on_spawn, self._on_exit = process, on_spawn, on_exit
        # Fresh events per start: a thread a previous stop() left behind (still spawning its child) keeps
        # its own, set, stop event and cannot mark this start as started.
        self._stop, self._started = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop, self._started),
                                        name="latency-learner", daemon=True)
        self._thread.start()
        return self

    @property
    def child_pid(self) -> int | None:
        """Pid of the child process fits run in, or None (not started, or fitting in the thread)."""
        return self._child_pid

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until the refit thread is running and, with ``process``, its child is up (or failed and
        fits fall back to the thread); False on timeout.

        A server calls this before it takes traffic: spawning the child imports scikit-learn (~1.5 s of
        CPU), and done under load it stalls the event loop's first batches by 10-27 ms each; the
        overhead allowance learned from them then turns a class's requests away as out of reach for
        ~10 s.
        """
        return self._started.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("latency learner thread still busy after %.0f s; leaving it (daemon)", STOP_JOIN_S)
        self._thread = None
        self._drop_child()

    def _drop_child(self) -> None:
        """Shut the child down (killing it if it hangs) and forget its pid; fits go on in the thread."""
        executor, pid = self._executor, self._child_pid
        self._executor, self._child_pid = None, None
        _end_child(executor, pid)
        if pid is not None and self._on_exit is not None:
            self._on_exit(pid)

    def _spawn_child(self, stop: threading.Event) -> None:
        executor = None
        try:
            executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init,
                initargs=(self._base,))
            pid = executor.submit(os.getpid).result(timeout=CHILD_START_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - fitting in the thread still works
            if not stop.is_set():
                log.exception("could not start the latency learner's child process; fitting in a thread")
            _end_child(executor, None)
            return
        if stop.is_set():  # stopped while spawning: the child is no one's
            _end_child(executor, pid)
            return
        self._executor, self._child_pid = executor, pid
        if self._on_spawn is not None:
            self._on_spawn(pid)

    def _loop(self, stop: threading.Event, started: threading.Event) -> None:
        try:
            if self._use_process:
                self._spawn_child(stop)
        finally:
            started.set()
        while not stop.wait(self.config.refit_interval_s):
            if not self.refit_due():
                continue
            try:
                self.refit_now()
            except (concurrent.futures.process.BrokenProcessPool, TimeoutError) as exc:
                log.error("latency learner's child process %s; fitting in the thread from now on",
                          "hangs" if isinstance(exc, TimeoutError) else "died")
                self._drop_child()
            except Exception:  # keep serving on the last good table
                log.exception("latency refit failed; keeping the previous table, next try in %.0f s",
                              self.config.quiet_refit_s)
                stop.wait(self.config.quiet_refit_s)  # the evidence stays due: do not fail once a second

    def __enter__(self) -> "OnlineLearner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
