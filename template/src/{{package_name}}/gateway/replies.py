"""Error replies of the gateway: a google.rpc.Status as JSON, its HTTP status and headers.

The body is the same google.rpc.Status a gRPC caller receives in
`grpc-status-details-bin` (`handlers.status_of`), in the proto3 JSON mapping:
`{"code": 5, "message": "...", "details": [{"@type": "...", ...}]}`. A
google.rpc.RetryInfo detail also becomes a `Retry-After` header.
"""

from __future__ import annotations

import logging
import math

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from ..errors import HTTP_STATUS, Code, InvalidArgument, ResourceExhausted, ServiceError

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


class BodyTooLarge(ResourceExhausted):
    """The request body is over the gateway's limit (HTTP 413)."""

    http_status = 413


class UnsupportedMediaType(InvalidArgument):
    """The request body is not JSON (HTTP 415)."""

    http_status = 415


class ClientGone(ServiceError):
    """The client closed the connection before the call ended (HTTP 499)."""

    code = Code.CANCELLED


def http_status(error: ServiceError) -> int:
    """The HTTP status of an error: its own when it has one, else the code's."""
    own = getattr(error, "http_status", None)
    return own if isinstance(own, int) else HTTP_STATUS[error.code]


def status(code: Code, message: str, details: bytes | None = None) -> status_pb2.Status:
    """A google.rpc.Status with `code` and `message`, and the details of `details`.

    `details` is a serialized google.rpc.Status (an aborting servicer's
    `grpc-status-details-bin`); unreadable, it is left out.
    """
    result = status_pb2.Status(code=int(code), message=message)
    if details:
        try:
            result.details.extend(status_pb2.Status.FromString(details).details)
        except DecodeError:
            log.warning("unreadable grpc-status-details-bin left out", extra={"code": code.name})
    return result


def body(result: status_pb2.Status) -> bytes:
    """The JSON of a status; details whose type this process does not know are left out."""
    try:
        return orjson.dumps(json_format.MessageToDict(result))
    except (TypeError, json_format.SerializeToJsonError):
        log.warning("status details of an unknown type left out", extra={"code": result.code})
        bare = status_pb2.Status(code=result.code, message=result.message)
        return orjson.dumps(json_format.MessageToDict(bare))


def retry_after(result: status_pb2.Status) -> bytes | None:
    """`Retry-After` (whole seconds, rounded up) from a google.rpc.RetryInfo detail."""
    info = error_details_pb2.RetryInfo()
    for detail in result.details:
        if detail.Unpack(info):  # False for details of another type
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return str(max(math.ceil(delay), 0)).encode()
    return None


def headers(payload: bytes, result: status_pb2.Status) -> Headers:
    """The headers of an error reply with `payload` as its body."""
    found: Headers = [(b"content-type", JSON), (b"content-length", b"%d" % len(payload))]
    after = retry_after(result)
    if after is not None:
        found.append((b"retry-after", after))
    return found
