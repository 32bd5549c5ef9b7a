"""Messages between the scheduler process and worker processes.

Named, typed and picklable; no positional tuples, no sentinels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BatchTask:
    """Run ``inputs`` (batch x features, float32) through ``model`` at keep fraction ``level``."""

    task_id: int
    model: str
    level: float
    inputs: np.ndarray


@dataclass(frozen=True)
class BatchResult:
    """Outputs of one BatchTask, with how long the model took (device-synchronised)."""

    task_id: int
    worker_id: int
    outputs: np.ndarray
    exec_ms: float
    kernel: str
    node: str = ""
    """The worker's node (a Ray node id; "" for a process on this machine)."""
    contention: float | None = None
    """The worker's node's contention at the batch's end, measured there (None: the frontend measures it)."""


@dataclass(frozen=True)
class WorkerFailure:
    """A task raised inside the worker (the worker itself is still alive)."""

    task_id: int
    worker_id: int
    error: str


@dataclass(frozen=True)
class WorkerReady:
    """Sent once by a worker after it has loaded its models and warmed up."""

    worker_id: int
    pid: int
    device: str
    models: dict = field(default_factory=dict)
    """model name -> ModelManifest.to_json()."""
    kernel_table: dict = field(default_factory=dict)
    """model name -> the worker's measured kernel choice per (batch, level), for logging."""
    niceness: int = 0
    """The niceness the worker runs at (``WorkerSpec.worker_nice`` if it could be set, else its parent's)."""
    cpus: tuple[int, ...] = ()
    """The CPUs the worker may run on."""
    gpu_uuid: str = ""
    """NVML's name of the worker's GPU ("GPU-<uuid>"; ``workers.device.gpu_uuid``), "" on the CPU: the
    server's contention monitor watches that GPU for other processes."""
    failed: dict = field(default_factory=dict)
    """model name -> why the worker could not load it (the worker serves the others)."""


@dataclass(frozen=True)
class Shutdown:
    """Ask a worker to finish and exit."""
