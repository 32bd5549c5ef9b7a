"""Request errors with their gRPC status: raised anywhere, mapped to a status in one place."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that ends with a gRPC error status and a message naming the cause."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    counted: bool = False
    """Already counted in the metrics' answers (by the dispatcher): the frontends count the others."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(RequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class QueueFull(RequestError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineUnreachable(RequestError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(RequestError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(RequestError):
    code = grpc.StatusCode.FAILED_PRECONDITION
