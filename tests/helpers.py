"""Shared pieces of the end-to-end tests: a flespi-like publisher, a daemon, SQL polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound
from mirror.ops.config import Secret, Settings
from mirror.ops.metrics import Health
from mirror.pipeline import Mirror
from mirror.store.database import create_engine, migrate

ROOT = Path(__file__).resolve().parent.parent

# The alerts both deploy/prometheus/alerts.yaml and the chart's PrometheusRule must define.
EXPECTED_ALERTS = {
    "FlespiMirrorDown",
    "FlespiMirrorNotReady",
    "FlespiMirrorLagHigh",
    "FlespiMirrorDeadLettersRising",
    "FlespiMirrorNoCommits",
    "FlespiMirrorReconnectStorm",
    "FlespiMirrorBatchHeld",
    "FlespiMirrorCompactionBehind",
    "FlespiMirrorStalled",
    "FlespiMirrorRecordSetAside",
}


def encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(value).encode()


class Publisher:
    """A plain MQTT 5 client that publishes like flespi: user properties timestamp and cid."""

    def __init__(self, url: str, cid: int = 123) -> None:
        host, port = url.split("//", 1)[1].split(":")
        self.cid = cid
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.connect(host, int(port))
        self.client.loop_start()

    def publish(
        self,
        topic: str,
        value: Any,
        ts: float | None = None,
        *,
        retain: bool = False,
        properties: dict[str, str] | None = None,
        expiry: int | None = None,
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        pairs = [("cid", str(self.cid))]
        if ts is not None:
            pairs.append(("timestamp", repr(float(ts))))
        pairs += list((properties or {}).items())
        props.UserProperty = pairs
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        info = self.client.publish(topic, encode(value), qos=1, retain=retain, properties=props)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def publisher(url: str) -> Iterator[Publisher]:
    p = Publisher(url)
    try:
        yield p
    finally:
        p.close()


def settings_for(broker_url: str, database_url: str, schema: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": broker_url,
        "database_url": Secret(database_url),
        "schema": schema,
        "client_id": f"mirror-{schema}",
        "flush_interval": 0.01,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


class RunningMirror:
    def __init__(self, mirror: Mirror, task: asyncio.Task[None], engine: AsyncEngine) -> None:
        self.mirror = mirror
        self.task = task
        self.engine = engine

    async def wait_connected(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not (self.mirror.source.connected and self.mirror.source.subscribed):
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("the mirror did not connect and subscribe")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_mirror(settings: Settings) -> AsyncIterator[RunningMirror]:
    """The daemon in this process (as `flespi-mirror run` wires it), stopped gracefully."""
    assert settings.database_url is not None
    engine = create_engine(settings.database_url.reveal(), settings.schema)
    mirror = Mirror(settings, engine, health=Health())
    task = asyncio.create_task(mirror.run())
    running = RunningMirror(mirror, task, engine)
    try:
        await running.wait_connected()
        yield running
    finally:
        mirror.request_stop()
        await asyncio.wait_for(task, 30)
        await engine.dispose()


def migrated_schema(url: str, schema: str) -> tuple[str, str]:
    """Bring ``schema`` to the newest revision (for a module's tests that write through the
    store); returns ``(url, schema)``."""

    async def run() -> None:
        engine = create_engine(url, schema)
        try:
            await migrate(engine, schema)
        finally:
            await engine.dispose()

    asyncio.run(run())
    return url, schema


def interval_event(device: int, name: str, payload: dict[str, Any], ts: float) -> Inbound:
    """An interval event of calculator 9 as the broker hands it over (``timestamp`` ts)."""
    topic = f"flespi/interval/gw/calcs/9/devices/{device}/{name}"
    return Inbound(topic, json.dumps(payload).encode(), {"timestamp": repr(ts)}, ts)


def interval_span(begin: float, end: float, **counters: Any) -> dict[str, Any]:
    return {"begin": begin, "end": end, "duration": end - begin, **counters}


async def query(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).fetchall())


async def eventually(
    engine: AsyncEngine, sql: str, expected: Any, timeout: float = 10, **params: Any
) -> Any:
    """Poll a query until it returns ``expected`` (rows as tuples); fail with the last rows."""
    deadline = time.monotonic() + timeout
    rows: Any = None
    while time.monotonic() < deadline:
        rows = [tuple(r) for r in await query(engine, sql, **params)]
        if rows == expected:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sql!r}: expected {expected!r}, last saw {rows!r}")


async def settle(running: RunningMirror, quiet: float = 0.3, timeout: float = 20) -> None:
    """Wait until the mirror has nothing unacknowledged for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    calm_since: float | None = None
    while time.monotonic() < deadline:
        if running.mirror.source.unacked == 0:
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since >= quiet:
                return
        else:
            calm_since = None
        await asyncio.sleep(0.02)
    raise TimeoutError(f"still {running.mirror.source.unacked} unacked messages")


def daemon_process(
    broker_url: str,
    database_url: str | None,
    schema: str,
    *extra: str,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    token: str | None = None,
) -> subprocess.Popen[bytes]:
    """`flespi-mirror run` as a real process (for SIGKILL, SIGTERM and security tests).

    Secrets travel in the environment, as the README advises (arguments show in process
    lists); ``database_url`` None runs on the embedded PostgreSQL. Output goes to ``log_path``
    (appended) so a test can wait for log lines without a pipe that could fill up and block.
    """
    cmd = [
        sys.executable, "-m", "mirror.cli", "run",
        "--mqtt-url", broker_url,
        "--schema", schema,
        "--client-id", f"mirror-{schema}",
        "--metrics-port", "0",
        "--flush-interval", "0.01",
        *extra,
    ]  # fmt: skip
    child_env = {
        k: v for k, v in os.environ.items() if k not in ("MIRROR_DATABASE_URL", "FLESPI_TOKEN")
    }
    if database_url:
        child_env["MIRROR_DATABASE_URL"] = database_url
    if token:
        child_env["FLESPI_TOKEN"] = token
    child_env.update(env or {})
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET on 127.0.0.1, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_log(path: Path, needle: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(needle) >= count:
            return
        time.sleep(0.05)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"
    raise TimeoutError(f"{needle!r} x{count} not in the daemon log after {timeout}s:\n{tail}")


def stop_process(
    proc: subprocess.Popen[bytes],
    sig: int = signal.SIGTERM,
    timeout: float = 30,
    log_path: Path | None = None,
) -> int:
    """Signal the process and wait for it; one that does not end is killed, and the failure
    shows the end of its log (``log_path``) so the reason is in the report."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace")[-4000:] if log_path else "(no log kept)"
        raise AssertionError(f"the process did not stop within {timeout}s; log:\n{tail}") from None


def promtool(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run Prometheus's promtool; fail (not skip) with how to get it when it is missing."""
    import shutil

    import pytest

    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is missing: run `bash scripts/ensure-promtool.sh` (Debian package "
            "'prometheus'), or `make test`, which does",
            pytrace=False,
        )
    return subprocess.run(
        [exe, *args], input=input, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def registry_series_names() -> set[str]:
    """Every series name a scrape can show, labelled metrics without a sample yet included."""
    from mirror.ops import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in suffixes[family.type]
    }


def publish_pairs(
    url: str, count: int, done: threading.Event, pace: float, devices: int = 20
) -> dict[int, int]:
    """Per step a retained telemetry value ``counter`` and a device message with ``seq``;
    returns the last counter value published per device. Sets ``done`` at the end."""
    pub = Publisher(url)
    last: dict[int, int] = {}
    try:
        for i in range(count):
            device = 1000 + i % devices
            ts = 1_731_990_000.0 + i * 0.001
            pub.publish(f"flespi/state/gw/devices/{device}/telemetry/counter", i, ts, retain=True)
            last[device] = i
            pub.publish(
                f"flespi/message/gw/devices/{device}",
                {"ident": str(device), "timestamp": ts, "seq": i},
                ts,
            )
            if pace:
                time.sleep(pace)
    finally:
        pub.close()
        done.set()
    return last


class KilledDaemon:
    """`flespi-mirror run` that a test SIGKILLs at random moments and starts again."""

    def __init__(self, broker_url: str, database_url: str, schema: str, log_path: Path) -> None:
        self.args = (broker_url, database_url, schema)
        self.log_path = log_path
        self.kills = 0
        self.restart_seconds: list[float] = []
        self.process = daemon_process(*self.args, log_path=log_path)
        wait_for_log(log_path, "subscribed to")

    async def kill_while(
        self, streaming: Callable[[], bool], *, at_least: int, rng: Any, pause: tuple[float, float]
    ) -> None:
        """Kill and restart after random pauses while ``streaming()``, and ``at_least`` times."""
        while streaming() or self.kills < at_least:
            await asyncio.sleep(rng.uniform(*pause))
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.kills += 1
            started = time.monotonic()
            self.process = daemon_process(*self.args, log_path=self.log_path)
            wait_for_log(self.log_path, "subscribed to", count=self.kills + 1)
            self.restart_seconds.append(time.monotonic() - started)

    def stop(self) -> int:
        return stop_process(self.process)
