"""One call's samples into the dispatcher: budget checks, the caller's gRPC deadline, N samples, one deadline.

Every frontend that carries a [N, features] tensor (the Open Inference Protocol over gRPC and HTTP) admits it
here, so a call's deadline is handled the same way whatever protocol it came by.
"""

from __future__ import annotations

import asyncio

import numpy as np

from slonn.scheduler.dispatcher import Completion, Dispatcher
from slonn.scheduler.driver import ANSWER_MARGIN_MS, caller_budget
from slonn.scheduler.errors import DeadlineUnreachable, InvalidArgument


def check_budget(budget_ms: float, field: str = "latency_budget_ms") -> float:
    """A latency budget from a request: finite and >= 0 (0 = the class's deadline), else INVALID_ARGUMENT."""
    if not budget_ms >= 0 or budget_ms == float("inf"):
        raise InvalidArgument(f"{field}: got {budget_ms}, expected a finite value >= 0 (0 = class default)")
    return budget_ms


async def admit_samples(dispatcher: Dispatcher, model: str, slo_class: str, samples: np.ndarray,
                        budget_ms: float, time_remaining_s: float | None, field: str = "input") -> list[Completion]:
    """Admit the rows of ``samples`` ([N, features]) with one deadline; their answers in input order.

    ``budget_ms`` (0 = the class's) can only tighten the class deadline; ``time_remaining_s``, the call's
    own deadline (None: none), tightens it too and makes it hard (nobody reads an answer after it).
    Raises RequestError subclasses; all N answer with one error when any fails. ``field``: the request's
    input, as errors about the number of samples name it.
    """
    budget_ms, hard = caller_budget(check_budget(budget_ms),
                                    None if time_remaining_s is None else time_remaining_s * 1e3)
    work = dispatcher.infer_many(model, slo_class, samples, budget_ms or None, hard, field)
    if time_remaining_s is None:
        return await work
    try:
        # Whatever the class says about late answers, the caller stops listening at its deadline.
        async with asyncio.timeout(time_remaining_s - ANSWER_MARGIN_MS * 1e-3):
            return await work
    except TimeoutError:
        raise DeadlineUnreachable("not served before the call's deadline") from None
