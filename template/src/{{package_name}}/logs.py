"""Logging setup: one JSON object per line in production, readable lines in a terminal.

The request id of the current RPC is added to every record logged while it runs.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else was passed through `extra=`.
# uvicorn adds `color_message`, a duplicate of the message with terminal colours.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
    rid = request_id.get()
    if rid is not None:
        fields.setdefault("request_id", rid)
    return fields


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; `extra=` fields become keys."""

    _encoder = json.JSONEncoder(default=str, ensure_ascii=False, check_circular=False)

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry)


class ConsoleFormatter(logging.Formatter):
    """Formats a record as `time level logger: message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line}  {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class BufferedHandler(logging.StreamHandler[io.TextIOWrapper]):
    """Writes records to a buffered copy of stderr; `flush()` sends them out.

    stderr is line-buffered, so a plain StreamHandler makes a write() system call
    per record. Each one releases the GIL, and grpc.aio's poller thread is waiting
    for it: the event loop then waits to get it back. With a record per request
    that cost dominated the request path. Here a WARNING or worse is written at
    once; everything else waits for `flush_periodically` or for logging's own
    flush at exit.
    """

    def __init__(self) -> None:
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(os.dup(sys.stderr.fileno()), "w"), 1 << 16),
            encoding="utf-8",
            errors="backslashreplace",
        )
        super().__init__(stream)

    def emit(self, record: logging.LogRecord) -> None:
        """Buffer the formatted record; write through for WARNING and above."""
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never raise; report like logging does
            self.handleError(record)

    def close(self) -> None:
        """Write out what is buffered and close the duplicated descriptor."""
        try:
            self.flush()
            self.stream.close()
        finally:
            super().close()


async def flush_periodically(interval: float = 0.2) -> None:
    """Flush the root handlers every `interval` seconds (a task; cancel to stop)."""
    try:
        while True:
            await asyncio.sleep(interval)
            for handler in logging.getLogger().handlers:
                handler.flush()
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()


def configure(*, level: str, fmt: str) -> None:
    """Send all logs to stderr in the chosen format (replaces existing handlers)."""
    handler = BufferedHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    # Nothing here reads thread, process or task names: skip collecting them for
    # every record (the request log line is on the hot path).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BufferedHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn configures its own handlers unless told not to; keep one format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
