"""`slonn replay`: open-loop trace replay against a live server over gRPC.

Open loop: each request is sent at its trace time whatever the server is
doing (a slow server never slows the sender). Inputs are held-out digits;
answers are checked against their labels.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from slonn.protos.client import AsyncSlonnClient, ClientSecurity, InferResult, make_request
from slonn.scheduler import aio
from slonn.scheduler.report import RequestRecord, summarize
from slonn.scheduler.trace import DEFAULT_TRACE, Arrivals, make_arrivals
from slonn.workers.digits import load_split
from slonn.workers.heap import freeze_startup_heap

TRANSPORTS = ("unary", "stream", "multi", "multi-stream")
"""One Infer call per request; one InferStream for all; "multi": one Infer call per arrival carrying
``samples_per_call`` samples ([N, features]); "multi-stream": such calls as messages of one InferStream."""
MULTI = ("multi", "multi-stream")


def call_size(transport: str, samples_per_call: int) -> int:
    """Samples one arrival sends on ``transport``: ``samples_per_call`` on the multi-sample ones, else 1."""
    return samples_per_call if transport in MULTI else 1
CLIENT_TIMEOUT = "CLIENT_TIMEOUT"
"""Status of a request the server never answered before the client's generous deadline."""


async def check_feature_count(client: AsyncSlonnClient, model: str, features: int) -> None:
    """Refuse to send rows of the wrong width before the first arrival (every request would fail), naming
    both counts; a model the server does not list, or a server without ListModels, is left to the server."""
    try:
        listed = (await client.list_models()).models
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return  # a server without ListModels (a bare gRPC stand-in): nothing to check against
        raise
    for info in listed:
        if info.name == model and info.input_shape and int(info.input_shape[-1]) != features:
            raise ValueError(f"model {model!r} takes {int(info.input_shape[-1])} features; the inputs have "
                             f"{features} (send the model's own rows with --inputs MODEL_DIR or a data file)")


def _progress(done: int, total: int, started: float, stream) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sent  {time.monotonic() - started:5.1f}s")
    stream.flush()


async def replay(target: str, model: str, arrivals: Arrivals, deadlines_ms: dict[str, float],
                 split_seed: int = 0, timeout_factor: float = 4.0, progress: bool = True,
                 transport: str = "unary", client_deadline: bool = False,
                 start_at: float | None = None, on_start=None,
                 inputs: tuple[np.ndarray, np.ndarray] | None = None, channels: int = 1,
                 security: ClientSecurity | None = None, samples_per_call: int = 8) -> list[RequestRecord]:
    """Send every arrival at its time; returns one record per request (each with a terminal status).

    ``transport``: "unary" (one Infer call per request, with a generous gRPC
    deadline) or "stream" (all requests on one InferStream: far less per-request
    CPU on both sides, for high rates on a small machine). "multi" and "multi-stream" send, per arrival,
    one call (or stream message) of ``samples_per_call`` samples: one record per sample, each with the
    call's send and answer times and its own serving facts.

    ``client_deadline`` (unary only): each call's gRPC deadline is its class
    deadline, as a latency-sensitive client would set it; the server then
    knows the true time left, ingress delay included, and an answer after it
    is DEADLINE_EXCEEDED. Otherwise the deadline is generous (class deadline x
    ``timeout_factor`` + 1 s), so every server answer, late or not, is seen.

    ``start_at``: a ``time.time()`` at which the first arrival's clock starts (several load-generator
    processes then offer their shares of the load over the same window).

    ``on_start``: called with the ``time.monotonic()`` of the first arrival's clock, once it starts (a caller
    that samples the machine meanwhile lines its samples up with the records' ``send_s``).

    ``inputs``: (x, labels) to send, sample i sending row ``i % len(x)`` (for any model: an artifact's
    held-out rows, :func:`slonn.workers.artifact.load_labelled_rows`); without them, the held-out digits of
    split ``split_seed`` (the packaged digits model's).

    ``channels``: client channels, each on a TCP connection of its own (and with "stream", a stream of its
    own); request i goes on channel ``i % channels``. A server of several frontends spreads connections,
    not requests, over them.
    ``security``: TLS and the bearer token, for a server that wants them.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r} must be one of {TRANSPORTS}")
    if channels < 1:
        raise ValueError(f"channels={channels} must be >= 1")
    if samples_per_call < 1:
        raise ValueError(f"samples_per_call={samples_per_call} must be >= 1")
    k = call_size(transport, samples_per_call)
    if inputs is None:
        split = load_split(seed=split_seed)
        x, y = split.x_test, split.y_test
    else:
        x, y = inputs
    records = [RequestRecord(i * k + j, c, deadlines_ms[c], 0.0, scheduled_s=float(t))
               for i, (c, t) in enumerate(zip(arrivals.classes, arrivals.offsets_s)) for j in range(k)]
    calls = Calls(records, x, k)
    clients = [AsyncSlonnClient(target, security, own_connection=channels > 1) for _ in range(channels)]
    try:
        for client in clients:
            await client.wait_ready()
        await check_feature_count(clients[0], model, x.shape[1])
        freeze_startup_heap()
        if start_at is not None:
            if time.time() > start_at:
                raise RuntimeError(f"replay was ready {time.time() - start_at:.1f} s after start_at")
            await asyncio.sleep(start_at - time.time())
        loop_t0 = time.monotonic()
        clock = lambda: time.monotonic() - loop_t0  # noqa: E731
        if on_start is not None:
            on_start(loop_t0)

        def answered(i: int, status: str, res=None, detail: str = "") -> None:
            """Call ``i`` (its k samples) ended with ``status``."""
            now = clock()
            out = None if res is None else res.output.reshape(k, -1)
            for j, rec in enumerate(calls.records(i)):
                rec.answer_s, rec.status, rec.detail = now, status, detail
                if res is not None:
                    s = res.samples[j]
                    rec.level, rec.batch_size, rec.late = s.level, s.batch_size, s.late
                    rec.exec_ms, rec.predicted_ms, rec.queue_ms = s.exec_ms, s.predicted_ms, s.queue_ms
                    rec.server_ms = res.server_ms
                    rec.correct = bool(int(np.argmax(out[j])) == int(y[rec.index % len(x)]))

        if transport in ("unary", "multi"):
            senders = [_unary_sender(c, model, calls, timeout_factor, answered, clock, client_deadline)
                       for c in clients]
        else:
            senders = [_stream_sender(c, model, calls, timeout_factor, answered, clock) for c in clients]
        sends = [s for s, _ in senders]

        def send(i: int) -> None:
            sends[i % channels](i)

        async def finish() -> None:
            await asyncio.gather(*(f() for _, f in senders))

        for i, offset in enumerate(arrivals.offsets_s):
            delay = offset - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            send(i)
            if progress and i % 50 == 0:
                _progress(i, len(arrivals), loop_t0, sys.stderr)
        if progress:
            _progress(len(arrivals), len(arrivals), loop_t0, sys.stderr)
            sys.stderr.write("\n")
        await finish()
    finally:
        for client in clients:
            await client.close()
    return records


class Calls:
    """The calls of a replay: call i carries samples ``i * k .. i * k + k - 1`` (their records, their rows)."""

    def __init__(self, records: list[RequestRecord], x: np.ndarray, k: int) -> None:
        self.all, self.x, self.k = records, x, k

    def records(self, i: int) -> list[RequestRecord]:
        return self.all[i * self.k:(i + 1) * self.k]

    def sent(self, i: int, now: float) -> RequestRecord:
        """Mark call ``i`` sent at ``now``; returns its first record (class and deadline are the call's)."""
        for rec in self.records(i):
            rec.send_s = now
        return self.all[i * self.k]

    def input(self, i: int) -> np.ndarray:
        """One sample: its row ([features]); k samples: their rows ([k, features])."""
        x, k = self.x, self.k
        if k == 1:
            return x[i % len(x)]
        return x[np.arange(i * k, (i + 1) * k) % len(x)]


def _unary_sender(client: AsyncSlonnClient, model: str, calls: Calls, timeout_factor: float, answered, clock,
                  client_deadline: bool):
    tasks = []

    async def one(i: int) -> None:
        rec = calls.sent(i, clock())
        if client_deadline:
            timeout = rec.deadline_ms * 1e-3
        else:  # generous: the server answers DEADLINE_EXCEEDED itself, early
            timeout = rec.deadline_ms * 1e-3 * timeout_factor + 1.0
        try:
            res = await client.infer(model, rec.slo_class, calls.input(i), request_id=str(i), timeout_s=timeout)
        except grpc.aio.AioRpcError as exc:
            # The client's own deadline firing means the server never answered.
            client_timeout = (not client_deadline and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                              and exc.details() == "Deadline Exceeded")
            answered(i, CLIENT_TIMEOUT if client_timeout else exc.code().name, detail=exc.details() or "")
        else:
            answered(i, "OK", res)

    def send(i: int) -> None:
        tasks.append(asyncio.create_task(one(i)))

    async def finish() -> None:
        await asyncio.gather(*tasks)

    return send, finish


def _stream_sender(client: AsyncSlonnClient, model: str, calls: Calls, timeout_factor: float, answered, clock):
    outbox: asyncio.Queue = asyncio.Queue()
    waiting: set[int] = set()
    all_done = asyncio.Event()
    sending = [True]

    async def requests():
        while (req := await outbox.get()) is not None:
            yield req

    call = client.stub.InferStream(requests(), metadata=client.metadata)

    async def read() -> None:
        async for msg in call:
            if msg.HasField("response"):
                i = int(msg.response.request_id)
                answered(i, "OK", InferResult.from_proto(msg.response))
            else:
                i = int(msg.error.request_id)
                answered(i, msg.error.code, detail=msg.error.message)
            waiting.discard(i)
            if not waiting and not sending[0]:
                all_done.set()

    reader = asyncio.create_task(read())

    def send(i: int) -> None:
        rec = calls.sent(i, clock())
        waiting.add(i)
        outbox.put_nowait(make_request(model, rec.slo_class, calls.input(i), request_id=str(i)))

    async def finish() -> None:
        sending[0] = False
        if waiting:
            # Whatever the server has not answered by then stays UNANSWERED in the records.
            limit = max(r.deadline_ms for r in calls.all) * 1e-3 * timeout_factor + 1.0
            try:
                await asyncio.wait_for(all_done.wait(), limit)
            except asyncio.TimeoutError:
                pass
        outbox.put_nowait(None)
        try:
            await asyncio.wait_for(reader, 10.0)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):
            reader.cancel()
        for i in waiting:
            for rec in calls.records(i):
                rec.status = CLIENT_TIMEOUT

    return send, finish


async def replay_with_corunner(target: str, model: str, arrivals: Arrivals, deadlines_ms: dict[str, float],
                               start_s: float, stop_s: float, n_procs: int = 1, usage: dict | None = None,
                               corunner_cpus: tuple[int, ...] | None = None, corunner_device: str = "cpu",
                               **kwargs) -> list[RequestRecord]:
    """:func:`replay` with a co-runner (``workers.corunner.make_burner``: CPU-burning processes, or on
    ``corunner_device`` "cuda:N" GPU-burning ones) on from ``start_s`` to ``stop_s`` (seconds from the first
    send), its processes on ``corunner_cpus`` (None: wherever this thread may run). ``usage``, if given,
    receives the CPU the co-runner got (``CpuBurner.usage``)."""
    from slonn.workers.corunner import make_burner

    # A neighbour at the default priority, whatever this process's.
    burner = make_burner(corunner_device, n_procs, nice=0, cpus=corunner_cpus)

    started = asyncio.Event()
    origin: dict = {}
    caller_on_start = kwargs.pop("on_start", None)

    def on_start(t0: float) -> None:
        origin["t0"] = t0
        started.set()
        if caller_on_start is not None:
            caller_on_start(t0)

    async def interfere() -> None:
        await started.wait()  # times count from the records' t = 0, after the replay's set-up
        t0 = origin["t0"]
        await asyncio.sleep(max(0.0, start_s - (time.monotonic() - t0)))
        await asyncio.to_thread(burner.start)  # spawning takes a moment: off the sending loop
        await asyncio.sleep(max(0.0, stop_s - (time.monotonic() - t0)))
        await asyncio.to_thread(burner.stop)

    task = asyncio.create_task(interfere())
    try:
        return await replay(target, model, arrivals, deadlines_ms, on_start=on_start, **kwargs)
    finally:
        task.cancel()
        await asyncio.to_thread(burner.stop)  # a no-op if interfere() stopped it; else the replay ended first
        if usage is not None:
            usage.update(burner.usage() or {})


def phase_summaries(records: list[RequestRecord], start_s: float, stop_s: float, duration_s: float) -> dict:
    """The summary before, during and after an interference window, by send time."""
    phases = {"before": (0.0, start_s), "during": (start_s, stop_s), "after": (stop_s, max(duration_s, stop_s))}
    out = {}
    for name, (lo, hi) in phases.items():
        rs = [r for r in records if lo <= r.send_s < hi or (name == "after" and r.send_s >= hi)]
        if rs:
            out[name] = {"window_s": [round(lo, 3), round(hi, 3)], "summary": summarize(rs, max(hi - lo, 1e-9))}
    return out


def add_arrival_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="arrival trace CSV (TIMESTAMP column)")
    p.add_argument("--start-s", type=float, default=0.0, help="window start in trace seconds")
    p.add_argument("--duration-s", type=float, default=60.0, help="window length in trace seconds")
    p.add_argument("--speedup", type=float, default=10.0, help="time compression factor")
    p.add_argument("--rate", type=float, default=None, help="target mean requests/s (overrides --speedup)")


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=TRANSPORTS, default="unary",
                   help="one call per request, one stream, or per arrival one call (multi) or stream message "
                        "(multi-stream) of --samples-per-call samples")
    p.add_argument("--samples-per-call", type=int, default=8, help="samples per call of the multi transports")
    p.add_argument("--event-loop", choices=aio.EVENT_LOOPS, default=aio.DEFAULT_EVENT_LOOP,
                   help="the load generator's event loop, and in `slonn compare` the live servers' too "
                        "(uvloop, the default where installed: less CPU per call)")
    p.add_argument("--client-deadline", choices=("class", "generous"), default="class",
                   help="unary calls' gRPC deadline: the class deadline (a latency-sensitive client; the server "
                        "sees the true time left) or generous (every late answer is still received)")


def add_inputs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", type=Path, default=None,
                   help="what to send: a model artifact directory (its held-out rows) or a data file (.npz, .csv, "
                        ".parquet; its held-out rows); default: the held-out digits (the demo model)")
    p.add_argument("--label", default="label", help="the label column of a .csv/.parquet --inputs file")


def inputs_from_args(p: argparse.ArgumentParser, args) -> tuple[np.ndarray, np.ndarray] | None:
    """The (rows, labels) ``--inputs`` names, or None (the held-out digits); a bad file exits naming it."""
    if args.inputs is None:
        return None
    from slonn.workers.artifact import load_labelled_rows

    try:
        return load_labelled_rows(args.inputs, args.label)
    except (OSError, ValueError, KeyError) as exc:
        p.error(f"--inputs {args.inputs}: {exc}")


def client_kwargs(args) -> dict:
    return {"transport": args.transport, "client_deadline": args.client_deadline == "class",
            "samples_per_call": args.samples_per_call}


def arrivals_from_args(args) -> Arrivals:
    return make_arrivals(args.trace, args.start_s, args.duration_s, args.speedup, args.rate)
