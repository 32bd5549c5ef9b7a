"""Weight precisions a worker can serve in: the names the server, the policy's latency profiles and the
workers share. A leaf module (standard library only), so each package can import it without importing
another."""

from __future__ import annotations

from enum import StrEnum


class Precision(StrEnum):
    """A weight precision by its command-line and file-name spelling."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)
"""Weight precisions a worker can serve in: with "bf16"/"fp16" it also builds half copies of the weights
and the half kernels (the chooser still picks per (batch size, level) by measurement); "fp32" only the
exact kernels."""
DEFAULT_PRECISION: str = Precision.BF16.value


def low_precision_of(precision: str) -> str | None:
    """The half copy a precision needs (None for fp32); raises ValueError naming ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    return None if precision == Precision.FP32 else precision
