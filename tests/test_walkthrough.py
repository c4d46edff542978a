"""The first hour of a new user, followed literally: copy, the printed next steps, the README.

The template is copied with Copier's command line, as a user runs it, so the message it
prints is the one a user reads. Every command of that message's next steps then runs as
written, in order, in a shell; after it the quick start of the generated README. Nothing
is restated here: the commands are parsed out of the message and the README. Only the
answers are unique (the package name, and so the database name in `.env`; free ports),
which keeps runs apart without changing a single command.

`serve` runs in the background until /readyz answers; the documented Python client calls
it; SIGINT to its process group (what Ctrl-C in a terminal sends) stops it. Any step that
fails fails the test, with its output.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from support import ROOT, tool_env

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
STEP_TIMEOUT = 600.0
STARTUP_TIMEOUT = 60.0
# The generated .env sets SHUTDOWN__DRAIN=0: Ctrl-C must not wait for a drain.
STOP_TIMEOUT = 5.0
COMMAND = re.compile(r"^ {2}(?P<command>\S.*)$")


@dataclass(frozen=True)
class Answers:
    """Unique answers of one walk-through."""

    package: str
    slug: str
    grpc_port: int
    admin_port: int
    http_port: int

    def data(self) -> list[str]:
        """The answers as Copier `--data` options."""
        values = {
            "project_name": self.slug.replace("-", " ").title(),
            "grpc_port": self.grpc_port,
            "admin_port": self.admin_port,
            "http_port": self.http_port,
        }
        return [arg for key, value in values.items() for arg in ("--data", f"{key}={value}")]


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _user_env() -> dict[str, str]:
    """A user's shell: no virtual environment active, no interpreter forced on uv."""
    env = tool_env()
    env.pop("UV_PYTHON", None)
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "Walk Through"
        env[f"GIT_{role}_EMAIL"] = "walk-through@example.invalid"
    env["GIT_CONFIG_GLOBAL"] = "/dev/null"
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return env


def _shell(script: str, cwd: Path, *, what: str) -> subprocess.CompletedProcess[str]:
    """Run `script` as a user types it (bash, stop at the first failure)."""
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=_user_env(),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode}):\n$ {script}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


def _copy(answers: Answers, parent: Path) -> tuple[Path, str]:
    """`copier copy` on the command line; returns the project and the printed message."""
    copier = Path(sys.executable).parent / "copier"
    dst = parent / answers.slug
    proc = subprocess.run(
        [str(copier), "copy", "--defaults", "--vcs-ref", "HEAD", *answers.data(), str(ROOT), dst],
        cwd=parent,
        env=_user_env(),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dst, proc.stderr


def _commands(lines: list[str]) -> list[str]:
    return [m["command"] for line in lines if (m := COMMAND.match(line))]


def _message_steps(message: str) -> tuple[list[str], list[str]]:
    """The next steps of the copy message: the commands, and those for the second terminal."""
    lines = message[message.index("Next steps") :].splitlines()
    split = next(i for i, line in enumerate(lines) if "second terminal" in line)
    return _commands(lines[:split]), _commands(lines[split:])


def _readme_block(readme: str, section: str) -> list[str]:
    """The commands of the first ```sh block under the heading `section`."""
    text = readme[readme.index(f"## {section}\n") :]
    block = re.search(r"```sh\n(?P<body>.*?)```", text, re.DOTALL)
    assert block is not None, f"no sh block under {section!r}"
    return [line for line in block["body"].splitlines() if line.strip()]


def _split_at_serve(commands: list[str]) -> tuple[list[str], str]:
    """The setup steps and the one that runs the service (`serve`, or `dev` with reload)."""
    serve = [c for c in commands if re.search(r"\b(serve|dev)\b", c.split("#")[0])]
    assert len(serve) == 1, f"expected one serve or dev command in {commands}"
    index = commands.index(serve[0])
    assert index == len(commands) - 1, f"serve must be the last step: {commands}"
    return commands[:index], serve[0]


def _ready(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"serve exited {process.returncode}:\n{output[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    pytest.fail(f"serve was not ready within {STARTUP_TIMEOUT} s")


def _serve_and_call(serve: str, calls: list[str], project: Path, answers: Answers) -> str:
    """Start `serve` in the background, run `calls`, then Ctrl-C it; returns its output."""
    process = subprocess.Popen(
        # `exec`: in a terminal the foreground job is the command itself; a shell kept in
        # between would also get the SIGINT and end with 130 whatever the service did.
        ["bash", "-c", f"exec {serve}"],
        cwd=project,
        env=_user_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        _ready(process, answers.admin_port)
        for call in calls:
            result = _shell(call, project, what="calling the service")
            assert "created" in result.stdout, result.stdout
            assert "deleted" in result.stdout, result.stdout
        os.killpg(process.pid, signal.SIGINT)
        started = time.monotonic()
        output, _ = process.communicate(timeout=STOP_TIMEOUT + 5)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == 0, output[-4000:]
    assert took < STOP_TIMEOUT, f"Ctrl-C took {took:.1f} s to stop the service:\n{output}"
    assert "shutdown complete" in output, output[-4000:]
    assert "uvicorn.error" not in output, output[-4000:]
    return output


async def _drop(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def answers() -> Iterator[Answers]:
    """Unique names and free ports; drops the database the walk-through created."""
    token = uuid.uuid4().hex[:10]
    grpc_port, admin_port, http_port = _free_ports(3)
    made = Answers(f"walk_{token}", f"walk-{token}", grpc_port, admin_port, http_port)
    yield made
    asyncio.run(_drop(made.package))


def _server(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="", query=""))


def _database_url_in(project: Path) -> str:
    env_file = (project / ".env").read_text(encoding="utf-8")
    match = re.search(r"^DATABASE_URL=(?P<url>\S+)$", env_file, re.MULTILINE)
    assert match is not None, env_file
    return match["url"]


@pytest.mark.slow
def test_a_new_user_follows_the_printed_steps_and_the_readme(
    answers: Answers, tmp_path: Path
) -> None:
    """Copy, every printed step, the README quick start: each runs as written and works."""
    project, message = _copy(answers, tmp_path)
    # The steps use the database the generated .env names, on the default server.
    url = _database_url_in(project)
    assert urlsplit(url).path == f"/{answers.package}"
    if _server(url) != _server(ADMIN_URL):
        pytest.skip(f"the steps use PostgreSQL at {_server(url)}, not TEST_DATABASE_URL")

    # 1. The message printed after the copy: its steps in order, from where copier ran.
    steps, second_terminal = _message_steps(message)
    assert steps[0] == f"cd {project}", steps
    assert second_terminal, message
    setup, serve = _split_at_serve(steps)
    _shell("\n".join(setup), tmp_path, what="the printed next steps")
    _serve_and_call(serve, second_terminal, project, answers)

    # 2. The generated README's quick start, in the project, as a returning user.
    readme = (project / "README.md").read_text(encoding="utf-8")
    setup, serve = _split_at_serve(_readme_block(readme, "Run it locally"))
    _shell("\n".join(setup), project, what="the README quick start")
    calls = _readme_block(readme, "Call it")
    assert calls == ["uv run python examples/client.py"], calls
    _serve_and_call(serve, calls, project, answers)


def test_readme_grpcurl_and_gateway_examples_match_the_api(
    answers: Answers, tmp_path: Path
) -> None:
    """The grpcurl lines call real methods; the curl lines are exactly the proto's HTTP rules."""
    project, _ = _copy(answers, tmp_path)
    readme = (project / "README.md").read_text(encoding="utf-8")
    proto = next((project / "proto").rglob("items.proto")).read_text(encoding="utf-8")
    package = re.search(r"^package (?P<name>[\w.]+);", proto, re.MULTILINE)
    assert package is not None
    methods = set(re.findall(r"^\s*rpc (\w+)\(", proto, re.MULTILINE))
    rules = {
        (verb.upper(), re.sub(r"\{[\w.]+\}", "ITEM_ID", path))
        for verb, path in re.findall(r'\b(get|post|patch|delete|put): "([^"]+)"', proto)
    }
    text = readme[readme.index("With [grpcurl]") :]
    grpcurl = re.findall(r"^grpcurl .*$", text, re.MULTILINE)
    assert grpcurl
    for line in grpcurl:
        called = re.search(rf"\b{re.escape(package['name'])}\.ItemService/(\w+)$", line)
        assert called is not None, line
        assert called.group(1) in methods, line
    curls = re.findall(r"^curl .*$", text[text.index("With curl") :], re.MULTILINE)
    documented = set()
    for line in curls:
        verb = re.search(r"-X (\w+)", line)
        path = re.search(rf"127\.0\.0\.1:{answers.http_port}(/\S*)", line)
        assert path is not None, line
        documented.add((verb.group(1) if verb else "GET", path.group(1)))
    assert documented == rules, f"README curl examples {documented} != proto rules {rules}"
