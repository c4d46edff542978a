"""wrk as the benchmark's HTTP/1.1 load generator: run it, read what it measured.

wrk (Debian's package) is a C load generator with keep-alive connections and an
event loop per thread; one thread is enough on two cores and leaves the other
core to the server. A request counts as succeeded when its status is 2xx or 3xx;
the benchmark checks the service's own request log for the codes as well.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "wrk"
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_LATENCY = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$")
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def ensure_installed() -> str:
    """The wrk executable, installed with apt when missing and allowed (root)."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt and Path("/proc/self/status").read_text().find("Uid:\t0\t") >= 0:
        subprocess.run([apt, "install", "-y", "-q", PACKAGE], check=False, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(f"the benchmark needs wrk: install it (Debian/Ubuntu: apt install {PACKAGE})")


@dataclass(frozen=True)
class Result:
    """What one wrk run measured (the interface of h2load.Result)."""

    requests: int
    succeeded: int
    failed: int
    seconds: float
    percentiles_ms: dict[int, float]

    @property
    def rps(self) -> float:
        """Succeeded requests per second."""
        return self.succeeded / self.seconds

    def percentile_ms(self, q: float) -> float:
        """Latency quantile `q` (0.5, 0.75, 0.9 or 0.99) in milliseconds."""
        return self.percentiles_ms.get(round(q * 100), float("nan"))


def run(url: str, connections: int, seconds: float, *, headers: tuple[str, ...] = ()) -> Result:
    """Run wrk against `url` with `connections` keep-alive connections for `seconds`."""
    args = [
        ensure_installed(),
        "--threads=1",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        "--latency",
        *(f"--header={h}" for h in headers),
        url,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return _parse(proc.stdout)


def _parse(output: str) -> Result:
    percentiles: dict[int, float] = {}
    requests, seconds, failed = 0, 0.0, 0
    for line in output.splitlines():
        if match := _LATENCY.match(line):
            percentiles[int(match[1])] = float(match[2]) * _UNITS_MS[match[3]]
        elif match := _TOTAL.match(line):
            requests, seconds = int(match[1]), float(match[2]) * _UNITS_MS[match[3]] / 1000
        elif match := _NON_2XX.search(line):
            failed += int(match[1])
        elif match := _SOCKET.search(line):
            failed += sum(int(n) for n in match.groups()[1:])  # connect errors are retried
    if not seconds:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    return Result(requests, requests - failed, failed, seconds, percentiles)
