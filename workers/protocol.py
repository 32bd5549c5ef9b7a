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


@dataclass(frozen=True)
class Shutdown:
    """Ask a worker to finish and exit."""
