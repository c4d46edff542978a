"""Service errors and the one status table shared by gRPC and HTTP.

A leaf module: it imports nothing from the service, grpc or any driver, so the
domain layer can raise these errors without knowing about transports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar


class Code(enum.IntEnum):
    """Canonical status codes, numbered as in google/rpc/code.proto and grpc.StatusCode."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# HTTP status for each code, from the comments of google/rpc/code.proto. Tables found
# elsewhere differ (CANCELLED 408, FAILED_PRECONDITION 412): this one is canonical.
HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class ServiceError(Exception):
    """An error whose message is safe to show to the caller.

    Anything else raised by a handler is logged and answered with a generic
    INTERNAL status, so internal details never reach callers.
    """

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds the caller should wait before retrying (google.rpc.RetryInfo over
        # gRPC, Retry-After over HTTP); None: no advice.
        self.retry_after = retry_after


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` name each bad field."""

    code = Code.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = tuple(violations)
        fields = ", ".join(v.field for v in self.violations)
        super().__init__(f"invalid request: {fields}")

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """Build the error for a single bad field."""
        return cls([FieldViolation(field, description)])


class NotFound(ServiceError):
    """The named resource does not exist."""

    code = Code.NOT_FOUND


class AlreadyExists(ServiceError):
    """The resource the caller tried to create exists already."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The system is not in the state the operation needs; fix that before retrying."""

    code = Code.FAILED_PRECONDITION


class Aborted(ServiceError):
    """A concurrency conflict (such as an etag mismatch): re-read, then retry."""

    code = Code.ABORTED


class DeadlineExceeded(ServiceError):
    """The request's deadline expired, or too little of it remained to start the work."""

    code = Code.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    """A dependency is unreachable or saturated; the call may be retried with backoff."""

    code = Code.UNAVAILABLE


class ResourceExhausted(ServiceError):
    """The service is over a limit; retry later."""

    code = Code.RESOURCE_EXHAUSTED


class Internal(ServiceError):
    """A bug or an unexpected failure. Callers see only a generic message."""

    code = Code.INTERNAL
