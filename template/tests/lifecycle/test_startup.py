"""`serve` that cannot start: exit code 1 and one line naming the cause, no traceback.

docs/architecture.md promises it for a database that cannot be reached and for a port
that is taken; an orchestrator restarts on the exit code, an operator reads the line.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from running import Service, free_ports, spawn

# Start-up, the connection attempt (DB__CONNECT_TIMEOUT below) and teardown.
EXIT_WITHIN = 30.0


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on for the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def failed_start(service: Service) -> str:
    """The one error line of a start that failed with exit code 1."""
    code = await service.wait_exit(timeout=EXIT_WITHIN)
    assert code == 1, service.log()
    # grpc core may add a line of its own about the bind (logger `grpc`).
    errors = [e for e in service.entries() if e.get("level") == "error" and e["logger"] != "grpc"]
    assert len(errors) == 1, service.log()
    assert not [e for e in service.entries() if "exc" in e], service.log()
    service.assert_json_log()
    return str(errors[0]["msg"])


async def test_a_database_that_cannot_be_reached_exits_1_naming_it(tmp_path: Path) -> None:
    (closed,) = free_ports(1)  # nothing listens there
    url = f"postgresql://postgres@127.0.0.1:{closed}/nowhere"
    service = await spawn(url, tmp_path, env={"DB__CONNECT_TIMEOUT": "2"})
    try:
        message = await failed_start(service)
    finally:
        await service.stop()
    assert message.startswith("startup failed: cannot reach PostgreSQL"), message
    assert f"127.0.0.1:{closed}" in message, message


@pytest.mark.parametrize("port", ["GRPC_PORT", "ADMIN_PORT"])
async def test_a_port_that_is_taken_exits_1_naming_it(
    database_url: str, tmp_path: Path, port: str
) -> None:
    with taken_port() as taken:
        service = await spawn(database_url, tmp_path, env={port: str(taken)})
        try:
            message = await failed_start(service)
        finally:
            await service.stop()
    assert message.startswith("startup failed:"), message
    assert f"cannot listen on 127.0.0.1:{taken}" in message, message
    assert "serving" not in service.messages(), service.log()
