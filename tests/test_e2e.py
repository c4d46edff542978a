"""End to end: the default project runs as a real process, driven by real clients.

The database gets migrated with the documented `uv run acme-items migrate`; the
service runs from its console script (one process, so a signal reaches only it)
on free loopback ports. Clients are real gRPC channels using the stubs the
project generated at install time. A request is made slow at the database: the
test holds a lock the request has to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import psutil
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import run, tool_env

pytestmark = pytest.mark.slow

SLUG = "acme-items"
PACKAGE = "acme_items"
SERVICE = "acme.items.v1.ItemService"
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DRAIN = 1.0
GRACE = 3.0
# Slack for process start-up and teardown on a busy CI machine.
MARGIN = 1.5
STARTUP_TIMEOUT = 30.0
RPC_TIMEOUT = 5.0
# Idle resident memory above this is a regression worth a look (about 60 MiB today).
RSS_LIMIT = 150 * 2**20


@dataclass(frozen=True)
class Api:
    """The generated message and stub modules of the default project."""

    pb2: ModuleType
    grpc: ModuleType


@dataclass
class Service:
    """A running `serve` process and the file its output goes to."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    admin_port: int
    http_port: int
    log_path: Path
    idle_rss: dict[str, int] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The gRPC address."""
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        """The output so far, for failure messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-60:])

    def messages(self) -> list[str]:
        """The `msg` of every JSON log line so far."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                found.append(str(json.loads(line)["msg"]))
        return found

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails the test when the process outlives `timeout`."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not exit within {timeout} s; output:\n{self.log()}")


def _url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(statement, timeout=30)
    finally:
        await conn.close(timeout=10)


@pytest.fixture(scope="module")
def api(default_project: Path) -> Iterator[Api]:
    """The project's generated stubs, importable for the duration of this module."""
    src = str(default_project / "src")
    sys.path.insert(0, src)
    try:
        yield Api(
            importlib.import_module(f"{PACKAGE}.v1.items_pb2"),
            importlib.import_module(f"{PACKAGE}.v1.items_pb2_grpc"),
        )
    finally:
        sys.path.remove(src)
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def database_url(default_project: Path) -> Iterator[str]:
    """A new database, migrated by the project's own CLI; dropped at the end."""
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at TEST_DATABASE_URL={ADMIN_URL}: {exc}")
    try:
        migrated = run(
            ["uv", "run", SLUG, "migrate"],
            default_project,
            timeout=300,
            DATABASE_URL=_url(name),
            LOG__FORMAT="json",
        )
        assert "database is up to date" in migrated.stderr, migrated.stderr
        yield _url(name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _start(project: Path, database_url: str, tmp: Path) -> Service:
    grpc_port, admin_port, http_port = _free_ports(3)
    env = tool_env(
        DATABASE_URL=database_url,
        GRPC_PORT=str(grpc_port),
        ADMIN_PORT=str(admin_port),
        HTTP_PORT=str(http_port),
        GRPC__HOST="127.0.0.1",
        ADMIN__HOST="127.0.0.1",
        GATEWAY__HOST="127.0.0.1",
        SHUTDOWN__DRAIN=str(DRAIN),
        SHUTDOWN__GRACE=str(GRACE),
        LOG__FORMAT="json",
        LOG__LEVEL="INFO",
    )
    log_path = tmp / f"service-{grpc_port}.log"
    with log_path.open("wb") as log:
        # The script itself, not `uv run`: uv would stand between the test and the
        # service and forward signals. cwd is scratch so a developer's .env is not read.
        process = subprocess.Popen(
            [str(project / ".venv" / "bin" / SLUG), "serve"],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Service(process, grpc_port, admin_port, http_port, log_path)


def _ready(service: Service) -> bool:
    """Wait for /readyz 200: True once ready, False when a port was taken meanwhile."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if service.process.poll() is not None:
            if "cannot listen" in service.log():
                return False
            pytest.fail(f"the service exited {service.process.returncode}:\n{service.log()}")
        with contextlib.suppress(OSError):
            if _http_status(service.admin_port, "/readyz") == 200:
                return True
        if time.monotonic() > deadline:
            pytest.fail(f"not ready within {STARTUP_TIMEOUT} s; output:\n{service.log()}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(project: Path, database_url: str, tmp: Path) -> Iterator[Service]:
    """The service started from its console script, ready (/readyz 200); killed at the end."""
    # Another process may grab a free port before the service binds it: retry then.
    for _ in range(3):
        service = _start(project, database_url, tmp)
        try:
            if _ready(service):
                yield service
                return
        finally:
            if service.process.poll() is None:
                service.process.kill()
            service.process.wait(timeout=10)
    pytest.fail(f"no free ports after 3 attempts; output:\n{service.log()}")


@pytest.fixture(scope="module")
def service(
    default_project: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service process for the request-level tests; its idle memory is measured first."""
    with serving(default_project, database_url, tmp_path_factory.mktemp("e2e")) as running:
        # Let start-up work (first probes, lazy imports) settle before measuring.
        time.sleep(1.0)
        info = psutil.Process(running.process.pid).memory_full_info()
        running.idle_rss = {"rss": info.rss, "uss": info.uss}
        yield running


@contextlib.asynccontextmanager
async def _locked(database_url: str, statement: str, *args: object) -> AsyncIterator[None]:
    """Hold the lock `statement` takes, in an open transaction, for the block."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute("BEGIN")
        await conn.execute(statement, *args)
        yield
    finally:
        # Closing the session ends the transaction, and so the lock.
        await conn.close(timeout=10)


async def _lock_waiters(conn: asyncpg.Connection) -> int:
    """Queries of the service that wait for a lock in PostgreSQL right now."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND state = 'active' AND wait_event_type = 'Lock'",
            SLUG,
        )
    )


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(response.status)


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    """The status code a call ends with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_idle_service_memory_is_reported(
    service: Service, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Resident memory of the idle service after start-up, printed and saved as JSON."""
    rss, uss = service.idle_rss["rss"], service.idle_rss["uss"]
    report = {"idle_rss_bytes": rss, "idle_uss_bytes": uss, "idle_rss_mib": round(rss / 2**20, 1)}
    path = tmp_path_factory.getbasetemp() / "e2e-metrics.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nidle service memory: RSS {rss / 2**20:.1f} MiB, USS {uss / 2**20:.1f} MiB ({path})")
    assert 10 * 2**20 < rss < RSS_LIMIT, report


async def _crud(target: str, api: Api) -> None:
    pb2 = api.pb2
    async with grpc.aio.insecure_channel(target) as channel:
        items = api.grpc.ItemServiceStub(channel)

        # Create: the server assigns id, times and etag; a retry with the same
        # request_id returns the first item instead of creating a second one.
        request_id = str(uuid.uuid4())
        first = await items.CreateItem(
            pb2.CreateItemRequest(
                item=pb2.Item(name="e2e-0", description="first"), request_id=request_id
            ),
            timeout=RPC_TIMEOUT,
        )
        uuid.UUID(first.id)
        assert first.etag
        assert first.create_time.seconds > 0
        retried = await items.CreateItem(
            pb2.CreateItemRequest(item=pb2.Item(name="e2e-0"), request_id=request_id),
            timeout=RPC_TIMEOUT,
        )
        assert retried.id == first.id
        created = [first] + [
            await items.CreateItem(
                pb2.CreateItemRequest(item=pb2.Item(name=f"e2e-{i}")), timeout=RPC_TIMEOUT
            )
            for i in range(1, 5)
        ]
        invalid = items.CreateItem(pb2.CreateItemRequest(item=pb2.Item(name="")), timeout=5)
        assert await _code(invalid) == grpc.StatusCode.INVALID_ARGUMENT

        # Get.
        got = await items.GetItem(pb2.GetItemRequest(id=first.id), timeout=RPC_TIMEOUT)
        assert got == first

        # List: pages of 2 walk every item once, oldest first.
        listed: list[str] = []
        token, pages = "", 0
        while True:
            page = await items.ListItems(
                pb2.ListItemsRequest(page_size=2, page_token=token), timeout=RPC_TIMEOUT
            )
            assert len(page.items) <= 2
            listed += [item.id for item in page.items]
            pages += 1
            token = page.next_page_token
            if not token:
                break
            assert pages < 50, "ListItems never returned an empty next_page_token"
        ours = [item.id for item in created]
        assert [i for i in listed if i in ours] == ours
        assert len(listed) == len(set(listed))
        assert pages >= 3

        # Update: with the current etag, then with the stale one, then with none.
        stale = first.etag
        renamed = await items.UpdateItem(
            pb2.UpdateItemRequest(
                item=pb2.Item(id=first.id, name="renamed", etag=stale),
                update_mask=FieldMask(paths=["name"]),
            ),
            timeout=RPC_TIMEOUT,
        )
        assert (renamed.name, renamed.description) == ("renamed", "first")
        assert renamed.etag != stale
        conflict = items.UpdateItem(
            pb2.UpdateItemRequest(
                item=pb2.Item(id=first.id, name="lost", etag=stale),
                update_mask=FieldMask(paths=["name"]),
            ),
            timeout=RPC_TIMEOUT,
        )
        assert await _code(conflict) == grpc.StatusCode.ABORTED
        blind = await items.UpdateItem(
            pb2.UpdateItemRequest(
                item=pb2.Item(id=first.id, description="second"),
                update_mask=FieldMask(paths=["description"]),
            ),
            timeout=RPC_TIMEOUT,
        )
        assert (blind.name, blind.description) == ("renamed", "second")

        # Delete: a stale etag is refused, the current one deletes, then it is gone.
        refused = items.DeleteItem(pb2.DeleteItemRequest(id=first.id, etag=stale), timeout=5)
        assert await _code(refused) == grpc.StatusCode.ABORTED
        await items.DeleteItem(pb2.DeleteItemRequest(id=first.id, etag=blind.etag), timeout=5)
        gone = items.GetItem(pb2.GetItemRequest(id=first.id), timeout=RPC_TIMEOUT)
        assert await _code(gone) == grpc.StatusCode.NOT_FOUND
        again = items.DeleteItem(pb2.DeleteItemRequest(id=first.id), timeout=RPC_TIMEOUT)
        assert await _code(again) == grpc.StatusCode.NOT_FOUND


def test_item_api_create_get_list_update_delete(service: Service, api: Api) -> None:
    """The example API over a real connection: CRUD, pagination, etags, idempotency."""
    asyncio.run(_crud(service.target, api))


async def _health_and_reflection(
    target: str,
) -> tuple[list[int], list[str], descriptor_pb2.FileDescriptorProto]:
    async with grpc.aio.insecure_channel(target) as channel:
        statuses = [await _health(channel), await _health(channel, SERVICE)]
        unknown = _health(channel, "no.such.Service")
        assert await _code(unknown) == grpc.StatusCode.NOT_FOUND

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        stream = reflect.ServerReflectionInfo(timeout=RPC_TIMEOUT)
        await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await stream.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
        await stream.done_writing()
        listed = await stream.read()
        described = await stream.read()
        assert await stream.read() is grpc.aio.EOF
    names = [s.name for s in listed.list_services_response.service]
    files = described.file_descriptor_response.file_descriptor_proto
    assert files, described
    return statuses, names, descriptor_pb2.FileDescriptorProto.FromString(files[0])


def test_health_reports_serving_and_reflection_lists_the_api(service: Service) -> None:
    """grpc.health.v1 says SERVING; reflection lists and describes the item service."""
    statuses, names, descriptor = asyncio.run(_health_and_reflection(service.target))
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert SERVICE in names, names
    assert "grpc.health.v1.Health" in names, names
    package, _, name = SERVICE.rpartition(".")
    assert descriptor.package == package
    methods = {s.name: [m.name for m in s.method] for s in descriptor.service}
    assert methods[name] == ["CreateItem", "GetItem", "ListItems", "UpdateItem", "DeleteItem"]
    assert _http_status(service.admin_port, "/healthz") == 200
    assert _http_status(service.admin_port, "/readyz") == 200


async def _deadline_during_slow_query(
    target: str, api: Api, database_url: str
) -> tuple[grpc.StatusCode, float, bool, int]:
    pb2 = api.pb2
    observer = await asyncpg.connect(database_url, timeout=10)
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            items = api.grpc.ItemServiceStub(channel)
            item = await items.CreateItem(
                pb2.CreateItemRequest(item=pb2.Item(name="slow")), timeout=RPC_TIMEOUT
            )
            async with _locked(database_url, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE"):
                started = time.monotonic()
                call = items.GetItem(pb2.GetItemRequest(id=item.id), timeout=0.5)
                # Prove the query reached PostgreSQL and waits there for the lock.
                blocked = False
                while not call.done() and time.monotonic() - started < 2:
                    blocked = blocked or await _lock_waiters(observer) > 0
                    await asyncio.sleep(0.01)
                code = await _code(call)
                took = time.monotonic() - started
                # With the lock still held, the query must be gone from the server:
                # cancelled, not left waiting (or running on) after the caller gave up.
                waiting = await _lock_waiters(observer)
                until = time.monotonic() + 1.0
                while waiting and time.monotonic() < until:
                    await asyncio.sleep(0.05)
                    waiting = await _lock_waiters(observer)
            # The connection went back to the pool in a usable state.
            again = await items.GetItem(pb2.GetItemRequest(id=item.id), timeout=RPC_TIMEOUT)
            assert again.id == item.id
            await items.DeleteItem(pb2.DeleteItemRequest(id=item.id), timeout=RPC_TIMEOUT)
    finally:
        await observer.close(timeout=10)
    return code, took, blocked, waiting


def test_deadline_expiring_in_a_slow_query_cancels_it_in_postgres(
    service: Service, api: Api, database_url: str
) -> None:
    """A 0.5 s deadline hits a query blocked on a lock: DEADLINE_EXCEEDED, query cancelled."""
    code, took, blocked, waiting = asyncio.run(
        _deadline_during_slow_query(service.target, api, database_url)
    )
    assert blocked, "GetItem never waited for the lock: the test proved nothing"
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's own deadline ends its wait; MARGIN covers a busy machine.
    assert took < 0.5 + MARGIN, f"DEADLINE_EXCEEDED after {took:.2f} s"
    assert waiting == 0, "the query still waits for the lock after the deadline"


async def _sigterm_with_request_in_flight(
    service: Service, api: Api, database_url: str
) -> tuple[float, str, list[int]]:
    pb2 = api.pb2
    observer = await asyncpg.connect(database_url, timeout=10)
    try:
        async with grpc.aio.insecure_channel(service.target) as channel:
            items = api.grpc.ItemServiceStub(channel)
            item = await items.CreateItem(
                pb2.CreateItemRequest(item=pb2.Item(name="in flight")), timeout=RPC_TIMEOUT
            )
            lock = "SELECT 1 FROM items WHERE id = $1 FOR UPDATE"
            async with _locked(database_url, lock, uuid.UUID(item.id)):
                in_flight = items.UpdateItem(
                    pb2.UpdateItemRequest(
                        item=pb2.Item(id=item.id, name="finished"),
                        update_mask=FieldMask(paths=["name"]),
                    ),
                    timeout=20,
                )
                try:
                    until = time.monotonic() + 10
                    while not await _lock_waiters(observer):
                        assert time.monotonic() < until, "UpdateItem never waited for the lock"
                        await asyncio.sleep(0.02)
                    service.process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                    # Draining: health says NOT_SERVING while requests are still served.
                    statuses = [await _health(channel)]
                    until = time.monotonic() + DRAIN
                    while statuses[-1] != health_pb2.HealthCheckResponse.NOT_SERVING:
                        assert time.monotonic() < until, f"health stayed {statuses}"
                        await asyncio.sleep(0.01)
                        statuses.append(await _health(channel))
                    fetched = await items.GetItem(pb2.GetItemRequest(id=item.id), timeout=DRAIN)
                    assert fetched.name == "in flight"
                    # Keep the request waiting past the drain, into the grace period.
                    until = time.monotonic() + DRAIN + MARGIN
                    while "stopping listeners" not in service.messages():
                        assert time.monotonic() < until, service.log()
                        await asyncio.sleep(0.02)
                    assert not in_flight.done()
                except BaseException:
                    in_flight.cancel()
                    raise
            # The lock is released: the in-flight request completes within the grace.
            finished = await asyncio.wait_for(in_flight, GRACE)
    finally:
        await observer.close(timeout=10)
    return signalled, finished.name, statuses


def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(
    default_project: Path, api: Api, database_url: str, tmp_path: Path
) -> None:
    """SIGTERM: NOT_SERVING while draining, the in-flight request completes, exit code 0."""
    with serving(default_project, database_url, tmp_path) as running:
        signalled, name, statuses = asyncio.run(
            _sigterm_with_request_in_flight(running, api, database_url)
        )
        code = running.wait_exit(timeout=DRAIN + GRACE + MARGIN)
        took = time.monotonic() - signalled
    assert name == "finished"
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == 0, running.log()
    assert took < DRAIN + GRACE + MARGIN, f"shutdown took {took:.2f} s"
    messages = running.messages()
    assert messages.count("database pool closed") == 1, running.log()
    assert messages[-1] == "shutdown complete", running.log()


# --- over HTTP, through the gateway ----------------------------------------------------


def _call(  # noqa: PLR0913 - one request, all of it
    port: int,
    method: str,
    path: str,
    body: object = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = RPC_TIMEOUT,
) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of one request to the gateway (a new connection)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout + 5)
    try:
        payload = None if body is None else json.dumps(body).encode()
        sent = dict(headers or {})
        if payload is not None:
            sent["Content-Type"] = "application/json"
        connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
        return response.status, found, json.loads(raw) if raw else None
    finally:
        connection.close()


def test_the_gateway_serves_crud_paging_etags_errors_and_deadlines(
    service: Service, database_url: str
) -> None:
    """The example API over HTTP with a real client, as the README's curl lines use it."""
    port = service.http_port
    status, headers, first = _call(port, "POST", "/v1/items", {"name": "http-0"})
    assert status == 200, first
    uuid.UUID(first["id"])
    assert len(headers["x-request-id"]) == 16
    for n in range(1, 5):
        assert _call(port, "POST", "/v1/items", {"name": f"http-{n}"})[0] == 200
    assert _call(port, "GET", f"/v1/items/{first['id']}")[2] == first
    # Pages of 2 walk every item once.
    listed, token, pages = [], "", 0
    while True:
        query = f"?pageSize=2&pageToken={token}" if token else "?pageSize=2"
        status, _, page = _call(port, "GET", f"/v1/items{query}")
        assert status == 200, page
        listed += [item["id"] for item in page["items"]]
        token, pages = page["nextPageToken"], pages + 1
        if not token:
            break
        assert pages < 50
    assert first["id"] in listed
    assert len(listed) == len(set(listed))
    # Update with the current etag, then with the stale one.
    path = f"/v1/items/{first['id']}?updateMask=name"
    status, _, renamed = _call(port, "PATCH", path, {"name": "renamed", "etag": first["etag"]})
    assert (status, renamed["name"]) == (200, "renamed")
    status, _, conflict = _call(port, "PATCH", path, {"name": "lost", "etag": first["etag"]})
    assert (status, conflict["code"]) == (409, 10)
    # Errors: a google.rpc.Status with field violations, the canonical HTTP statuses.
    status, _, invalid = _call(port, "POST", "/v1/items", {"name": ""})
    assert status == 400
    assert invalid["details"][0]["fieldViolations"][0]["field"] == "item.name"
    assert _call(port, "GET", f"/v1/items/{uuid.uuid4()}")[0] == 404
    assert _call(port, "PUT", "/v1/items")[0] == 405
    assert _call(port, "GET", "/v1/nowhere")[0] == 404
    assert _call(port, "GET", "/v1/items", headers={"grpc-timeout": "soon"})[0] == 400
    # A deadline from grpc-timeout expires in a query blocked on a lock: 504, in time.
    # (A list: a GetItem of this item may be answered from the Redis cache.)
    result: dict[str, Any] = {}

    async def slow() -> None:
        async with _locked(database_url, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE"):
            started = time.monotonic()
            result["status"], _, result["body"] = await asyncio.to_thread(
                _call, port, "GET", "/v1/items", headers={"grpc-timeout": "500m"}
            )
            result["took"] = time.monotonic() - started

    asyncio.run(slow())
    assert (result["status"], result["body"]["code"]) == (504, 4)
    # No deadline on the HTTP client: without the server's, the request would wait for
    # the lock until the client's timeout. MARGIN covers a busy machine.
    assert result["took"] < 0.5 + MARGIN
    assert _call(port, "DELETE", f"/v1/items/{first['id']}?etag={renamed['etag']}")[0] == 200
    assert _call(port, "GET", f"/v1/items/{first['id']}")[0] == 404
    requests = [
        line
        for line in service.log_path.read_text().splitlines()
        if '"transport":"http"' in line.replace(" ", "")
    ]
    assert requests, "no request line with transport http"


def test_the_readme_curl_examples_work_against_the_service(
    default_project: Path, service: Service
) -> None:
    """Each curl line of the README, run as written against the running gateway."""
    readme = (default_project / "README.md").read_text(encoding="utf-8")
    text = readme[readme.index("With curl") :]
    lines = [line for line in text.splitlines() if line.startswith("curl ") and ":8080/" in line]
    assert len(lines) == 5, lines
    item_id = ""
    outputs = []
    for line in lines:
        command = line.replace("127.0.0.1:8080", f"127.0.0.1:{service.http_port}")
        command = command.replace("ITEM_ID", item_id)
        proc = subprocess.run(
            ["bash", "-c", command + " -w '\\n%{http_code}'"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        body, _, code = proc.stdout.rpartition("\n")
        assert code == "200", (command, proc.stdout)
        outputs.append(json.loads(body))
        if not item_id:
            item_id = outputs[0]["id"]
    created, listed, got, renamed, deleted = outputs
    assert created["name"] == "first"
    assert item_id in [item["id"] for item in listed["items"]]
    assert got == created
    assert renamed["name"] == "renamed"
    assert deleted == {}


async def _sigterm_with_http_in_flight(
    service: Service, database_url: str
) -> tuple[float, int, str, str]:
    observer = await asyncpg.connect(database_url, timeout=10)
    try:
        _, _, item = await asyncio.to_thread(
            _call, service.http_port, "POST", "/v1/items", {"name": "in flight"}
        )
        lock = "SELECT 1 FROM items WHERE id = $1 FOR UPDATE"
        async with _locked(database_url, lock, uuid.UUID(item["id"])):
            in_flight = asyncio.create_task(
                asyncio.to_thread(
                    _call,
                    service.http_port,
                    "PATCH",
                    f"/v1/items/{item['id']}?updateMask=name",
                    {"name": "finished"},
                    headers={"grpc-timeout": "20S"},
                    timeout=20,
                )
            )
            until = time.monotonic() + 10
            while not await _lock_waiters(observer):
                assert time.monotonic() < until, "UpdateItem never waited for the lock"
                await asyncio.sleep(0.02)
            service.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # Draining: the gateway still serves.
            status, _, _ = await asyncio.to_thread(
                _call, service.http_port, "GET", f"/v1/items/{item['id']}"
            )
            assert status == 200
            until = time.monotonic() + DRAIN + MARGIN
            while "stopping listeners" not in service.messages():
                assert time.monotonic() < until, service.log()
                await asyncio.sleep(0.02)
            assert not in_flight.done()
        status, headers, body = await asyncio.wait_for(in_flight, GRACE)
    finally:
        await observer.close(timeout=10)
    return signalled, status, body["name"], headers.get("connection", "")


def test_sigterm_lets_the_in_flight_http_request_finish_and_exits_0(
    default_project: Path, database_url: str, tmp_path: Path
) -> None:
    """SIGTERM: the gateway serves during the drain, then finishes its request, exit 0."""
    with serving(default_project, database_url, tmp_path) as running:
        signalled, status, name, connection = asyncio.run(
            _sigterm_with_http_in_flight(running, database_url)
        )
        code = running.wait_exit(timeout=DRAIN + GRACE + MARGIN + 1)
        took = time.monotonic() - signalled
    assert (status, name, connection) == (200, "finished", "close")
    assert code == 0, running.log()
    assert took < DRAIN + GRACE + MARGIN + 1, f"shutdown took {took:.2f} s"
    assert running.messages()[-1] == "shutdown complete", running.log()


@pytest.mark.browser
def test_the_reference_page_lists_every_operation_and_gets_an_item_with_no_outside_request(
    service: Service, tmp_path: Path
) -> None:
    """Headless Chromium on /docs: every operation listed, GetItem tried, nothing off-host."""
    webdriver = pytest.importorskip("selenium.webdriver")
    by = pytest.importorskip("selenium.webdriver.common.by").By
    wait = pytest.importorskip("selenium.webdriver.support.ui").WebDriverWait
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.fail("Debian's chromium and chromium-driver are needed (`nox -s browser`)")
    origin = f"http://127.0.0.1:{service.http_port}"
    _, _, item = _call(service.http_port, "POST", "/v1/items", {"name": "seen in a browser"})
    _, _, document = _call(service.http_port, "GET", "/openapi.json")
    operations = sum(len(methods) for methods in document["paths"].values())
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        driver.get(f"{origin}/docs")
        until = wait(driver, 20).until
        until(lambda d: len(d.find_elements(by.CSS_SELECTOR, ".opblock")) == operations)
        block = driver.find_element(by.ID, "operations-ItemService-ItemService_GetItem")
        block.find_element(by.CSS_SELECTOR, ".opblock-summary").click()
        until(lambda _: block.find_elements(by.CSS_SELECTOR, ".try-out__btn"))
        block.find_element(by.CSS_SELECTOR, ".try-out__btn").click()
        block.find_element(by.CSS_SELECTOR, "input[placeholder='id']").send_keys(item["id"])
        block.find_element(by.CSS_SELECTOR, ".execute").click()
        until(lambda _: "seen in a browser" in block.text)
        driver.save_screenshot(str(tmp_path / "docs.png"))
        requested = [
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in entry["message"]
        ]
        console = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert f"{origin}/v1/items/{item['id']}" in requested
    # chrome:// pages (the new tab the browser opens with) never touch the network.
    network = [url for url in requested if url.startswith(("http:", "https:", "ws:", "wss:"))]
    outside = [url for url in network if not url.startswith(f"{origin}/")]
    assert not outside, outside
    assert not console, console
