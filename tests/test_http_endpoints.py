"""/metrics, /healthz and /readyz of a running daemon, over real HTTP.

The daemon runs in this process against a real Mosquitto and PostgreSQL; the listener is
``mirror.ops.metrics.MetricsServer`` (what ``flespi-mirror run`` starts) serving the same registry
and the running mirror's health. The scrape must pass ``promtool check metrics`` with no complaint.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import __version__
from mirror.ops.metrics import Health, MetricsServer
from mirror.pipeline import Mirror
from mirror.store.database import create_engine
from tests.helpers import promtool, publisher, running_mirror, settings_for, settle
from tests.launchers import MosquittoBroker, TestDatabase

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    """Status, Content-Type and body of a GET, error statuses included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def aget(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    return await asyncio.to_thread(get, port, path, accept)


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in scraped, f"{name}{labels} is not in the scrape"
    return scraped[key]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_scrape_of_a_running_mirror_passes_promtool_and_shows_the_traffic(
    broker: MosquittoBroker, database: TestDatabase, schema_name: str
) -> None:
    settings = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings) as running:
        server = MetricsServer("127.0.0.1", 0, running.mirror.health).start()
        try:
            now = time.time()
            with publisher(broker.url) as pub:
                pub.publish("flespi/state/gw/devices/42/telemetry/battery.level", 87, ts=now - 2)
                pub.publish(
                    "flespi/message/gw/devices/42",
                    # server.timestamp: the time a device message's lag counts from
                    {"timestamp": now - 3, "server.timestamp": now - 2,
                     "ident": "350000000000042", "battery.level": 87},
                    ts=now - 2,
                )
                pub.publish("flespi/state/gw/devices/42/telemetry/speed", b"{not json", ts=now)
            await settle(running)
            assert running.mirror.committed_messages >= 3

            status, content_type, body = await aget(server.port, "/metrics")
            assert status == 200
            assert content_type.startswith("text/plain")

            lint = promtool("check", "metrics", input=body)
            assert lint.returncode == 0, lint.stdout + lint.stderr
            assert lint.stdout.strip() == "" and lint.stderr.strip() == "", (
                "promtool check metrics complained:\n" + lint.stdout + lint.stderr
            )

            scraped = samples(body)
            received = "flespi_mirror_messages_received_total"
            assert value(scraped, received, family="telemetry", qos="1") >= 2
            assert value(scraped, received, family="device_message", qos="1") >= 1
            written = "flespi_mirror_rows_written_total"
            assert value(scraped, written, table="telemetry", operation="upsert") >= 1
            assert value(scraped, written, table="device_messages", operation="append") >= 1
            dead = "flespi_mirror_dead_letters_total"
            assert value(scraped, dead, reason="malformed_json") >= 1
            assert value(scraped, "flespi_mirror_lag_seconds_count") >= 2
            assert value(scraped, "flespi_mirror_lag_seconds_bucket", le="1.0") < value(
                scraped, "flespi_mirror_lag_seconds_bucket", le="5.0"
            ), "the messages stamped 2 s ago must land between the 1 s and 5 s buckets"
            assert value(scraped, "flespi_mirror_commit_duration_seconds_count") >= 1
            assert value(scraped, "flespi_mirror_batch_messages_count") >= 1
            assert value(scraped, "flespi_mirror_unacked_messages") == 0
            assert value(scraped, "flespi_mirror_mqtt_connected") == 1
            assert value(scraped, "flespi_mirror_ready") == 1
            assert value(scraped, "flespi_mirror_last_commit_timestamp_seconds") >= now - 1
            assert value(scraped, "flespi_mirror_build_info", version=__version__) == 1
            for name, labels in scraped:  # no device id or topic leaks into a label
                for label, label_value in labels:
                    if name.startswith("flespi_mirror_") and label != "version":
                        assert "42" not in label_value and "/" not in label_value, (name, label)

            status, content_type, body = await aget(
                server.port, "/metrics", accept="application/openmetrics-text"
            )
            assert status == 200 and content_type.startswith("application/openmetrics-text")
            assert body.rstrip().endswith("# EOF")

            assert await aget(server.port, "/healthz") == (200, "text/plain", "ok\n")
            assert await aget(server.port, "/readyz") == (200, "text/plain", "ready\n")
        finally:
            server.stop()


async def test_readyz_turns_503_once_the_mirror_stopped_and_healthz_stays_200(
    broker: MosquittoBroker, database: TestDatabase, schema_name: str
) -> None:
    settings = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings) as running:
        server = MetricsServer("127.0.0.1", 0, running.mirror.health).start()
        assert (await aget(server.port, "/readyz"))[0] == 200
    try:
        status, _, body = await aget(server.port, "/readyz")
        assert status == 503
        assert body == "not ready: mqtt disconnected, stopping\n"
        assert await aget(server.port, "/healthz") == (200, "text/plain", "ok\n")
        scraped = samples((await aget(server.port, "/metrics"))[2])
        assert value(scraped, "flespi_mirror_ready") == 0
        assert value(scraped, "flespi_mirror_mqtt_connected") == 0
    finally:
        server.stop()


async def test_readyz_is_503_while_the_database_cannot_be_reached(
    broker: MosquittoBroker, schema_name: str
) -> None:
    url = f"postgresql://mirror:secret@127.0.0.1:{closed_port()}/mirror"
    settings = settings_for(broker.url, url, schema_name)
    engine = create_engine(url, schema_name)
    mirror = Mirror(settings, engine, health=Health())
    task = asyncio.create_task(mirror.run())
    server = MetricsServer("127.0.0.1", 0, mirror.health).start()
    try:
        await asyncio.sleep(1.0)  # a few refused connection attempts
        assert not task.done()
        status, _, body = await aget(server.port, "/readyz")
        assert status == 503
        assert body == "not ready: mqtt disconnected, database unavailable\n"
        assert "secret" not in body
        assert (await aget(server.port, "/healthz"))[0] == 200
    finally:
        mirror.request_stop()
        await asyncio.wait_for(task, 30)
        await engine.dispose()
        server.stop()


def test_readyz_names_every_reason_and_recovers() -> None:
    health = Health(mqtt_connected=True, database_ok=False)
    server = MetricsServer("127.0.0.1", 0, health).start()
    try:
        assert get(server.port, "/readyz") == (
            503,
            "text/plain",
            "not ready: database unavailable\n",
        )
        health.mqtt_connected = False
        assert get(server.port, "/readyz")[2] == (
            "not ready: mqtt disconnected, database unavailable\n"
        )
        health.mqtt_connected = health.database_ok = True
        assert get(server.port, "/readyz") == (200, "text/plain", "ready\n")
        assert get(server.port, "/healthz") == (200, "text/plain", "ok\n")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def idle_server() -> Iterator[MetricsServer]:
    server = MetricsServer("127.0.0.1", 0, Health()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/", "/metrics/", "/health", "/ready", "/favicon.ico"])
def test_any_other_path_is_404(idle_server: MetricsServer, path: str) -> None:
    assert get(idle_server.port, path) == (404, "text/plain", "not found\n")


def test_a_thousand_idle_connections_start_no_thread_and_are_closed_after_the_timeout() -> None:
    server = MetricsServer("127.0.0.1", 0, Health(), request_timeout=3.0).start()
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1000)]
    try:
        deadline = time.monotonic() + 10
        while server.clients < 1000:
            assert time.monotonic() < deadline, server.clients
            time.sleep(0.05)
        assert threading.active_count() == threads_before
        assert get(server.port, "/healthz") == (200, "text/plain", "ok\n")  # served among them
        for sock in idle[:5]:
            sock.sendall(b"GET /re")  # a request that never ends is timed out the same way
        deadline = time.monotonic() + 10
        while server.clients:
            assert time.monotonic() < deadline, f"{server.clients} connections never timed out"
            time.sleep(0.05)
        for sock in idle:
            sock.settimeout(1)
            assert sock.recv(1) == b"", "the server closed every idle connection"
    finally:
        for sock in idle:
            sock.close()
        server.stop()


async def test_readyz_says_stalled_while_messages_wait_and_nothing_commits(
    broker: MosquittoBroker, database: TestDatabase, schema_name: str
) -> None:
    """A lock raises no error: the batch just waits. Past --stall-after, /readyz says so and
    flespi_mirror_stalled_seconds counts; once the lock goes the mirror is ready again, and
    flespi_mirror_current_lag_seconds says how far behind flespi the newest commit is."""
    settings = settings_for(broker.url, database.url, schema_name, stall_after=1.0)
    async with running_mirror(settings) as running:
        server = MetricsServer("127.0.0.1", 0, running.mirror.health).start()
        try:
            async with running.engine.connect() as blocker:
                await blocker.exec_driver_sql("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
                with publisher(broker.url) as pub:
                    for n in range(5):
                        pub.publish(f"flespi/state/gw/devices/7/telemetry/p{n}", n, time.time())
                deadline = time.monotonic() + 10
                while (status := await aget(server.port, "/readyz"))[0] == 200:
                    assert time.monotonic() < deadline, "/readyz stayed 200 through the stall"
                    await asyncio.sleep(0.2)
                assert status[0] == 503 and "stalled: no commit for" in status[2]
                assert "5 messages wait" in status[2]
                scraped = samples((await aget(server.port, "/metrics"))[2])
                assert value(scraped, "flespi_mirror_stalled_seconds") >= 1.0
                assert value(scraped, "flespi_mirror_ready") == 0
                await blocker.rollback()
            with publisher(broker.url) as pub:  # an old message: the newest commit counts
                pub.publish("flespi/state/gw/devices/7/telemetry/old", 1, time.time() - 100)
            deadline = time.monotonic() + 10
            while (await aget(server.port, "/readyz"))[0] != 200:
                assert time.monotonic() < deadline, "/readyz stayed 503 after the lock went"
                await asyncio.sleep(0.2)
            scraped = samples((await aget(server.port, "/metrics"))[2])
            assert value(scraped, "flespi_mirror_stalled_seconds") == 0
            assert 0 <= value(scraped, "flespi_mirror_current_lag_seconds") < 5
        finally:
            server.stop()
