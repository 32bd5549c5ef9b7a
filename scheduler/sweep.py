"""Rate sweep: open-loop Poisson load at increasing rates against a live server, until it saturates.

In the spirit of perf_analyzer: per rate it reports the rate achieved, p50/p99 latency, the share answered
within the deadline, and the CPU the server process, its children (workers, the learner's fit process) and
this load generator spent per request. Every request carries an input of its own (a held-out digit with
its own small noise), so no cache or repeated buffer flatters the figures.

The transports are :func:`slonn.scheduler.replay.replay`'s. On the multi-sample ones ("multi", "multi-stream")
a call carries ``samples_per_call`` samples: rates, latencies and CPU are per sample (calls arrive at
rate / samples_per_call, Poisson), and the calls per second are reported beside them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from slonn.scheduler.replay import TRANSPORTS, call_size, replay
from slonn.scheduler.report import RequestRecord, summarize
from slonn.scheduler.serverproc import CpuMeter
from slonn.scheduler.trace import poisson_arrivals

SWEEP_CLASS = "sweep"
"""The one SLO class a sweep's requests carry (its server is started with a classes file naming it)."""


def labelled_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct digit-shaped inputs and their labels: held-out digits, each with its own small noise
    (more rows than the held-out set still repeat none)."""
    from slonn.workers.digits import load_split

    split = load_split(seed=0)
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(split.x_test)
    rows = split.x_test[idx]
    return (rows + rng.normal(0.0, 0.01, rows.shape)).astype(np.float32), split.y_test[idx]


def distinct_inputs(n: int, seed: int = 0) -> np.ndarray:
    """The inputs of :func:`labelled_inputs`, without labels."""
    return labelled_inputs(n, seed)[0]


@dataclass(frozen=True)
class SaturationRule:
    """A rate is saturated when the server answers OK less than ``min_achieved_share`` of what was offered,
    or its p99 latency is over the deadline; the sweep stops after ``consecutive`` saturated rates in a row
    (one may be noise on a shared machine)."""

    min_achieved_share: float = 0.95
    consecutive: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.min_achieved_share <= 1.0 or self.consecutive < 1:
            raise ValueError(f"min_achieved_share={self.min_achieved_share} must be in (0, 1] and "
                             f"consecutive={self.consecutive} >= 1")

    def reasons(self, point: dict) -> list[str]:
        """Why ``point`` (a :func:`rate_point`) is saturated; empty if it is not."""
        out = []
        if point["achieved_per_s"] < self.min_achieved_share * point["offered_per_s"]:
            out.append(f"achieved {point['achieved_per_s']:g}/s < {self.min_achieved_share:g} x offered "
                       f"{point['offered_per_s']:g}/s")
        if point["p99_ms"] is None:
            out.append("no request answered OK")
        elif point["p99_ms"] > point["deadline_ms"]:
            out.append(f"p99 {point['p99_ms']:g} ms > deadline {point['deadline_ms']:g} ms")
        return out

    def should_stop(self, points: list[dict]) -> bool:
        """The last ``consecutive`` points are all saturated."""
        tail = points[-self.consecutive:]
        return len(tail) == self.consecutive and all(p["saturated"] for p in tail)


def rate_point(records: list[RequestRecord], rate: float, transport: str, duration_s: float,
               deadline_ms: float, cpu: dict[str, float | None], client_cpu_s: float,
               samples_per_call: int = 1) -> dict:
    """One row of the sweep from the records (one per sample) of one rate's window.

    Rates and CPU are per sample; ``samples_per_call`` > 1 adds the calls per second (offered and achieved:
    a call is answered OK as a whole or not at all) and the server's CPU per call.

    ``offered_per_s`` counts the arrivals actually drawn (a Poisson draw is off the nominal rate by a few
    percent at a few hundred requests); ``achieved_per_s`` is OK answers over the window, which runs on past
    the load's end until the last answer when that comes more than a deadline later (a server that falls
    behind drains its backlog then; one that keeps up answers the last arrivals within a deadline, and
    their latency alone does not count against its rate).
    """
    summary = summarize(records, duration_s)["all"]
    n = len(records)
    answered = [r.answer_s for r in records if r.status == "OK"]
    window_s = max([duration_s, *(t - deadline_ms * 1e-3 for t in answered)])
    k = samples_per_call
    server_ms = cpu.get("server_cpu_ms")
    return {
        "transport": transport, "rate_per_s": rate, "sent": n, "deadline_ms": deadline_ms,
        "samples_per_call": k,
        "offered_per_s": round(n / duration_s, 2),
        "achieved_per_s": round(len(answered) / window_s, 2),
        "offered_calls_per_s": round(n / k / duration_s, 2),
        "achieved_calls_per_s": round(len(answered) / k / window_s, 2),
        "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
        "within_deadline": round(summary["within_deadline"] / n, 4) if n else None,
        "mean_batch": summary["mean_batch"], "served_accuracy": summary["served_accuracy"],
        "errors": summary["errors"], "unanswered": summary["unanswered"],
        **cpu,
        "server_cpu_ms_per_call": None if server_ms is None else round(server_ms * k, 4),
        "client_cpu_ms": round(client_cpu_s / n * 1e3, 4) if n else None,
    }


async def sweep_transport(target: str, model: str, transport: str, rates: list[float], duration_s: float,
                          deadline_ms: float, meter: CpuMeter | None = None, rule: SaturationRule = SaturationRule(),
                          warmup_s: float = 2.0, seed: int = 0, client_deadline: bool = False,
                          on_point=None, channels: int = 1, security=None, samples_per_call: int = 8) -> list[dict]:
    """Sweep ``rates`` (samples/s, ascending) on one transport; stops early when ``rule`` says so.

    A warm-up at the first rate runs first and is not reported. ``meter`` (the server's process) gives the
    CPU columns; without it they are None. ``on_point`` is called with each row as it is measured. ``channels``:
    client connections the load is spread over (:func:`replay`). ``security``: a
    :class:`~slonn.protos.client.ClientSecurity` for a server behind TLS or a token. ``samples_per_call``: the
    samples of one call on the multi-sample transports (ignored on the others).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r} must be one of {TRANSPORTS}")
    if not rates or any(r <= 0 for r in rates) or duration_s <= 0:
        raise ValueError(f"rates={rates} must be > 0 and duration_s={duration_s} > 0")
    deadlines = {SWEEP_CLASS: deadline_ms}
    k = call_size(transport, samples_per_call)
    points: list[dict] = []
    for step, rate in enumerate([rates[0], *rates]):
        warmup = step == 0
        if warmup and warmup_s <= 0:
            continue
        window = warmup_s if warmup else duration_s
        arrivals = poisson_arrivals(rate / k, window, {SWEEP_CLASS: 1.0}, seed=seed + step)  # calls
        inputs = labelled_inputs(len(arrivals) * k, seed=seed + 1000 * (step + 1))
        before = meter.read() if meter else None
        c0 = time.process_time()
        records = await replay(target, model, arrivals, deadlines, progress=False, transport=transport,
                               client_deadline=client_deadline, inputs=inputs, channels=channels,
                               security=security, samples_per_call=k)
        client_s = time.process_time() - c0
        if warmup:
            continue
        cpu = meter.since(before).per_request_ms(len(records)) if meter else {"server_cpu_ms": None,
                                                                                "worker_cpu_ms": None}
        point = rate_point(records, rate, transport, window, deadline_ms, cpu, client_s, k)
        why = rule.reasons(point)
        point["saturated"], point["saturation"] = bool(why), why
        points.append(point)
        if on_point is not None:
            on_point(point)
        if rule.should_stop(points):
            break
    return points


def max_sustained(points: list[dict]) -> float | None:
    """The highest rate before the first saturated one (None if the first was already saturated)."""
    best = None
    for p in points:
        if p["saturated"]:
            break
        best = p["rate_per_s"]
    return best


COLUMNS = (("transport", "transport", "{}"), ("n/call", "samples_per_call", "{}"), ("rate/s", "rate_per_s", "{:g}"),
           ("offered", "offered_per_s", "{:g}"), ("achieved", "achieved_per_s", "{:g}"),
           ("calls/s", "achieved_calls_per_s", "{:g}"), ("p50 ms", "p50_ms", "{:.1f}"), ("p99 ms", "p99_ms", "{:.1f}"),
           ("in SLO", "within_deadline", "{:.1%}"), ("batch", "mean_batch", "{:.1f}"),
           ("srv ms/smp", "server_cpu_ms", "{:.3f}"), ("srv ms/call", "server_cpu_ms_per_call", "{:.3f}"),
           ("wrk ms/smp", "worker_cpu_ms", "{:.3f}"), ("gen ms/smp", "client_cpu_ms", "{:.3f}"),
           ("sat", "saturated", "{}"))


def format_sweep_table(points: list[dict]) -> str:
    """The rows as an aligned text table (rates in samples/s; CPU columns in ms of CPU per sample, and the
    server's per call)."""
    head = [c[0] for c in COLUMNS]
    rows = [[("-" if p.get(key) is None else fmt.format(p[key])) for _, key, fmt in COLUMNS] for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
