"""Device choice and device-correct timing (one place for CUDA vs CPU)."""

from __future__ import annotations

import time

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device


def gpu_uuid(device: torch.device) -> str:
    """NVML's name for the GPU ``device`` runs on ("GPU-<uuid>"), "" on the CPU. Called where the model
    runs (a worker), which has its CUDA context anyway: a CUDA index means different GPUs to CUDA and to
    NVML under CUDA_VISIBLE_DEVICES, a UUID does not."""
    if device.type != "cuda":
        return ""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else ""


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer around it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceTimer:
    """Context manager measuring elapsed ms of device work (synchronises before and after)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms = 0.0

    def __enter__(self) -> "DeviceTimer":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.ms = (time.perf_counter() - self._t0) * 1e3
