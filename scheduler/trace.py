"""Arrival traces: load, window, time-compress, and assign SLO classes.

The project ships a copy of the Azure LLM inference trace 2023 ("code"
service, CC-BY 4.0; Patel et al., Splitwise, ISCA 2024) in scripts/data/.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

DEFAULT_TRACE = Path(__file__).resolve().parent / "data" / "azure_llm_2023_code.csv"

# ContextTokens decide the class: short prompts are interactive, long ones batch.
DEFAULT_CLASS_RULE = ((1000, "interactive"), (4000, "standard"), (float("inf"), "batch"))


@dataclass(frozen=True)
class Arrivals:
    """Request arrival offsets (s, from the window start, after compression) and their SLO classes."""

    offsets_s: np.ndarray
    classes: list[str]
    source: str
    window_s: tuple[float, float]
    speedup: float

    def __len__(self) -> int:
        return len(self.offsets_s)

    @property
    def duration_s(self) -> float:
        return (self.window_s[1] - self.window_s[0]) / self.speedup

    def describe(self) -> dict:
        return {"trace": self.source, "window_s": list(self.window_s), "speedup": self.speedup,
                "requests": len(self), "duration_s": round(self.duration_s, 3),
                "mean_rate_per_s": round(len(self) / max(self.duration_s, 1e-9), 2)}


def load_trace(path: Path = DEFAULT_TRACE) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the first arrival, context tokens) of every row."""
    times, tokens = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ts = row["TIMESTAMP"]
            # 7 fractional digits: trim to microseconds for datetime.
            head, _, frac = ts.partition(".")
            times.append(datetime.fromisoformat(f"{head}.{frac[:6].ljust(6, '0')}").timestamp())
            tokens.append(int(row.get("ContextTokens", 0) or 0))
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    return t[order] - t[order][0], np.asarray(tokens)[order]


def classify(tokens: np.ndarray, rule=DEFAULT_CLASS_RULE) -> list[str]:
    out = []
    for n in tokens:
        for limit, name in rule:
            if n < limit:
                out.append(name)
                break
    return out


def make_arrivals(path: Path = DEFAULT_TRACE, start_s: float = 0.0, duration_s: float | None = 60.0,
                  speedup: float = 1.0, target_rate: float | None = None, class_mix: dict | None = None,
                  seed: int = 0) -> Arrivals:
    """Arrivals in trace window [start_s, start_s + duration_s), compressed by ``speedup``.

    ``target_rate`` (requests/s after compression) overrides ``speedup``.
    ``class_mix`` ({class: weight}) draws classes at random instead of the token rule.
    """
    t, tokens = load_trace(path)
    end_s = t[-1] + 1e-9 if duration_s is None else start_s + duration_s
    sel = (t >= start_s) & (t < end_s)
    t, tokens = t[sel] - start_s, tokens[sel]
    if len(t) == 0:
        raise ValueError(f"no arrivals in the window [{start_s}, {end_s}) s of {path}")
    span = end_s - start_s
    if target_rate:
        speedup = len(t) / span / target_rate
        speedup = 1.0 / speedup
    if class_mix:
        rng = np.random.default_rng(seed)
        names = list(class_mix)
        p = np.asarray([class_mix[n] for n in names], float)
        classes = list(rng.choice(names, size=len(t), p=p / p.sum()))
    else:
        classes = classify(tokens)
    return Arrivals(t / speedup, classes, str(path), (start_s, end_s), speedup)


def poisson_arrivals(rate_per_s: float, duration_s: float, class_mix: dict[str, float], seed: int = 0) -> Arrivals:
    """Synthetic open-loop load: Poisson arrivals at ``rate_per_s`` for ``duration_s``, classes drawn by weight."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError(f"rate_per_s={rate_per_s} and duration_s={duration_s} must be > 0")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, size=int(rate_per_s * duration_s * 1.2) + 16)
    t = np.cumsum(gaps)
    t = t[t < duration_s]
    names = list(class_mix)
    p = np.asarray([class_mix[n] for n in names], float)
    classes = list(rng.choice(names, size=len(t), p=p / p.sum()))
    return Arrivals(t, classes, f"poisson({rate_per_s:g}/s)", (0.0, duration_s), 1.0)
