"""Request errors carry a transport-agnostic kind; the gRPC servicer maps every kind to a status in one table."""

from __future__ import annotations

import grpc
import pytest

from slonn.scheduler.errors import (DeadlineUnreachable, ErrorKind, FailedPrecondition, InvalidArgument, NotFound,
                                    QueueFull, RequestError, Unavailable)
from slonn.scheduler.grpc_status import GRPC_STATUS


def test_every_kind_has_the_grpc_status_of_its_name():
    assert set(GRPC_STATUS) == set(ErrorKind)
    # Simulated runs record the kind, live runs the status the client saw: the names must agree.
    assert {kind.value: status.name for kind, status in GRPC_STATUS.items()} == {k.value: k.value for k in ErrorKind}


@pytest.mark.parametrize(("error", "status"), [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT), (NotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED), (DeadlineUnreachable, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE), (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestError, grpc.StatusCode.INTERNAL),
])
def test_each_error_answers_with_its_status(error, status):
    assert GRPC_STATUS[error("why").kind] == status


def test_a_kind_given_to_the_error_overrides_its_class_default():
    err = RequestError("worker gone", ErrorKind.UNAVAILABLE)
    assert err.kind == ErrorKind.UNAVAILABLE and str(err) == "worker gone"
    assert RequestError("other").kind == ErrorKind.INTERNAL  # the instance's kind did not leak to the class
