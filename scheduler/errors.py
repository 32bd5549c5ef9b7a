"""Request errors, transport-agnostic: each carries an :class:`ErrorKind`, and each front end maps kinds to
its own status codes in one table (the gRPC servicer: ``scheduler.server.GRPC_STATUS``)."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """Why a request failed. Spelled as the canonical status names gRPC shares with Google's API errors: the
    records of simulated and of live runs (``RequestRecord.status``) and the metrics' labels carry them."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"


class RequestError(Exception):
    """A request that ends with an error of ``kind`` and a message naming the cause."""

    kind: ErrorKind = ErrorKind.INTERNAL
    counted: bool = False
    """Already counted in the metrics' answers (by the dispatcher): the frontends count the others."""

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class InvalidArgument(RequestError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(RequestError):
    kind = ErrorKind.NOT_FOUND


class QueueFull(RequestError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class DeadlineUnreachable(RequestError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Unavailable(RequestError):
    kind = ErrorKind.UNAVAILABLE


class FailedPrecondition(RequestError):
    kind = ErrorKind.FAILED_PRECONDITION
