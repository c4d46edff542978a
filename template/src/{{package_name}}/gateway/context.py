"""The servicer context of a call that came over HTTP, behaving like grpc.aio's.

Servicers receive it where gRPC passes its own context: `abort` raises (the chain
lets the answer through as it is, like gRPC's AbortError), `set_code` and
`set_details` end a call that returns normally with that status,
`invocation_metadata` holds the allow-listed request headers, `time_remaining`
reads the request's deadline, and metadata set by the servicer becomes response
headers. What HTTP/1.1 has no counterpart for (compression, peer identities,
reading a request stream) does nothing or raises NotImplementedError.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc import aio

from .. import scope as request_scope
from ..errors import Code

if TYPE_CHECKING:
    from google.protobuf.message import Message

Metadata = tuple[tuple[str, str | bytes], ...]
Writer = Callable[[Any], Any]

# Response headers that carry metadata, as grpc-gateway names them.
INITIAL_PREFIX = "grpc-metadata-"
TRAILING_PREFIX = "grpc-trailer-"
DETAILS_KEY = "grpc-status-details-bin"


class Aborted(Exception):
    """`context.abort()` was called: the call ends with this code and message.

    `details` is a serialized google.rpc.Status from the trailing metadata
    (`grpc-status-details-bin`), when the servicer sent one.
    """

    def __init__(self, code: Code, message: str, details: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def status_code(code: grpc.StatusCode) -> Code:
    """The chain's code of a grpc.StatusCode."""
    return Code(code.value[0])


def header_value(value: str | bytes) -> bytes:
    """A metadata value as an HTTP header value: binary (`-bin`) ones in base64."""
    if isinstance(value, bytes):
        return base64.b64encode(value)
    return value.encode("latin-1", errors="replace")


def metadata_value(key: str, raw: bytes) -> str | bytes:
    """A header value as metadata: `-bin` keys base64-decoded, others as text.

    Raises ValueError when a `-bin` value is not base64.
    """
    if key.endswith("-bin"):
        try:
            return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except binascii.Error:
            raise ValueError(f"{key} is not base64") from None
    return raw.decode("latin-1")


class HttpContext(aio.ServicerContext[Any, Any]):
    """The context one HTTP request's servicer call receives."""

    __slots__ = (
        "_callbacks",
        "_cancelled",
        "_client",
        "_code",
        "_details",
        "_done",
        "_initial",
        "_metadata",
        "_trailing",
        "writer",
    )

    def __init__(self, metadata: Metadata, client: tuple[str, int] | None) -> None:
        self._metadata = metadata
        self._client = client
        self._code: Code | None = None
        self._details = ""
        self._initial: Metadata = ()
        self._trailing: Metadata = ()
        self._done = False
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []
        # Set by the gateway for server-streaming calls that use context.write().
        self.writer: Writer | None = None

    # --- ending the call ---------------------------------------------------------

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: aio.Metadata | Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        """End the call with `code` and `details`; raises Aborted."""
        if code == grpc.StatusCode.OK:
            # As grpc.aio does: a call cannot be aborted with OK.
            code, details = grpc.StatusCode.UNKNOWN, ""
        self._trailing = tuple(trailing_metadata)
        raw = next((v for k, v in self._trailing if k == DETAILS_KEY), None)
        raise Aborted(status_code(code), details, raw if isinstance(raw, bytes) else None)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """End the call with a grpc.Status (grpc_status.rpc_status.to_status)."""
        await self.abort(status.code, status.details, tuple(status.trailing_metadata))

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status of a call that returns normally."""
        self._code = status_code(code)

    def set_details(self, details: str) -> None:
        """The status message of a call that returns normally."""
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The code set with set_code (OK when none was)."""
        code = Code.OK if self._code is None else self._code
        return next(c for c in grpc.StatusCode if c.value[0] == code)

    def details(self) -> str:
        """The details set with set_details."""
        return self._details

    @property
    def status(self) -> tuple[Code, str] | None:
        """The code and details a normal return ends with, when a code was set."""
        if self._code is None or self._code == Code.OK:
            return None
        return self._code, self._details

    # --- metadata ----------------------------------------------------------------

    def invocation_metadata(self) -> aio.Metadata:
        """The request's allow-listed headers and `grpc-metadata-*` headers."""
        return aio.Metadata(*self._metadata)

    async def send_initial_metadata(self, initial_metadata: Iterable[tuple[str, Any]]) -> None:
        """Becomes `grpc-metadata-<key>` response headers."""
        self._initial = tuple(initial_metadata)

    def set_trailing_metadata(self, trailing_metadata: Iterable[tuple[str, Any]]) -> None:
        """Becomes `grpc-trailer-<key>` response headers."""
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> aio.Metadata:
        """What set_trailing_metadata set."""
        return aio.Metadata(*self._trailing)

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """The metadata the servicer set, as response headers."""
        headers = []
        for prefix, pairs in ((INITIAL_PREFIX, self._initial), (TRAILING_PREFIX, self._trailing)):
            for key, value in pairs:
                if key != DETAILS_KEY:
                    name = f"{prefix}{key.lower()}".encode("ascii", errors="replace")
                    headers.append((name, header_value(value)))
        return headers

    # --- the call's state ----------------------------------------------------------

    def time_remaining(self) -> float:
        """Seconds left before the request's deadline (0 once it passed)."""
        current = request_scope.current.get()
        if current is None or current.deadline is None or current.loop is None:
            return 0.0
        return max(current.deadline - current.loop.time(), 0.0)

    def peer(self) -> str:
        """The client's address, as gRPC writes it (`ipv4:127.0.0.1:5000`)."""
        if self._client is None:
            return "unknown"
        host, port = self._client
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    def cancelled(self) -> bool:
        """Whether the call was cancelled (its deadline passed, or the server stopped)."""
        return self._cancelled

    def done(self) -> bool:
        """Whether the call has ended."""
        return self._done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(context)` when the call ends (at once if it has)."""
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def finish(self, *, cancelled: bool) -> None:
        """Mark the call ended and run the done callbacks (the gateway calls this)."""
        self._done = True
        self._cancelled = cancelled
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    # --- streams -------------------------------------------------------------------

    async def write(self, message: Message) -> None:
        """Send one message of a server stream."""
        if self.writer is None:
            raise RuntimeError("write() is for server-streaming methods")
        await self.writer(message)

    async def read(self) -> NoReturn:
        """Request streams are not exposed over HTTP."""
        raise NotImplementedError("request streams are not exposed over HTTP")

    # --- what HTTP/1.1 has no counterpart for ----------------------------------------

    def set_compression(self, compression: grpc.Compression) -> None:
        """Responses are not compressed over HTTP: ignored."""

    def disable_next_message_compression(self) -> None:
        """Responses are not compressed over HTTP: ignored."""

    def peer_identities(self) -> Iterable[bytes] | None:
        """No TLS client identities over the gateway."""
        return None

    def peer_identity_key(self) -> str | None:
        """No TLS client identities over the gateway."""
        return None

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        """No transport security context over the gateway."""
        return {}
