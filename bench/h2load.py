"""h2load as the benchmark's gRPC load generator: run it, read what it measured.

h2load (nghttp2) is a C HTTP/2 load generator: unlike a Python gRPC client it does
not compete with the server for an interpreter, and on two cores it costs a small
fraction of what it measures. A unary gRPC call is an HTTP/2 POST of a length-
prefixed message with `content-type: application/grpc`; h2load cannot read gRPC's
status trailers, so a call it counts as succeeded is one that got HTTP 200: the
benchmark checks the status codes separately (one real gRPC call before the load,
the service's own request log after it).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Debian's package for h2load.
PACKAGE = "nghttp2-client"


def ensure_installed() -> str:
    """The h2load executable, installed with apt when missing and allowed (root)."""
    found = shutil.which("h2load")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt and Path("/proc/self/status").read_text().find("Uid:\t0\t") >= 0:
        subprocess.run([apt, "install", "-y", "-q", PACKAGE], check=False, capture_output=True)
        found = shutil.which("h2load")
        if found:
            return found
    raise SystemExit(
        f"the benchmark needs h2load: install it (Debian/Ubuntu: apt install {PACKAGE})"
    )


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class Level:
    """One concurrency level: `connections` x `streams` requests in flight."""

    connections: int
    streams: int

    @property
    def concurrency(self) -> int:
        """Requests in flight."""
        return self.connections * self.streams

    def __str__(self) -> str:
        """`32 (4x8)`: streams in flight, then connections x streams each."""
        return f"{self.concurrency} ({self.connections}x{self.streams})"


@dataclass(frozen=True)
class Result:
    """What one h2load run measured."""

    requests: int
    succeeded: int
    failed: int
    seconds: float
    latencies_us: list[int]

    @property
    def rps(self) -> float:
        """Succeeded requests per second."""
        return self.succeeded / self.seconds

    def percentile_ms(self, q: float) -> float:
        """Latency quantile `q` in milliseconds (nearest rank)."""
        ordered = sorted(self.latencies_us)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1000


def run(  # noqa: PLR0913 - the knobs of one run
    url: str,
    payload: Path,
    level: Level,
    seconds: float,
    *,
    headers: tuple[str, ...] = (),
    threads: int = 1,
    rps: int | None = None,
) -> Result:
    """Run h2load against `url` (a gRPC method's URL) for `seconds`; no warm-up.

    Latencies come from h2load's per-request log (microseconds, requests that
    completed). One client thread: h2load is cheap enough, and a second thread
    would take the server's core. `rps`: each connection sends at most this many
    requests per second (open loop, up to its streams), else as fast as answers come.
    """
    with tempfile.NamedTemporaryFile(suffix=".tsv") as log:
        args = [
            ensure_installed(),
            f"--duration={max(1, round(seconds))}",
            f"--clients={level.connections}",
            f"--max-concurrent-streams={level.streams}",
            f"--threads={threads}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            *(f"--header={h}" for h in headers),
            f"--data={payload}",
            *([f"--rps={rps}"] if rps else []),
            f"--log-file={log.name}",
            url,
        ]
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"h2load failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        latencies = []
        for line in Path(log.name).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]))
    return _parse(proc.stdout, latencies)


def _counts(line: str) -> dict[str, int]:
    """`requests: 21241 total, 21241 started, ...` as {"total": 21241, ...}."""
    counts = {}
    for part in line.removeprefix("requests:").split(","):
        number, name = part.split()[:2]
        counts[name] = int(number)
    return counts


def _parse(output: str, latencies: list[int]) -> Result:
    requests = succeeded = failed = 0
    seconds = 0.0
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("finished in"):
            seconds = float(line.split()[2].rstrip("s,"))  # "finished in 10.00s, ..."
        elif line.startswith("requests:"):
            counts = _counts(line)
            requests, succeeded = counts["total"], counts["succeeded"]
            failed = counts["failed"] + counts.get("errored", 0) + counts.get("timeout", 0)
    if not seconds:
        raise RuntimeError(f"cannot read h2load's output:\n{output}")
    return Result(requests, succeeded, failed, seconds, latencies)
