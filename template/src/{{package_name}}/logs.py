"""Logging: one JSON object per line in production, readable lines in a terminal.

Every line written while a request runs carries its request id, method and
transport, and its trace id and span id when the request is traced (from the
request scope). Output goes through a `Sink`: buffered, written
with non-blocking system calls at most every 0.2 s (at once for WARNING and worse),
and bounded: when nobody reads the output, lines beyond the buffer's bound are
dropped and counted rather than blocking the event loop, and the count is logged
once the output drains. In JSON mode, what C code writes to file descriptor 2
(grpc core's own lines) is captured and re-emitted as JSON lines (`capture_stderr`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

import orjson

from . import scope as request_scope

# Attributes every LogRecord has; anything else was passed through `extra=`.
# uvicorn adds `color_message`, a duplicate of the message with terminal colours.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

# Buffered output beyond this many bytes is dropped (and counted) until it drains.
BUFFER_LIMIT = 4 * 1024 * 1024
FLUSH_INTERVAL = 0.05


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _with_scope(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` plus the current request's id, method, transport and trace (unless present)."""
    current = request_scope.current.get()
    if current is not None and current.request_id:
        fields.setdefault("request_id", current.request_id)
        fields.setdefault("method", current.method)
        fields.setdefault("transport", current.transport)
        trace = current.trace
        if trace is not None:
            fields.setdefault("trace_id", trace[0])
            fields.setdefault("span_id", trace[1])
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


def _dumps(entry: dict[str, Any]) -> bytes:
    """`entry` as compact JSON; values JSON has no type for become their str()."""
    try:
        # orjson: a fifth of the stdlib encoder's cost, on the request log line.
        return orjson.dumps(entry, default=str)
    except TypeError:
        # What orjson refuses (an int beyond 64 bits, a non-str key): the stdlib
        # encoder takes anything, so a log call never fails on its fields.
        return _fallback.encode(entry).encode()


def _entry(
    created: float, level: str, logger: str, msg: str, extras: dict[str, Any]
) -> dict[str, Any]:
    """The JSON object of a log line, with the current request's fields."""
    return _with_scope(
        {"ts": _timestamp(created), "level": level, "logger": logger, "msg": msg, **extras}
    )


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; `extra=` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        return self.format_bytes(record).decode()

    def format_bytes(self, record: logging.LogRecord) -> bytes:
        """Render the record as UTF-8, without the str round trip."""
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
        fields = _with_scope(_extras(record))
        extras = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line}  {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


# --- output ----------------------------------------------------------------------------


def _open_output(fd: int) -> tuple[int, socket.socket | None]:
    """A descriptor to write descriptor `fd`'s output through without ever blocking.

    Pipes and terminals are opened again through /proc, which gives a file
    description of our own: setting O_NONBLOCK on a plain dup() would change it for
    every other writer of the same pipe (`print`, C libraries), which would then see
    EAGAIN errors. A socket (journald's stdout) is written with MSG_DONTWAIT. A
    regular file never blocks for long and is used as it is.
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        with contextlib.suppress(OSError):
            flags = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
            return os.open(f"/proc/self/fd/{fd}", flags), None
    duplicate = os.dup(fd)
    if stat.S_ISSOCK(mode):
        return duplicate, socket.socket(fileno=duplicate)
    return duplicate, None


class Sink:
    """The process's log output: buffered, written without blocking, bounded.

    `write` appends a line (at once to the descriptor when `urgent`); `flush`
    writes what it can without blocking. Thread-safe: records may come from other
    threads. When the buffer would exceed `limit`, lines are dropped and counted;
    `notice(count)` renders the line that reports them once output drains.
    """

    def __init__(
        self,
        fd: int,
        *,
        notice: Callable[[int], bytes],
        limit: int = BUFFER_LIMIT,
    ) -> None:
        self._fd, self._socket = _open_output(fd)
        self._notice = notice
        self._limit = limit
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self.dropped = 0
        # Every line ever dropped (for metrics); `dropped` restarts once reported.
        self.dropped_total = 0
        self.closed = False

    def write(self, line: bytes, *, urgent: bool = False) -> None:
        """Queue one line (with its newline); write it out now if `urgent`."""
        with self._lock:
            if len(self._buffer) + len(line) > self._limit:
                self.dropped += 1
                self.dropped_total += 1
                return
            self._buffer += line
            if urgent:
                self._flush()

    def flush(self) -> None:
        """Write out as much as the output takes without blocking."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        buffer = self._buffer
        while not self.closed:
            if not buffer:
                if not self.dropped:
                    return
                # Drained after dropping: say how much was lost, once.
                dropped, self.dropped = self.dropped, 0
                buffer += self._notice(dropped)
            try:
                if self._socket is not None:
                    written = self._socket.send(buffer, socket.MSG_DONTWAIT)
                else:
                    written = os.write(self._fd, buffer)
            except BlockingIOError:
                return  # the reader is behind: keep it, try again later
            except InterruptedError:
                continue
            except OSError:
                # Nobody can ever read it (EPIPE, EBADF): drop it, uncounted.
                buffer.clear()
                self.dropped = 0
                return
            del buffer[:written]

    def close(self) -> None:
        """Write out what is left (blocking, at most a second), then close."""
        with self._lock:
            if self.closed:
                return
            deadline = time.monotonic() + 1.0
            while self._buffer and time.monotonic() < deadline:
                self._flush()
                if self._buffer:
                    time.sleep(0.01)
            self.closed = True
            if self._socket is not None:
                self._socket.close()
            else:
                os.close(self._fd)


class SinkHandler(logging.Handler):
    """Writes formatted records to a `Sink`: WARNING and worse at once, the rest buffered."""

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        """Format and queue the record."""
        try:
            formatter = self.formatter
            if isinstance(formatter, JsonFormatter):
                line = formatter.format_bytes(record)
            else:
                line = self.format(record).encode("utf-8", "backslashreplace")
            self.sink.write(line + b"\n", urgent=record.levelno >= logging.WARNING)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never raise; report like logging does
            self.handleError(record)

    def flush(self) -> None:
        """Write out what is buffered, queued request lines included."""
        if self is _direct:
            write_requests()
        self.sink.flush()

    def close(self) -> None:
        """Write out what is buffered and close the output (once)."""
        try:
            if self is _direct:
                write_requests()
            self.sink.close()
        finally:
            super().close()


# The JSON handler `configure` installed: request lines are written to it directly.
_direct: SinkHandler | None = None
# A finished request, as the request chain reports it: (ended, started, method,
# transport, code, request id, extra fields); times in the loop's clock
# (time.monotonic), `code` an enum whose name is the status.
Finished: TypeAlias = tuple[float, float, str, str, enum.Enum, str, Mapping[str, object]]
# Requests whose line is still to be written, with their logger.
_finished: collections.deque[tuple[logging.Logger, Finished]] = collections.deque()
# Lines formatted per turn of the event loop: a flush formats a few hundred, and in
# one go that would hold up requests for milliseconds.
CHUNK = 32


def request(logger: logging.Logger, finished: Finished) -> None:
    """Log the one INFO line of a finished request.

    With the JSON output `configure` sets up, the line is only queued here and
    written with the others when the output is flushed (every FLUSH_INTERVAL, at
    WARNING, at exit): formatting lines in a batch, away from the request, costs
    a fraction of formatting each in the middle of the request's own work. Its
    timestamp is when the request ended, so lines of other loggers may come out
    of order between two flushes. Without that setup (tests, tools) the line is
    logged at once as a record.
    """
    handler = _direct
    if handler is not None and not handler.sink.closed:
        _finished.append((logger, finished))
    elif logger.isEnabledFor(logging.INFO):
        _record(logger, time.time() - time.monotonic(), finished)


# Names of the codes seen: an enum's `.name` is a descriptor call, a dict lookup less.
_code_names: dict[enum.Enum, str] = {}


def _fields(finished: Finished) -> dict[str, Any]:
    ended, started, method, transport, code, request_id, extra = finished
    name = _code_names.get(code)
    if name is None:
        name = _code_names[code] = code.name
    return {
        "method": method,
        "transport": transport,
        "code": name,
        "duration_ms": round((ended - started) * 1000, 3),
        "request_id": request_id,
        **extra,
    }


def _record(logger: logging.Logger, wall: float, finished: Finished) -> None:
    record = logger.makeRecord(
        logger.name, logging.INFO, __file__, 0, "request", (), None, extra=_fields(finished)
    )
    record.created = finished[0] + wall
    logger.handle(record)


def write_requests(limit: int | None = None) -> None:
    """Write the queued request lines (at most `limit` of them).

    They go straight to the output while logging is as `configure` left it, else
    as records through whatever it became. Straight to the output, a line is the
    one JsonFormatter would write for the record, without a LogRecord and the
    logging machinery, which cost several times the line itself. Records instead
    reach handlers added later, filters, and record factories that add fields
    (OpenTelemetry's).
    """
    if not _finished:
        return
    count = len(_finished) if limit is None else min(limit, len(_finished))
    batch = [_finished.popleft() for _ in range(count)]
    handler = _direct
    wall = time.time() - time.monotonic()
    lines = bytearray()
    # Per logger: None when it is not enabled for INFO, else whether lines go direct.
    routes: dict[logging.Logger, bool | None] = {}
    for logger, finished in batch:
        if logger in routes:
            direct = routes[logger]
        else:
            enabled = logger.isEnabledFor(logging.INFO)
            direct = routes[logger] = (
                None if not enabled else handler is not None and _unaltered(logger, handler)
            )
        if direct is None:
            continue
        if not direct:
            _record(logger, wall, finished)
            continue
        entry = {
            "ts": _timestamp(finished[0] + wall),
            "level": "info",
            "logger": logger.name,
            "msg": "request",
        }
        entry.update(_fields(finished))
        lines += _dumps(entry)
        lines += b"\n"
    if lines and handler is not None:
        handler.sink.write(bytes(lines))


def _unaltered(logger: logging.Logger, handler: SinkHandler) -> bool:
    """Whether a record of `logger` would reach `handler`, unfiltered, and only it."""
    if logger.filters or handler.filters or handler.level > logging.INFO:
        return False
    if not isinstance(handler.formatter, JsonFormatter):
        return False
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return False
    node = logger
    while node.parent is not None:
        if node.handlers or not node.propagate:
            return False
        node = node.parent
    return len(node.handlers) == 1 and node.handlers[0] is handler


async def flush_periodically(interval: float = FLUSH_INTERVAL) -> None:
    """Flush the root handlers every `interval` seconds (a task; cancel to stop).

    Queued request lines are formatted CHUNK at a time, with a turn of the event
    loop between chunks, so requests never wait for a whole batch.
    """
    try:
        while True:
            await asyncio.sleep(interval)
            while _finished:
                write_requests(CHUNK)
                await asyncio.sleep(0)
            for handler in logging.getLogger().handlers:
                handler.flush()
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()


def _notice(fmt: str) -> Callable[[int], bytes]:
    def render(count: int) -> bytes:
        made = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "log lines dropped: the output was not read fast enough",
                "dropped": count,
            }
        )
        formatter = JsonFormatter() if fmt == "json" else ConsoleFormatter()
        return formatter.format(made).encode("utf-8", "backslashreplace") + b"\n"

    return render


def sink() -> Sink | None:
    """The output `configure` set up, if logging is still as it left it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, SinkHandler):
            return handler.sink
    return None


def configure(*, level: str, fmt: str) -> None:
    """Send all logs to stderr in the chosen format (replaces existing handlers)."""
    # Descriptor 2 itself: sys.stderr may have been replaced (by pytest, for one).
    handler = SinkHandler(Sink(2, notice=_notice(fmt)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    # Nothing here reads thread, process or task names: skip collecting them for
    # every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, SinkHandler):
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
    # Expected while a dependency is out, each with a traceback every time: asyncpg's
    # pool failing to reopen its minimum of connections, and asyncio reporting a
    # connection lost under a future nobody awaited (a connect cut short by a server
    # that shut down). One line per interval, with the error and a count instead.
    # grpc.aio too, when the answer to a call whose client had gone cannot be sent
    # (ExecuteBatchError, logged by grpc's own code after the handler returned).
    expected = (
        ("asyncpg.pool", (Exception,)),
        ("asyncio", (ConnectionError,)),
        ("grpc._cython.cygrpc", (Exception,)),
    )
    for name, kinds in expected:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, ExpectedFailures)]
        logger.addFilter(ExpectedFailures(kinds))


# --- what C code writes to stderr --------------------------------------------------------

# grpc core (abseil) writes lines such as
# "E1129 20:40:43.123456   12345 hpack_parser.cc:999] message".
_NATIVE_LINE = re.compile(
    r"(?P<level>[DIWEF])\d{4} [0-9:.]+\s+\d+ (?P<source>[^ \]]+:\d+)\] ?(?P<msg>.*)"
)
_NATIVE_LEVELS = {
    "D": logging.DEBUG,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
_MAX_LINE = 64 * 1024


@contextlib.contextmanager
def capture_stderr(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Re-emit what is written to descriptor 2 as log records, for the block.

    grpc core and other C libraries write their own plain-text lines to stderr,
    which would break a stream of one JSON object per line. Descriptor 2 becomes a
    pipe read by the event loop: each line is logged by the logger `grpc` (with
    its level and source location when it has grpc's prefix) or `stderr`. The pipe
    does not block writers: if the loop cannot keep up, C writers lose lines
    instead of stalling their threads. Call it after `configure`, which keeps its
    own handle on the original stderr.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    pending = bytearray()

    def drain() -> None:
        try:
            data = os.read(read_end, _MAX_LINE)
        except BlockingIOError:
            return
        pending.extend(data)
        *lines, rest = pending.split(b"\n")
        if len(rest) > _MAX_LINE:
            lines.append(rest)
            rest = bytearray()
        pending[:] = rest
        for line in lines:
            _log_native(line.decode("utf-8", "backslashreplace").rstrip("\r"))

    loop.add_reader(read_end, drain)
    try:
        yield
    finally:
        loop.remove_reader(read_end)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(BlockingIOError):
            drain()
        if pending:
            _log_native(pending.decode("utf-8", "backslashreplace"))
        os.close(read_end)


def _log_native(line: str) -> None:
    if not line.strip():
        return
    match = _NATIVE_LINE.fullmatch(line)
    if match is None:
        logging.getLogger("stderr").warning(line)
        return
    # grpc core writes a line per malformed request (an unparsable header, say): one
    # line per source location and NATIVE_INTERVAL, with a count of those held back.
    held = _native_log.allow(match["source"])
    if held is None:
        return
    level = _NATIVE_LEVELS[match["level"]]
    extra = {"source": match["source"], "suppressed": held}
    logging.getLogger("grpc").log(level, match["msg"], extra=extra)


class Throttle:
    """At most one log line per key and `interval`, with a count of what was held back.

    For conditions that repeat on every request while they last (a dependency down,
    clients that went away): one line per state change or per interval, never a
    line per request.
    """

    def __init__(
        self, interval: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to hold this line back; else how many lines of `key` were held since the last."""
        now = self._clock()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self._interval
        return self._held.pop(key, 0)

    def reset(self, key: str) -> int:
        """Forget `key` (its condition ended): returns how many lines were held back."""
        self._next.pop(key, None)
        return self._held.pop(key, 0)


class ExpectedFailures(logging.Filter):
    """Lines a library writes with a traceback each time an expected failure recurs.

    A record (ERROR or lower) whose exception is one of `kinds` passes at most once
    per `interval`, logger and first line of its message, as a WARNING with `error` (the
    exception's type and text) and `suppressed` (how many were held back) instead
    of the traceback. Anything else passes unchanged.
    """

    def __init__(
        self, kinds: tuple[type[BaseException], ...] = (Exception,), interval: float = 10.0
    ) -> None:
        super().__init__()
        self._kinds = kinds
        self._throttle = Throttle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass `record` as it is, or as a throttled warning without its traceback."""
        failure = record.exc_info[1] if record.exc_info else None
        if record.levelno > logging.ERROR or not isinstance(failure, self._kinds):
            return True
        message = record.getMessage().partition("\n")[0]
        # grpc names the call's operation objects after the method ("[/pkg.S/M] ...
        # object at 0x..."): the throttle keeps one key per method, not per call.
        head, bracket, _ = message.partition("]")
        message = head + bracket
        held = self._throttle.allow(f"{record.name}:{message}")
        if held is None:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = message, None
        record.error = f"{type(failure).__name__}: {failure}".rstrip(": ")
        record.suppressed = held
        record.exc_info = None
        record.exc_text = None
        return True


NATIVE_INTERVAL = 10.0
_native_log = Throttle(interval=NATIVE_INTERVAL)
