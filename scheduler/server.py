"""The grpc.aio frontend: a thin servicer (proto -> request, await, error -> status) and server lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from slonn.policy.contention import ContentionMonitor
from slonn.policy.factory import make_policy
from slonn.policy.latency_model import LatencySample
from slonn.policy.learner import CHILD_START_TIMEOUT_S, LearnerConfig, OnlineLearner
from slonn.protos import grpc_service_pb2_grpc as oip_pb_grpc
from slonn.protos import slonn_pb2 as pb
from slonn.protos import slonn_pb2_grpc as pb_grpc
from slonn.protos.tensors import TensorError, samples_from_tensor, to_tensor
from slonn.scheduler.admission import admit_samples, check_budget
from slonn.scheduler.clock import MonotonicClock
from slonn.scheduler.config import ServerConfig
from slonn.scheduler.core import Batch, Scheduler
from slonn.scheduler.dispatcher import Completion, Dispatcher
from slonn.scheduler.driver import ANSWER_MARGIN_MS, caller_budget
from slonn.scheduler.errors import DeadlineUnreachable, InvalidArgument, RequestError, Unavailable
from slonn.scheduler.grpc_status import grpc_status
from slonn.scheduler.streams import answer_in_completion_order
from slonn.scheduler.latency import LearnedLatency, NodeLearners, base_rows, node_rows, warmup_profile
from slonn.scheduler.metrics import ServerMetrics
from slonn.scheduler import oip
from slonn.scheduler.oip import count_error, outputs, summary_parameters
from slonn.scheduler.oip_grpc import SERVICE_NAME as OIP_SERVICE_NAME
from slonn.scheduler.oip_grpc import OipServicer
from slonn.scheduler.oip_http import OipHttp
from slonn.scheduler import security
from slonn.scheduler.reflection import enable_reflection
from slonn.workers.artifact import ModelManifest
from slonn.workers.contract import RangeCheck
from slonn.workers.heap import freeze_startup_heap
from slonn.workers.pool import InProcessPool, ProcessPool, WorkerPool
from slonn.workers.process import WorkerSpec, model_name

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
# Refit once a second: a refit holds the GIL for tens of ms, and the event loop shares it.
LEARNER = LearnerConfig(refit_interval_s=1.0)
HEALTH_INTERVAL_S = 1.0
"""How often gRPC health is brought in line with the readiness checks (the pool can break after start)."""


class InferenceServicer(pb_grpc.InferenceServicer):
    """Maps the protocol onto the Dispatcher; every request error becomes a status through ``grpc_status``."""

    def __init__(self, dispatcher: Dispatcher, server: "SlonnServer") -> None:
        self.dispatcher = dispatcher
        self.server = server
        self._ids = itertools.count()
        self.calls = 0
        """RPCs seen so far (shutdown waits for their arrival to stop before closing the port)."""

    async def _answer(self, request: pb.InferRequest, time_remaining_s: float | None) -> pb.InferResponse:
        clock = self.dispatcher.clock  # the timeline queue_ms is measured on
        received_s = clock.now()
        request_id = request.request_id or f"slonn-{next(self._ids)}"
        manifest = self.server.manifests.get(request.model)
        if not request.model:
            raise InvalidArgument("model: must be set; see ListModels for the served models")
        if manifest is None:
            self.server.check_loaded(request.model)
            # Let the scheduler produce the NOT_FOUND with the list of models.
            self.dispatcher.scheduler.make_request(request.model, request.slo_class, 0.0)
        if not request.slo_class:
            raise InvalidArgument(f"slo_class: must be set; one of {sorted(self.server.cfg.classes)}")
        budget = check_budget(request.latency_budget_ms)
        features, (max_samples, limit) = manifest.arch.in_features, self.server.sample_limit
        if not request.HasField("input"):
            raise InvalidArgument(f"input: missing; expected a FLOAT32 tensor of shape [{features}] "
                                  f"(or [N, {features}] with 1 <= N <= {max_samples})")
        try:
            x = samples_from_tensor(request.input, "input", features, max_samples, limit)
        except TensorError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(x) > 1:
            return await self._answer_many(request, request_id, x, time_remaining_s, received_s)
        x = x[0]
        budget, hard = caller_budget(budget, None if time_remaining_s is None else time_remaining_s * 1e3)
        far = self.server.range_checks[request.model].far_out(x)
        if far:  # served all the same, but counted and flagged: a client's scaling is the usual cause
            self.server.metrics.out_of_range.labels(request.model).inc()
        work = self.dispatcher.infer(request.model, request.slo_class, x, budget or None, hard)
        if time_remaining_s is None:
            done = await work
        else:
            # Whatever the class says about late answers, the caller stops listening at its gRPC
            # deadline: answer before it, so no call ends without a word from the server.
            # (asyncio.timeout, not wait_for: no extra task per request on the hot path.)
            try:
                async with asyncio.timeout(max(time_remaining_s - ANSWER_MARGIN_MS * 1e-3, 0.0)):
                    done = await work
            except TimeoutError:
                raise DeadlineUnreachable("not served before the call's gRPC deadline") from None
        return self._response(request_id, request.input, done, (clock.now() - received_s) * 1e3, far)

    async def _answer_many(self, request: pb.InferRequest, request_id: str, x: np.ndarray,
                           time_remaining_s: float | None, received_s: float) -> pb.InferResponse:
        """N > 1 samples: admitted together with one deadline (Dispatcher.infer_many), answered in input order;
        any sample's failure fails the call, counted once per sample."""
        far = self.server.range_checks[request.model].far_out_per_sample(x)
        flagged = int(np.count_nonzero(far))
        if flagged:
            self.server.metrics.out_of_range.labels(request.model).inc(flagged)
        try:
            done = await admit_samples(self.dispatcher, request.model, request.slo_class, x,
                                       request.latency_budget_ms, time_remaining_s)
        except RequestError as exc:
            srv = self.server
            count_error(srv.metrics, srv.manifests, srv.cfg.classes, request.model, request.slo_class, exc, len(x))
            raise
        return self._response_many(request_id, done, (self.dispatcher.clock.now() - received_s) * 1e3, far)

    @staticmethod
    def _response(request_id: str, input_tensor: pb.Tensor, done: Completion, server_ms: float,
                  out_of_range: int = 0) -> pb.InferResponse:
        out = done.output if len(input_tensor.shape) == 1 else done.output[None, :]
        return pb.InferResponse(
            output=to_tensor(out), request_id=request_id, level=done.level,
            expected_accuracy=done.expected_accuracy, queue_ms=done.queue_ms, exec_ms=done.exec_ms,
            predicted_ms=done.predicted_ms, batch_size=done.batch_size, late=done.late, kernel=done.kernel,
            server_ms=server_ms, out_of_range_features=out_of_range)

    @staticmethod
    def _response_many(request_id: str, done: list[Completion], server_ms: float,
                       out_of_range: np.ndarray) -> pb.InferResponse:
        """Output [N, classes]; ``samples``: each sample's facts in input order; the scalar fields: the worst
        case over the N (as the Open Inference Protocol's response parameters), out-of-range counts summed."""
        return pb.InferResponse(
            output=to_tensor(outputs(done)), request_id=request_id, **summary_parameters(done, server_ms),
            out_of_range_features=int(out_of_range.sum()),
            samples=[pb.SampleResult(level=c.level, expected_accuracy=c.expected_accuracy, queue_ms=c.queue_ms,
                                     exec_ms=c.exec_ms, predicted_ms=c.predicted_ms, batch_size=c.batch_size,
                                     late=c.late, kernel=c.kernel, out_of_range_features=int(f))
                     for c, f in zip(done, out_of_range)])

    def _count(self, request: pb.InferRequest, exc: RequestError) -> None:
        """Count an error raised before the dispatcher saw the request (a bad tensor, an unknown model)."""
        srv = self.server
        count_error(srv.metrics, srv.known_models, srv.cfg.classes, request.model, request.slo_class, exc)

    async def Infer(self, request, context):
        self.calls += 1
        try:
            return await self._answer(request, context.time_remaining())
        except RequestError as exc:
            self._count(request, exc)
            await context.abort(grpc_status(exc), str(exc))

    async def InferStream(self, request_iterator, context):
        """Answers in completion order; a failed request yields an error message and the stream goes on. A
        request_id must be unique among the stream's requests in flight: a duplicate is refused in-stream
        (INVALID_ARGUMENT), since two answers with one id could not be told apart."""
        self.calls += 1
        outstanding: set[str] = set()

        async def one(request: pb.InferRequest) -> pb.StreamResponse:
            request_id = request.request_id or f"slonn-{next(self._ids)}"
            request.request_id = request_id
            try:
                if request_id in outstanding:
                    raise InvalidArgument(f"request_id: {request_id!r} is already in flight on this stream; "
                                          f"use a new id per request")
                outstanding.add(request_id)
                try:
                    return pb.StreamResponse(response=await self._answer(request, None))
                finally:
                    outstanding.discard(request_id)
            except RequestError as exc:
                self._count(request, exc)
                return pb.StreamResponse(error=pb.RequestError(
                    request_id=request_id, code=grpc_status(exc).name, message=str(exc)))

        async for answer in answer_in_completion_order(request_iterator, one):
            yield answer

    async def ListModels(self, request, context):
        resp = pb.ListModelsResponse()
        for m in self.server.manifests.values():
            resp.models.append(model_info(m))
        for c in self.server.cfg.classes.values():
            resp.slo_classes.append(pb.SLOClassInfo(
                name=c.name, latency_ms=c.latency_ms, min_accuracy=c.min_accuracy, priority=c.priority,
                max_queue=c.max_queue, on_late=c.on_late, mode=c.mode, max_accuracy_drop=c.max_accuracy_drop))
        return resp


BYTES_PER_VALUE = 32
"""What one input value may take in a message: 4 in a raw tensor, up to ~25 as JSON text (HTTP)."""


def message_limit(cfg: ServerConfig, manifests: dict[str, ModelManifest]) -> int:
    """The largest message the server takes or sends: ``cfg.max_message_bytes``, or with 0 gRPC's default of
    4 MiB raised to fit a full batch (``max_batch`` samples) of the widest model's inputs."""
    if cfg.max_message_bytes:
        return cfg.max_message_bytes
    widest = max((m.arch.in_features for m in manifests.values()), default=0)
    return max(4 << 20, BYTES_PER_VALUE * cfg.max_batch * widest)


def ray_monitor() -> ContentionMonitor:
    """The contention sampler each Ray actor runs on its own node (sampled faster than the frontend's: an
    idle actor is asked for it every half second)."""
    return ContentionMonitor(interval_s=0.1, window=5, probe=False)


def make_pool(cfg: ServerConfig, spec: WorkerSpec, monitor: ContentionMonitor) -> WorkerPool:
    """The worker pool ``cfg`` asks for (RuntimeError naming the extra when pool "ray" lacks Ray)."""
    if cfg.in_process:
        return InProcessPool(spec, cfg.workers)
    if cfg.pool == "ray":
        from slonn.workers.raypool import RayOptions, RayPool, import_ray

        import_ray()
        return RayPool(spec, cfg.workers, RayOptions(address=cfg.ray_address, num_cpus=cfg.ray_num_cpus,
                                                     num_gpus=cfg.ray_num_gpus, strategy=cfg.ray_strategy),
                       monitor_factory=ray_monitor)
    return ProcessPool(spec, cfg.workers, on_spawn=monitor.add_own_pid)


def model_info(m: ModelManifest) -> pb.ModelInfo:
    """A model's shape, levels, input contract and label names as the protocol states them."""
    c = m.contract
    return pb.ModelInfo(
        name=m.name, input_shape=[m.arch.in_features], output_shape=[m.arch.out_features],
        hidden=list(m.arch.hidden), levels=[pb.LevelInfo(level=lv, accuracy=m.accuracy[lv]) for lv in m.levels],
        input=pb.InputContract(features=c.features, feature_names=list(c.names), dtype=pb.FLOAT32, min=list(c.low),
                               max=list(c.high), preprocessing=c.preprocessing),
        labels=list(m.labels), activation=m.arch.activation)


@dataclass
class SlonnServer:
    """Pool + dispatcher + grpc.aio server, started and stopped together."""

    cfg: ServerConfig
    _health_task: asyncio.Task | None = field(default=None, init=False, repr=False)

    async def start(self) -> int:
        """Start workers, profile, bind; returns the bound port."""
        cfg = self.cfg
        # Read the certificates and the token first: a bad file fails the start before any worker is spawned.
        sec = security.load(cfg.auth_token_file, cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        self.token, credentials, self.ssl_context, tls = sec.token, sec.grpc_credentials, sec.ssl_context, sec.tls
        spec = WorkerSpec(tuple(cfg.model_dirs), cfg.device, cfg.threads, precision=cfg.precision,
                          worker_spin_ms=cfg.worker_spin_ms, worker_nice=cfg.worker_nice,
                          worker_cpus=cfg.worker_cpus)
        # The monitor runs here, not in the workers: one signal per machine, and the workers'
        # own threads are excluded from it (they are not contention, they are us).
        self.monitor = ContentionMonitor(interval_s=0.1, window=5)  # 0.5 s of smoothing, half the samples
        if cfg.frontend_of is not None:  # the other frontends and their workers are this server too
            self.monitor.add_own_tree(cfg.frontend_of)
        self.pool = make_pool(cfg, spec, self.monitor)
        await self.pool.start()
        # Ray workers measure their own nodes' contention and report it with each result; the planner
        # then reads the node the next batch goes to (RayPool.contention). Otherwise: this machine's.
        self.contention = getattr(self.pool, "contention", lambda: self.monitor.value)
        if self.pool.gpu_uuid and cfg.pool != "ray":  # workers on a GPU: a neighbour on it is contention too
            self.monitor.watch_gpu(self.pool.gpu_uuid)
        self.monitor.start()
        self.manifests = dict(self.pool.manifests)
        self.failed = dict(self.pool.failed)
        """Models the workers could not load: not served, NOT_SERVING in health, their calls UNAVAILABLE."""
        for name, error in self.failed.items():
            log.error("model %s is not served: its workers could not load it: %s", name, error)
        self.range_checks = {name: RangeCheck(m.contract) for name, m in self.manifests.items()}
        self._learner_config = replace(LEARNER, exceed_trigger=cfg.refit_overrun_share,
                                       contention_trigger=cfg.refit_contention_shift)
        self._seed: dict[str, tuple[list[LatencySample], str | None]] = {}
        """model -> its base rows and the node they were measured on (None: unknown), for nodes' learners."""
        self.latency = LearnedLatency({
            name: OnlineLearner(await self._base_rows(manifest), manifest.levels, cfg.max_batch,
                                config=self._learner_config)
            for name, manifest in self.manifests.items()})
        self.node_learners = NodeLearners(self.latency, self.pool, self._node_learners)
        self._nodes_task: asyncio.Task | None = None
        if self.pool.per_node:  # a latency model per (model, node), seeded by the node's kernel table
            for node in list(self.pool.node_tables):
                await self.node_learners.add(node)
            self.pool.on_node = self.node_learners.node_up
            for node in list(self.pool.node_tables):  # up while the others' learners were fitted
                self.node_learners.node_up(node)
            self._nodes_task = asyncio.create_task(self.node_learners.run())  # nodes gone for good, or back
        self.latency.start(process=True, on_spawn=self.monitor.add_own_pid, on_exit=self.monitor.remove_own_pid)
        # No traffic before the learners' child processes are up: their start-up (scikit-learn imports)
        # under load inflates the first batches' overhead, which admission then acts on.
        # (A little longer than the learner's own spawn timeout, after which it fits in a thread instead.)
        if not await asyncio.to_thread(self.latency.wait_started, CHILD_START_TIMEOUT_S + 5.0):
            log.warning("latency learners not started after %.0f s; serving anyway", CHILD_START_TIMEOUT_S + 5.0)
        accuracy = {n: tuple(m.accuracy[lv] for lv in m.levels) for n, m in self.manifests.items()}
        scheduler = Scheduler(accuracy, cfg.classes, make_policy(cfg.policy))
        self.metrics = ServerMetrics()
        # A Ray call costs a round trip before any batch has taught the dispatcher its overhead.
        overhead_ms = max(cfg.overhead_ms, getattr(self.pool, "overhead_floor_ms", lambda: 0.0)())
        self.dispatcher = Dispatcher(scheduler, self.pool, MonotonicClock(), self.latency, accuracy, cfg.max_batch,
                                     overhead_ms, cfg.max_inflight, contention=self.contention,
                                     workers=cfg.workers, metrics=self.metrics,
                                     # the event-loop thread's CPU: the planner learns the frontend's cost
                                     frontend_cpu=time.thread_time,
                                     # a call per batch only when its line is logged
                                     on_batch=self._log_batch if log.isEnabledFor(logging.DEBUG) else None)
        self.dispatcher.start()
        self.metrics.watch_queues(scheduler.queue_lengths)
        if cfg.metrics_port:
            self.metrics.serve(cfg.metrics_port, cfg.host)
        self._stats_task = asyncio.create_task(self._log_stats()) if cfg.stats_interval_s else None
        self.max_message_bytes = message_limit(cfg, self.manifests)
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes)]
        if cfg.max_pending:
            # Shed in gRPC core, before the event loop: under overload the loop is the bottleneck, and
            # every call it takes up only to reject costs as much CPU as one it serves.
            options += [("grpc.server.max_pending_requests", cfg.max_pending),
                        ("grpc.server.max_pending_requests_hard_limit", 2 * cfg.max_pending)]
        # Beyond max_inflight, gRPC rejects RESOURCE_EXHAUSTED before our handler runs: the cheapest
        # reject under overload (still after the call has reached the Python server's loop).
        if cfg.frontend_of is not None:  # one port for every frontend: the kernel spreads the connections
            options.append(("grpc.so_reuseport", 1))
        interceptors = ([security.TokenInterceptor(self.token, self.metrics.unauthenticated.labels("grpc").inc)]
                        if self.token else [])
        self.grpc = grpc.aio.server(options=options, maximum_concurrent_rpcs=cfg.max_inflight,
                                    interceptors=interceptors)
        self.servicer = InferenceServicer(self.dispatcher, self)
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self.grpc)
        # The Open Inference Protocol on the same port and the same dispatcher.
        self.oip = OipServicer(self)
        oip_pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.oip, self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection((SERVICE_NAME, OIP_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                          self.grpc)
        address = f"{cfg.host}:{cfg.port}"
        self.port = (self.grpc.add_secure_port(address, credentials) if credentials
                     else self.grpc.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"could not bind {cfg.host}:{cfg.port}")
        await self.grpc.start()
        self.http: OipHttp | None = None
        if cfg.http_port is not None:
            self.http = OipHttp(self)
            self.http_port = await self.http.start(cfg.host, cfg.http_port, self.ssl_context,
                                                   reuse_port=cfg.frontend_of is not None)
            log.info("Open Inference Protocol over HTTP%s on %s:%d", "S" if self.ssl_context else "", cfg.host,
                     self.http_port)
        freeze_startup_heap()
        self._health: dict[str, int] = {}
        await self._refresh_health()
        self._health_task = asyncio.create_task(self._watch_health())
        log.info("serving %s on %s:%d (policy %s, %d worker(s) on %s, %s; %s%s)", sorted(self.manifests), cfg.host,
                 self.port, cfg.policy, cfg.workers, self.pool.device, cfg.precision,
                 "mutual TLS" if cfg.tls_client_ca else "TLS" if tls else "plaintext",
                 ", bearer token" if self.token else "")
        if self.token and not tls:
            log.warning("--auth-token-file without --tls-cert: the token crosses the network in clear text")
        return self.port

    async def _refresh_health(self) -> None:
        """Set each gRPC health service's status to what the readiness checks say now, where it changed."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self._health_names():
            up = self.model_ready(service) if service in self.known_models else (service != "" or self.ready())
            status = serving if up else not_serving
            if self._health.get(service) != status:
                if service in self._health:
                    log.warning("health of %s: %s", repr(service) if service else "the server",
                                health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                self._health[service] = status
                await self.health.set(service, status)

    async def _watch_health(self) -> None:
        """Health follows the pool: NOT_SERVING once no worker is left and none can start (and back)."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self._refresh_health()

    def _health_names(self) -> tuple[str, ...]:
        """What gRPC health answers for: the server (""), both protocols' services and each model by name."""
        return ("", SERVICE_NAME, OIP_SERVICE_NAME, *sorted(self.known_models))

    @property
    def known_models(self) -> set[str]:
        """The models the server was started with: served, or failed to load (metrics label them by name)."""
        return set(self.manifests) | set(self.failed)

    def check_loaded(self, model: str) -> None:
        """Raise UNAVAILABLE, naming the model and why, if the workers could not load ``model``."""
        if model in self.failed:
            raise Unavailable(f"model {model!r} is not available: its workers could not load it "
                              f"({self.failed[model]}); served models: {sorted(self.manifests)}")

    def find_model(self, name: str, version: str = "") -> ModelManifest:
        """The served model ``name`` (Open Inference Protocol lookup): UNAVAILABLE if it failed to load,
        NOT_FOUND if the server has no such model."""
        self.check_loaded(name)
        return oip.find_model(self.manifests, name, version)

    @property
    def sample_limit(self) -> tuple[int, str]:
        """The most samples one slonn.v1 request may carry, and the setting that says so: the max batch, or
        max_inflight where that is smaller (such a request could never be admitted)."""
        cfg = self.cfg
        return (cfg.max_batch, "max_batch") if cfg.max_batch <= cfg.max_inflight else (cfg.max_inflight,
                                                                                        "max_inflight")

    @property
    def default_class(self) -> str:
        """The SLO class of an Open Inference Protocol request that names none."""
        return self.cfg.default_class or next(iter(self.cfg.classes))

    def ready(self) -> bool:
        """Admitting requests, with a worker running or able to start, and every model loaded (as Triton's
        ServerReady: a server missing one of its models is not ready, though it serves the others)."""
        return self._up() and not self.failed

    def model_ready(self, name: str) -> bool:
        """``name`` is served and the server is admitting requests."""
        return self._up() and name in self.manifests

    def _up(self) -> bool:
        return self.dispatcher.accepting and not self.pool.broken()

    async def _base_rows(self, manifest: ModelManifest) -> list[LatencySample]:
        """The model's saved profile if `slonn profile` wrote one, else a quick warm-up sweep on the workers."""
        directory = next(d for d in self.cfg.model_dirs if model_name(d) == manifest.name)
        # Judged against the niceness the workers got: without CAP_SYS_NICE it is not the one asked for.
        rows = base_rows(directory, self.cfg.precision, self.pool.niceness, on_gpu=bool(self.pool.gpu_uuid))
        if rows:
            log.info("%s: latency model from %d profile rows in %s", manifest.name, len(rows), directory)
            # Profiled on this machine: a node's rows are scaled against this node's kernel table, if it has one.
            self._seed[manifest.name] = (rows, self.pool.home_node() if self.pool.per_node else "")
            return rows
        nodes: list[str] = []
        on = None
        if self.pool.per_node:  # one node's rows, so that they scale to the others' by its kernel table
            home, tables = self.pool.home_node(), self.pool.node_tables
            on = home if home in tables else next(iter(tables), None)
        rows = await warmup_profile(self.pool, manifest, self.cfg.max_batch, contention=self.contention, nodes=nodes,
                                    node=on)
        log.info("%s: no saved profile; latency model from a %d-batch warm-up sweep", manifest.name, len(rows))
        self._seed[manifest.name] = (rows, Counter(nodes).most_common(1)[0][0] if nodes else None)
        return rows

    def _node_learners(self, node: str, tables: dict[str, dict]) -> dict[str, OnlineLearner]:
        """``node``'s learners (fitted here: NodeLearners calls it off the event loop): each model's base rows
        scaled by the node's start-up kernel table (of ``tables``, a copy of the pool's) against the table of
        the node the rows were measured on."""
        out = {}
        for name, manifest in self.manifests.items():
            rows, measured_on = self._seed[name]
            if measured_on in tables and name in tables[measured_on]:
                reference = [tables[measured_on][name]]
            else:  # measured elsewhere (a frontend without workers): the nodes' median stands for it
                reference = [t[name] for t in tables.values() if name in t]
            out[name] = OnlineLearner(node_rows(rows, tables[node].get(name, {}), reference), manifest.levels,
                                      self.cfg.max_batch, config=self._learner_config)
        return out

    @staticmethod
    def _log_batch(batch: Batch, exec_ms: float, contention: float) -> None:
        plan = batch.plan
        log.debug("batch %s n=%d level=%g predicted=%.2f measured=%.2f ms contention=%.2f: %s", batch.model,
                  len(batch.requests), plan.level, plan.predicted_ms, exec_ms, contention, plan.reason)

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.stats_interval_s)
            d = self.dispatcher
            tables = {m: round(d.latency.table(m).safe(d.latency.table(m).bucket(self.monitor.value), -1, 1), 2)
                      for m in self.manifests}
            log.info("stats: %s; inflight %d; queued %d; contention %.2f; overhead %.2f ms; safe ms at fastest "
                     "level, batch 1: %s", self.metrics.summary(), d.inflight, d.scheduler.pending(),
                     self.monitor.value, d.overhead_ms, tables)

    async def stop(self) -> int:
        """Graceful: stop admitting, drain for cfg.grace_s, answer the rest UNAVAILABLE; returns that count."""
        if self._health_task is not None:
            self._health_task.cancel()
        for service in self._health_names():
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._stats_task:
            self._stats_task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.grace_s
        unanswered = await self.dispatcher.drain(self.cfg.grace_s)
        # Lame duck: calls already on their way are answered UNAVAILABLE by us until they stop
        # coming; closing the port at once would have gRPC cancel the ones not yet handed to us.
        seen = -1
        while seen != self.servicer.calls and loop.time() < deadline:
            seen = self.servicer.calls
            await asyncio.sleep(0.1)
        await self.grpc.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        self.metrics.close()
        await self.pool.close()
        if self._nodes_task is not None:
            self._nodes_task.cancel()
        await self.node_learners.stop()  # no node's learners start after latency.stop has looked
        await asyncio.to_thread(self.latency.stop)  # joins the learner threads: off the loop
        self.monitor.stop()
        return unanswered
