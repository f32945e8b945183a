"""The mirror under test, as production runs it: ``flespi-mirror run`` in its own process.

A subprocess rather than :class:`mirror.pipeline.Mirror` in the benchmark's process: the daemon
then has a CPU and a GIL of its own (the benchmark's polling, the publisher and the RSS sampler
cannot slow it down), its RSS is the daemon's alone, and py-spy can attach to it. What the
benchmark needs from inside comes from the daemon's own ``/metrics`` (committed messages, time
of the last commit, the lag histogram) and from its log (the time it connected).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.launchers import free_port

ROOT = Path(__file__).resolve().parent.parent
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Metrics:
    committed: float = 0.0
    last_commit: float = 0.0
    lag_buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative)
    lag_count: float = 0.0
    unacked: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Metrics:
        m = cls()
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            name, _, value = line.rpartition(" ")
            if name.startswith("flespi_mirror_messages_received_total"):
                m.committed += float(value)
            elif name == "flespi_mirror_last_commit_timestamp_seconds":
                m.last_commit = float(value)
            elif name.startswith("flespi_mirror_lag_seconds_bucket"):
                le = name.split('le="', 1)[1].split('"', 1)[0]
                m.lag_buckets.append((float(le), float(value)))
            elif name == "flespi_mirror_lag_seconds_count":
                m.lag_count = float(value)
            elif name == "flespi_mirror_unacked_messages":
                m.unacked = float(value)
        return m


class MirrorProcess:
    """``python -m mirror.cli run`` against the benchmark's broker and database."""

    def __init__(
        self,
        broker_url: str,
        database_url: str,
        schema: str,
        client_id: str,
        log_path: Path,
        *extra: str,
        module: str = "mirror.cli",
    ) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            module,
            "run",
            "--mqtt-url",
            broker_url,
            "--database-url",
            database_url,
            "--schema",
            schema,
            "--client-id",
            client_id,
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            *extra,
        ]
        self.started = time.time()
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> Metrics | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
            ) as resp:
                return Metrics.parse(resp.read().decode())
        except OSError:
            return None

    def metric_sum(self, name: str) -> float:
        """The sum of a metric's series on /metrics (0 when it is absent or unreachable)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
            ) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    def log_time(self, needle: str) -> float | None:
        """Unix time of the first log line holding ``needle`` (the log has ms precision)."""
        if not self.log_path.exists():
            return None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if needle in line:
                match = _LOG_TIME.match(line)
                if match:
                    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None

    def connected_at(self) -> float:
        """Unix time of the daemon's ``connected to`` log line: where a drain's time starts."""
        connected = self.log_time("connected to")
        if connected is None:
            raise RuntimeError("no 'connected to' line in the mirror's log")
        return connected

    def wait_committed(self, count: int, timeout: float, poll: float = 0.1) -> Metrics:
        """Poll /metrics until ``count`` messages are committed; fail on a stall or a crash."""
        deadline = time.monotonic() + timeout
        last: Metrics | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the mirror exited ({self.process.returncode}): see {self.log_path}"
                )
            m = self.metrics()
            if m is not None:
                last = m
                if m.committed >= count:
                    return m
            time.sleep(poll)
        got = last.committed if last else 0
        raise TimeoutError(f"the mirror committed {got:.0f} of {count} in {timeout:.0f}s")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
