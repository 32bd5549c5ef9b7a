"""The body of a Ray worker actor, and the artifact packing that lets it load models without a shared disk.

Imported on every Ray node that hosts a worker (Ray pickles the actor class by reference), so it must not
import Ray at module level: the frontend imports this module too, and Ray is an optional extra.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from slonn.workers.artifact import MANIFEST_FILE, WEIGHTS_FILE
from slonn.workers.device import gpu_uuid
from slonn.workers.heap import freeze_startup_heap
from slonn.workers.placement import ask_niceness, set_niceness
from slonn.workers.process import WorkerSpec, execute, load_runners, warm_up
from slonn.workers.protocol import BatchResult, BatchTask, WorkerFailure, WorkerReady

log = logging.getLogger(__name__)

ARTIFACT_FILES = (WEIGHTS_FILE, MANIFEST_FILE)
"""An artifact directory's files (workers.artifact) that a Ray worker needs."""


def pack_artifacts(model_dirs: tuple[Path, ...]) -> tuple[dict[str, bytes], ...]:
    """The artifacts' files as bytes, one dict (file name -> bytes) per model directory, in order: put once
    in Ray's object store, every node reads them from there."""
    return tuple({name: (Path(d) / name).read_bytes() for name in ARTIFACT_FILES} for d in model_dirs)


def unpack_artifacts(packed: tuple[dict[str, bytes], ...], root: Path) -> tuple[Path, ...]:
    """Write packed artifacts under ``root`` (one numbered directory each); returns the directories."""
    dirs = []
    for i, files in enumerate(packed):
        directory = Path(root) / str(i)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / WEIGHTS_FILE).write_bytes(files[WEIGHTS_FILE])
        (directory / MANIFEST_FILE).write_bytes(files[MANIFEST_FILE])  # last: it marks a complete artifact
        dirs.append(directory)
    return tuple(dirs)


@dataclass(frozen=True)
class RayReady:
    """What a Ray worker says once it is up: the process worker's WorkerReady and the node it runs on."""

    ready: WorkerReady
    node: str
    """Ray's id of the worker's node (hex)."""


class RayWorker:
    """One worker: loads the models once, then runs one BatchTask per ``run`` call.

    Runs as a threaded Ray actor (``max_concurrency`` > 1) so that ``sentinel`` can block for the actor's
    whole life: the pool awaits it, and its failure tells the pool at once that the actor died, whether it
    was idle or busy, as a process's sentinel does for ProcessPool. The pool sends ``run`` calls one at a
    time.
    """

    def __init__(self, worker_id: int, spec: WorkerSpec, artifacts: tuple[dict[str, bytes], ...],
                 node_tables: dict[str, dict], monitor_factory: Callable[[], Any]) -> None:
        """``monitor_factory`` makes the node's contention sampler (the server passes its own kind, from
        policy.contention): it runs here because on another node the frontend cannot see the run queue the
        model shares."""
        import ray

        logging.basicConfig(level=logging.WARNING, format=f"ray-worker{worker_id} %(levelname)s %(message)s")
        self.worker_id = worker_id
        self.node = ray.get_runtime_context().get_node_id()
        self._dir = tempfile.TemporaryDirectory(prefix="slonn-artifacts-")
        # A kernel table measured on this node by an earlier worker is reused; a new node measures its own.
        spec = replace(spec, model_dirs=unpack_artifacts(artifacts, Path(self._dir.name)),
                       kernel_tables=node_tables.get(self.node, {}))
        self.niceness = (os.getpriority(os.PRIO_PROCESS, 0) if spec.worker_nice is None
                         else ask_niceness(spec.worker_nice, f"ray worker {worker_id}"))
        self.failed: dict[str, str] = {}
        self.runners = load_runners(spec, self.failed)
        warm_up(self.runners)
        freeze_startup_heap()
        self.device = next(iter(self.runners.values())).device
        self.monitor = monitor_factory()
        if gpu_uuid(self.device):
            self.monitor.watch_gpu(gpu_uuid(self.device))
        self.monitor.start()
        self._stop = threading.Event()

    def ready(self) -> RayReady:
        """The worker's description (models, measured kernel table, device, node)."""
        runners = self.runners
        return RayReady(WorkerReady(
            worker_id=self.worker_id, pid=os.getpid(), device=str(self.device), gpu_uuid=gpu_uuid(self.device),
            models={name: r.manifest.to_json() for name, r in runners.items()},
            kernel_table={name: r.chooser.to_json() for name, r in runners.items()}, niceness=self.niceness,
            cpus=tuple(sorted(os.sched_getaffinity(0))), failed=dict(self.failed)), self.node)

    def run(self, task: BatchTask) -> BatchResult | WorkerFailure:
        """Run one task; the result carries this node's contention at its end."""
        if os.getpriority(os.PRIO_PROCESS, 0) != self.niceness:
            # Niceness is per thread on Linux, and a threaded actor's calls run on threads Ray started
            # before __init__ set it.
            set_niceness(self.niceness)
        if not task.inputs.flags.writeable:  # Ray hands arrays over read-only; torch.from_numpy warns on those
            task = replace(task, inputs=task.inputs.copy())
        out = execute(self.runners, task, self.worker_id)
        if isinstance(out, BatchResult):
            out = replace(out, node=self.node, contention=self.monitor.value)
        return out

    def ping(self) -> float:
        """This node's contention now (an empty call: the pool times Ray's round trip with it)."""
        return self.monitor.value

    def add_own_pids(self, pids: list[int]) -> None:
        """Other slonn workers on this node: their threads are ours, not contention."""
        for pid in pids:
            self.monitor.add_own_pid(pid)

    def sentinel(self) -> None:
        """Blocks until ``shutdown``: while the actor lives, this call stays pending."""
        self._stop.wait()

    def shutdown(self) -> None:
        self._stop.set()
        self.monitor.stop()
