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
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else was passed through `extra=`.
# uvicorn adds `color_message`, a duplicate of the message with terminal colours.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = _extras(record)
    rid = request_id.get()
    if rid is not None:
        fields.setdefault("request_id", rid)
    return fields


# The last second formatted, as (seconds, "YYYY-MM-DDTHH:MM:SS"): a request log line
# per RPC would otherwise build a datetime each time. One tuple, swapped whole, so
# threads that log never see a half-updated cache.
_second: tuple[int, str] = (-1, "")
_MICROS = 1_000_000


def _timestamp(created: float) -> str:
    """`created` (epoch seconds) as ISO 8601 in UTC with milliseconds."""
    global _second  # noqa: PLW0603 - a one-entry cache
    # Rounded to microseconds first, then truncated to milliseconds: what
    # datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds") gives.
    seconds = int(created)
    micros = round((created - seconds) * _MICROS)
    if micros >= _MICROS:
        seconds, micros = seconds + 1, micros - _MICROS
    cached, prefix = _second
    if cached != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, prefix)
    return f"{prefix}.{micros // 1000:03d}+00:00"


_fallback = json.JSONEncoder(default=str, ensure_ascii=False, check_circular=False)


def _dumps(entry: dict[str, Any]) -> str:
    """`entry` as compact JSON; values JSON has no type for become their str()."""
    try:
        # orjson: a fifth of the stdlib encoder's cost, on the request log line.
        return orjson.dumps(entry, default=str).decode()
    except TypeError:
        # What orjson refuses (an int beyond 64 bits, a non-str key): the stdlib
        # encoder takes anything, so a log call never fails on its fields.
        return _fallback.encode(entry)


def _entry(
    created: float, level: str, logger: str, msg: str, extras: dict[str, Any]
) -> dict[str, Any]:
    """The JSON object of a log line; the current request id is added."""
    entry: dict[str, Any] = {
        "ts": _timestamp(created),
        "level": level,
        "logger": logger,
        "msg": msg,
        **extras,
    }
    rid = request_id.get()
    if rid is not None:
        entry.setdefault("request_id", rid)
    return entry


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; `extra=` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        entry = _entry(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            _extras(record),
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _dumps(entry)


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

    def flush(self) -> None:
        """Write out what is buffered (nothing, once closed)."""
        if not self.stream.closed:
            super().flush()

    def close(self) -> None:
        """Write out what is buffered and close the duplicated descriptor (once)."""
        try:
            if not self.stream.closed:
                self.flush()
                self.stream.close()
        finally:
            super().close()


# The JSON handler `configure` installed: `info_direct` writes to it.
_direct: BufferedHandler | None = None


def info_direct(logger: logging.Logger, msg: str, extras: dict[str, Any]) -> bool:
    """Write an INFO line for `logger` straight to the JSON output, without a LogRecord.

    For the request log line, logged on every RPC: building a LogRecord and
    passing it through the logging machinery cost several times what the line
    itself does. The line is the one JsonFormatter would write for the record.
    Only while logging is as `configure` left it: root's one handler is the JSON
    handler, no handler or filter in between, the standard record factory. Else
    it returns False and the caller logs a record as usual, so caplog, handlers
    added later and a record factory that adds fields (OpenTelemetry's) all
    still get it. The caller checks the level (`logger.isEnabledFor`).
    """
    sink = _direct
    if sink is None or not _unaltered(logger, sink):
        return False
    try:
        line = _dumps(_entry(time.time(), "info", logger.name, msg, extras))
        sink.acquire()
        try:
            sink.stream.write(line + sink.terminator)
        finally:
            sink.release()
    except Exception:  # noqa: BLE001 - the caller logs the record instead, which reports it
        return False
    return True


def _unaltered(logger: logging.Logger, sink: BufferedHandler) -> bool:
    """Whether a record of `logger` would reach `sink`, unfiltered, and only it."""
    if logger.filters or sink.filters or sink.level > logging.INFO:
        return False
    if not isinstance(sink.formatter, JsonFormatter):
        return False
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return False
    node = logger
    while node.parent is not None:
        if node.handlers or not node.propagate:
            return False
        node = node.parent
    return len(node.handlers) == 1 and node.handlers[0] is sink


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
    global _direct  # noqa: PLW0603 - the handler of the process-wide logging setup
    _direct = handler if fmt == "json" else None
    # uvicorn configures its own handlers unless told not to; keep one format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # uvicorn logs its start and stop at INFO under the name `uvicorn.error`;
    # httpserver.py logs them under the service's own names. Its warnings and errors
    # still come through.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
