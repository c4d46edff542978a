"""An OTLP/HTTP trace receiver on loopback, for tests and benchmarks.

`Receiver` runs in a thread of the test process and keeps every span it is sent;
`python otlp.py` runs one as its own process that only counts them: it prints
`port N` once listening and `spans N` when it ends on SIGTERM (the benchmark's sink).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_OK = ExportTraceServiceResponse().SerializeToString()


@dataclass(frozen=True)
class Received:
    """One span as the receiver got it."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    service: str
    # Attribute values as text (string, integer and boolean ones).
    attributes: dict[str, str]


class Receiver:
    """Accepts POST /v1/traces on 127.0.0.1 (a free port), keeps the spans."""

    def __init__(self, *, keep: bool = True) -> None:
        self.spans: list[Received] = []
        self.count = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.add(ExportTraceServiceRequest.FromString(body), keep=keep)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(_OK)))
                self.end_headers()
                self.wfile.write(_OK)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                del format, args  # quiet: the test's output is the service's

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, request: ExportTraceServiceRequest, *, keep: bool) -> None:
        """Record the spans of one export request."""
        with self._lock:
            for resource in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource.scope_spans:
                    self.count += len(scope.spans)
                    if not keep:
                        continue
                    self.spans.extend(
                        Received(
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.name,
                            span.kind,
                            service,
                            {a.key: _text(a.value) for a in span.attributes},
                        )
                        for span in scope.spans
                    )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _text(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


def _exit(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit)
    with Receiver(keep=False) as running:
        sys.stdout.write(f"port {running.port}\n")
        sys.stdout.flush()
        try:
            threading.Event().wait()
        finally:
            sys.stdout.write(f"spans {running.count}\n")
            sys.stdout.flush()
