"""Server and SLO-class configuration: frozen dataclasses built once, validated with messages that name the fix."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from slonn.policy.names import Mode, OnLate, PolicyName
from slonn.precision import DEFAULT_PRECISION, low_precision_of

POOLS = ("process", "ray")
"""Where the workers run: processes on this machine, or Ray actors across a cluster (``pip install slonn[ray]``)."""


@dataclass(frozen=True)
class SLOClassConfig:
    """One service level: how fast, how accurate, how important."""

    name: str
    """Class name clients put in InferRequest.slo_class."""
    latency_ms: float
    """Deadline from arrival, in ms (> 0)."""
    min_accuracy: float = 0.0
    """Floor on the chosen level's measured held-out accuracy, in [0, 1]."""
    priority: int = 1
    """Tie-break between equal deadlines: smaller runs first (>= 0)."""
    max_queue: int = 1024
    """Queued requests beyond this are rejected RESOURCE_EXHAUSTED at once (> 0)."""
    on_late: OnLate = OnLate.REJECT
    """"reject": answer DEADLINE_EXCEEDED as soon as the deadline is out of reach (or when the batch finishes
    after it: never a late result); "serve": answer late, flagged
    (given as either string, stored as the member)."""
    mode: Mode = Mode.LATENCY
    """"latency": meet the deadline at the highest accuracy; "accuracy": meet the floor at the lowest latency."""
    max_accuracy_drop: float = 1.0
    """Floor relative to each model's dense (level 1.0) accuracy: no level more than this below it, in [0, 1]
    (1 = none). With ``min_accuracy`` as well, both floors hold."""
    overrides: tuple[tuple[str, "SLOClassConfig"], ...] = ()
    """Per model name, this class's settings for that model (the classes file's ``[class.model.NAME]``)."""

    def for_model(self, model: str, dense_accuracy: float) -> "SLOClassConfig":
        """The class as it applies to ``model``: its override if any, with ``min_accuracy`` raised to the
        relative floor ``dense_accuracy - max_accuracy_drop``."""
        base = self
        for name, override in self.overrides:
            if name == model:
                base = override
        floor = max(base.min_accuracy, dense_accuracy - base.max_accuracy_drop, 0.0)
        return replace(base, min_accuracy=floor, max_accuracy_drop=1.0, overrides=())

    def __post_init__(self) -> None:
        where = f"class {self.name!r}"
        _check_types(self, where)
        if not self.name:
            raise ValueError("class name must be non-empty")
        if not self.latency_ms > 0:
            raise ValueError(f"{where}: latency_ms={self.latency_ms} must be > 0")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"{where}: min_accuracy={self.min_accuracy} must be in [0, 1]")
        if self.priority < 0:
            raise ValueError(f"{where}: priority={self.priority} must be >= 0")
        if self.max_queue <= 0:
            raise ValueError(f"{where}: max_queue={self.max_queue} must be > 0")
        _store_member(self, "on_late", OnLate, where)
        _store_member(self, "mode", Mode, where)
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"{where}: max_accuracy_drop={self.max_accuracy_drop} must be in [0, 1]")
        _store_floats(self)


_NUMBER = (int, float)


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _check_types(cfg, where: str) -> None:
    """A TOML value of the wrong type gets a message naming the field, not a bare TypeError later."""
    for name, f in cfg.__dataclass_fields__.items():
        value = getattr(cfg, name)
        want = {"str": str, "float": _NUMBER, "int": int}.get(_type_name(f))
        if want is not None and (isinstance(value, bool) or not isinstance(value, want)):
            raise ValueError(f"{where}: {name}={value!r} must be of type {_type_name(f)}")


def _store_member(cfg, name: str, enum, where: str) -> None:
    """A string field with a fixed set of values is stored as the enum member it names (the same string to
    every comparison); anything else is a ValueError that lists the values."""
    value = getattr(cfg, name)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name}={value!r} must be of type str")
    values = tuple(m.value for m in enum)
    if value not in values:
        raise ValueError(f"{where}: {name}={value!r} must be one of {values}")
    object.__setattr__(cfg, name, enum(value))


def _store_floats(cfg) -> None:
    """A whole number given for a float field is stored as a float (after validation, whose messages quote
    the value as given): the compiled scheduler (mypyc) stores such values as floats anyway, and both modes
    must report the same (``25.0``, not ``25``)."""
    for name, f in cfg.__dataclass_fields__.items():
        value = getattr(cfg, name)
        if _type_name(f) == "float" and isinstance(value, int):
            object.__setattr__(cfg, name, float(value))


def _with_overrides(cls: SLOClassConfig, per_model: dict, known: set[str], path: Path) -> SLOClassConfig:
    """``cls`` with the ``[class.model.NAME]`` tables of the classes file: each NAME's settings of the class."""
    overrides = []
    for model, settings in per_model.items():
        where = f"{path}: class {cls.name!r}, model {model!r}"
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: expected a table [class.model.{model}] of settings")
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        try:
            overrides.append((model, replace(cls, **settings)))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return replace(cls, overrides=tuple(overrides)) if overrides else cls


def default_classes_path() -> Path:
    return Path(str(resources.files("slonn.scheduler").joinpath("slo_classes.toml")))


def load_classes(path: Path | None = None) -> dict[str, SLOClassConfig]:
    """Read ``[[class]]`` tables from a TOML file (the packaged default when ``path`` is None)."""
    path = Path(path) if path else default_classes_path()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = data.get("class")
    if not entries:
        raise ValueError(f"{path}: no [[class]] tables found")
    known = set(SLOClassConfig.__dataclass_fields__) - {"overrides"}
    classes: dict[str, SLOClassConfig] = {}
    for entry in entries:
        entry = dict(entry)
        per_model = entry.pop("model", {})
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: class {entry.get('name')!r} has unknown keys {sorted(unknown)}; known: "
                             f"{sorted(known | {'model'})}")
        cls = _with_overrides(SLOClassConfig(**entry), per_model, known - {"name"}, path)
        if cls.name in classes:
            raise ValueError(f"{path}: class {cls.name!r} is defined twice")
        classes[cls.name] = cls
    return classes


@dataclass(frozen=True)
class ServerConfig:
    """Everything `slonn serve` needs, built once in the CLI and passed down."""

    model_dirs: tuple[Path, ...]
    """Model artifact directories to serve (each has manifest.json + weights.safetensors)."""
    classes: dict[str, SLOClassConfig] = field(default_factory=dict)
    """SLO classes by name."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 50051
    """Port to bind (0 = any free port)."""
    workers: int = 1
    """Worker processes (> 0); each runs one batch at a time."""
    threads: int = 1
    """torch intra-op threads per worker (> 0)."""
    worker_nice: int | None = None
    """Niceness of the worker processes (absolute, -20..19; None: the server's, which they inherit). Profile
    the worker at the same one (``slonn profile --worker-nice``): the server warns otherwise."""
    worker_cpus: tuple[int, ...] | None = None
    """CPUs the worker processes may run on (None: the server's). With the server itself on other CPUs
    (``slonn serve --cpus``), a co-runner on the workers' CPUs slows the model and not the front end: on a
    CPU host, the case of a neighbour on the same GPU (``python -m bench.adapt --pin``). The contention
    signal still counts runnable tasks over the whole machine, so two co-runners on the workers' one CPU
    read as they would spread over two, and the learner has to learn the pinned worker's slower batches
    online."""
    worker_spin_ms: float = 0.0
    """After each batch a worker polls for the next one this long before it blocks (>= 0; see
    ``workers.process.wait_for_task``): on a VM this keeps the host from pausing the worker's vCPU during
    the next batch, for the price of a busy core while traffic flows."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu" or "cuda[:N]"."""
    precision: str = DEFAULT_PRECISION
    """Weight precision of the workers (bf16, fp16, fp32): half precisions add half-precision kernels, which
    the measured kernel table picks where they are faster; fp32 serves the exact kernels only. Each has its
    own latency profile (``slonn profile --precision``)."""
    max_batch: int = 64
    """Largest batch the planner forms (1..1024)."""
    policy: str = PolicyName.SLONN.value
    """Scheduling policy: slonn (SLO-aware; slonn:recent_tau_ms=60 with the recent-slowdown factor), triton,
    fixed:<level>, aimd."""
    max_inflight: int = 8192
    """Admitted requests not yet answered, across classes; beyond it RESOURCE_EXHAUSTED (> 0)."""
    max_pending: int = 0
    """Calls that reached the server but that its event loop has not taken up yet (gRPC core's
    ``grpc.server.max_pending_requests``; its hard limit is set to twice this). Beyond it gRPC core
    sheds calls itself, answering CANCELLED within milliseconds, even while the Python loop is
    saturated. 0 = gRPC's own defaults (1000, hard 3000)."""
    max_message_bytes: int = 0
    """Largest message received or sent, over gRPC and HTTP (>= 4 KiB). 0 = sized from the models: gRPC's
    default of 4 MiB, or more where a full batch of the widest model's inputs needs it
    (``scheduler.server.message_limit``)."""
    overhead_ms: float = 1.0
    """Dispatch + IPC + reply time added to every predicted exec time (>= 0)."""
    grace_s: float = 10.0
    """On shutdown: how long queued and running work may drain (>= 0)."""
    in_process: bool = False
    """Run the model in the server process (debugging, tests) instead of worker processes."""
    pool: str = "process"
    """Where the workers run (POOLS): "process" (spawned on this machine) or "ray" (actors on a Ray cluster)."""
    ray_address: str | None = None
    """pool "ray": the cluster to join ("auto", or "host:port"); None starts a local Ray."""
    ray_num_cpus: float = 1.0
    """pool "ray": CPUs each worker reserves (> 0)."""
    ray_num_gpus: float = 0.0
    """pool "ray": GPUs each worker reserves (>= 0)."""
    ray_strategy: str = "SPREAD"
    """pool "ray": placement-group strategy, PACK / SPREAD / STRICT_PACK / STRICT_SPREAD."""
    metrics_port: int = 0
    """Serve Prometheus metrics on host:metrics_port/metrics (0 = off)."""
    http_port: int | None = None
    """Serve the Open Inference Protocol over HTTP/REST on host:http_port (0 = a free port; None = off)."""
    default_class: str = ""
    """The SLO class of Open Inference Protocol requests that name none (empty: the first class configured)."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the server: both ports speak TLS only (with ``tls_key``)."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA certificate(s): both ports require a client certificate it signed (mutual TLS)."""
    auth_token_file: Path | None = None
    """A file holding a bearer token every call must carry (``authorization: Bearer <token>``), except
    health and readiness checks."""
    stats_interval_s: float = 10.0
    """Period of the one-line stats summary in the log (0 = off)."""
    refit_overrun_share: float = 0.2
    """Refit the latency table early once this share of recent batches ran over their safe prediction
    (``LearnerConfig.exceed_trigger``; 1 = only on a mean drift or the quiet interval), in (0, 1]."""
    refit_contention_shift: float = 0.5
    """Refit the latency table early once the batches' contention, averaged over 2 s, moved this far since a
    refit at least 3 s old (``LearnerConfig.contention_trigger``; others' runnable tasks per CPU; inf = off),
    > 0."""
    frontend_of: int | None = None
    """The pid of the `slonn serve --frontends N` parent this server is one frontend of (None: it serves
    alone). Its ports are then shared with the other frontends (SO_REUSEPORT), and that parent's other
    descendants (the other frontends and their workers) are the same server, not contention."""

    def __post_init__(self) -> None:
        if not self.model_dirs:
            raise ValueError("model_dirs is empty: pass at least one --model-dir")
        if self.workers <= 0 or self.threads <= 0:
            raise ValueError(f"workers={self.workers}, threads={self.threads}: both must be > 0")
        if not 0 < self.refit_overrun_share <= 1:
            raise ValueError(f"refit_overrun_share={self.refit_overrun_share} must be in (0, 1]")
        if not self.refit_contention_shift > 0:
            raise ValueError(f"refit_contention_shift={self.refit_contention_shift} must be > 0 (inf = off)")
        if not 0 <= self.worker_spin_ms < float("inf"):
            raise ValueError(f"worker_spin_ms={self.worker_spin_ms} must be finite and >= 0")
        if self.worker_spin_ms and self.in_process:
            raise ValueError("worker_spin_ms applies to worker processes; in_process=True has none")
        if self.worker_nice is not None and self.in_process:
            raise ValueError("worker_nice applies to worker processes; in_process=True has none")
        if self.worker_nice is not None and (type(self.worker_nice) is not int or not -20 <= self.worker_nice <= 19):
            raise ValueError(f"worker_nice={self.worker_nice!r} must be a whole number in -20..19")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} must be one of {list(POOLS)}")
        if self.pool == "ray":
            if self.in_process:
                raise ValueError("pool='ray' runs workers as Ray actors; in_process=True has none")
            for name in ("worker_cpus", "worker_spin_ms"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to worker processes on this machine, not to pool='ray'")
            if not self.ray_num_cpus > 0 or not self.ray_num_gpus >= 0:
                raise ValueError(f"ray_num_cpus={self.ray_num_cpus} must be > 0, ray_num_gpus={self.ray_num_gpus} >= 0")
        if self.worker_cpus is not None:
            if self.in_process:
                raise ValueError("worker_cpus applies to worker processes; in_process=True has none")
            n_cpus = os.cpu_count() or 1
            if not self.worker_cpus or not all(0 <= c < n_cpus for c in self.worker_cpus):
                raise ValueError(f"worker_cpus={list(self.worker_cpus)}: this machine has CPUs 0..{n_cpus - 1}")
        low_precision_of(self.precision)  # ValueError naming precision
        if not 1 <= self.max_batch <= 1024:
            raise ValueError(f"max_batch={self.max_batch} must be in 1..1024")
        if self.max_inflight <= 0:
            raise ValueError(f"max_inflight={self.max_inflight} must be > 0")
        if self.max_pending < 0:
            raise ValueError(f"max_pending={self.max_pending} must be >= 0 (0 = gRPC's default)")
        if self.max_message_bytes != 0 and self.max_message_bytes < 4096:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} must be >= 4096 (or 0: sized from the models)")
        if self.overhead_ms < 0 or self.grace_s < 0:
            raise ValueError(f"overhead_ms={self.overhead_ms}, grace_s={self.grace_s} must be >= 0")
        if self.metrics_port < 0 or self.stats_interval_s < 0:
            raise ValueError(f"metrics_port={self.metrics_port}, stats_interval_s={self.stats_interval_s} must be >= 0")
        if not self.classes:
            raise ValueError("no SLO classes configured")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port={self.http_port} must be in 0..65535 (0 = a free port)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (--tls-client-ca) needs tls_cert and tls_key: mutual TLS is TLS first")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}={str(path)!r}: no such file (--{name.replace('_', '-')})")
        if self.default_class and self.default_class not in self.classes:
            raise ValueError(f"default_class={self.default_class!r} is not configured; classes: {sorted(self.classes)}")
