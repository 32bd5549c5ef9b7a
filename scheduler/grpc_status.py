"""The gRPC status each request error answers with: the one place errors meet gRPC, for both servicers
(slonn.v1 and the Open Inference Protocol)."""

from __future__ import annotations

import grpc

from slonn.scheduler.errors import ErrorKind, RequestError

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_status(exc: RequestError) -> grpc.StatusCode:
    """The status ``exc`` answers with."""
    return GRPC_STATUS[exc.kind]
