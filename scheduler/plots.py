"""Plots for `slonn compare` (matplotlib, Agg backend: files only, no display).

- ``latency_cdf``: per policy, the CDF of answered requests' latency, with the class deadlines marked.
- ``timeline``: per policy, deadline attainment over time (top) and the mean served level over time
  (bottom), with the interference window shaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from slonn.scheduler.report import RequestRecord


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(runs: Mapping[str, Sequence[RequestRecord]], deadlines_ms: Mapping[str, float], path: Path,
                title: str = "") -> Path:
    """One CDF line per policy over every OK answer (errors are off the chart: the curve ends below 1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, records in runs.items():
        lat = np.sort([r.latency_ms for r in records if r.status == "OK"])
        if not len(lat):
            continue
        frac = np.arange(1, len(lat) + 1) / len(records)
        ax.plot(lat, frac, label=name, lw=1.5)
    for cls, ms in sorted(deadlines_ms.items(), key=lambda kv: kv[1]):
        ax.axvline(ms, color="grey", ls=":", lw=1)
        ax.text(ms, 0.02, f" {cls} {ms:g} ms", rotation=90, va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, client side)")
    ax.set_ylabel("fraction of requests answered OK within")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "latency CDF per policy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def binned(records: Sequence[RequestRecord], duration_s: float, bins: int = 60):
    """(bin centres, attainment per bin, mean served level per bin) by send time."""
    edges = np.linspace(0.0, max(duration_s, 1e-9), bins + 1)
    send = np.asarray([r.send_s for r in records])
    on_time = np.asarray([r.on_time for r in records], float)
    level = np.asarray([r.level if r.status == "OK" else np.nan for r in records], float)
    idx = np.clip(np.searchsorted(edges, send, side="right") - 1, 0, bins - 1)
    att = np.full(bins, np.nan)
    lvl = np.full(bins, np.nan)
    for b in range(bins):
        sel = idx == b
        if sel.any():
            att[b] = on_time[sel].mean()
            served = level[sel]
            served = served[np.isfinite(served)]
            if len(served):
                lvl[b] = served.mean()
    return (edges[:-1] + edges[1:]) / 2, att, lvl


def timeline(runs: Mapping[str, Sequence[RequestRecord]], duration_s: float, path: Path,
             window_s: tuple[float, float] | None = None, bins: int = 60, title: str = "") -> Path:
    """Attainment (all classes) and mean served level over time per policy; interference window shaded."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for name, records in runs.items():
        t, att, lvl = binned(records, duration_s, bins)
        ax1.plot(t, att * 100, label=name, lw=1.3)
        ax2.plot(t, lvl, label=name, lw=1.3, marker=".", ms=3)
    for ax in (ax1, ax2):
        if window_s is not None:
            ax.axvspan(window_s[0], window_s[1], color="red", alpha=0.08, label="co-runner" if ax is ax1 else None)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("within deadline (%)")
    ax1.set_ylim(0, 101)
    ax1.legend(fontsize=8, loc="lower left")
    ax2.set_ylabel("mean served level (keep)")
    ax2.set_yscale("log")
    ax2.set_xlabel("time (s)")
    ax1.set_title(title or "attainment and level over time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
