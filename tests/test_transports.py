"""End to end over every transport, against a real Mosquitto with TLS and WebSockets listeners.

Debian's Mosquitto 2.0.11 opens a ``protocol websockets`` listener only when the same config has
a plain TCP listener too; the broker here has all four (the plain one is the fixture's first).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import asyncpg
import pytest

from mirror.ops.config import asyncpg_connect_kwargs
from tests.helpers import eventually, publisher, query, running_mirror, settings_for, settle
from tests.launchers import (
    ConfiguredMosquittoBroker,
    TestCertificates,
    free_port,
    make_test_certificates,
)

TS = 1_731_990_000.0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> TestCertificates:
    return make_test_certificates(tmp_path_factory.mktemp("tls"), hostnames=("localhost",))


@pytest.fixture
def four_way_broker(certificates) -> Iterator[tuple[ConfiguredMosquittoBroker, dict[str, str]]]:
    tls = (f"certfile {certificates.cert_file}", f"keyfile {certificates.key_file}")
    mqtts, ws, wss = free_port(), free_port(), free_port()
    broker = ConfiguredMosquittoBroker(
        extra_config=(
            f"listener {mqtts} 127.0.0.1",
            *tls,
            f"listener {ws} 127.0.0.1",
            "protocol websockets",
            f"listener {wss} 127.0.0.1",
            "protocol websockets",
            *tls,
        )
    )
    broker.start()
    urls = {
        "mqtt": broker.url,
        "mqtts": f"mqtts://localhost:{mqtts}",
        "ws": f"ws://127.0.0.1:{ws}/mqtt",
        "wss": f"wss://localhost:{wss}/mqtt",
    }
    try:
        yield broker, urls
    finally:
        broker.cleanup()


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts", "ws", "wss"])
async def test_every_url_scheme_mirrors_the_same_traffic_into_the_same_tables(
    four_way_broker, certificates, database, schema_name, scheme
):
    broker, urls = four_way_broker
    with publisher(broker.url) as pub:  # retained state before the mirror exists
        pub.publish("flespi/state/gw/devices/7/telemetry/position.speed", 54.5, TS, retain=True)
    settings = settings_for(
        urls[scheme], database.url, schema_name, ca_file=str(certificates.ca_file)
    )
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            message = {"ident": "350", "timestamp": TS, "server.timestamp": TS + 0.5}
            pub.publish("flespi/message/gw/devices/7", message, TS + 1)
            pub.publish("flespi/state/gw/devices/7/telemetry/battery.level", 87, TS, retain=True)
        await settle(running)
        assert str(running.mirror.source.settings.broker).startswith(f"{scheme}://")
        engine = running.engine
        assert await query(
            engine, "SELECT device_id, name, value::text FROM telemetry ORDER BY name"
        ) == [(7, "battery.level", "87"), (7, "position.speed", "54.5")]
        assert await query(engine, "SELECT device_id, ident FROM device_messages") == [(7, "350")]
        assert await query(engine, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_a_silent_broker_is_noticed_within_one_and_a_half_keepalives(
    broker, database, schema_name
):
    """SIGSTOP keeps the TCP connection open but the broker silent: a half-open connection."""
    settings = settings_for(broker.url, database.url, schema_name, keepalive=2)
    async with running_mirror(settings) as running:
        assert running.mirror.health.ready
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while running.mirror.health.mqtt_connected and time.monotonic() - stopped < 10:
                await asyncio.sleep(0.02)
            noticed = time.monotonic() - stopped
            assert not running.mirror.health.ready
            assert "mqtt disconnected" in running.mirror.health.not_ready_reasons()
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        await running.wait_connected(timeout=20)
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/1/telemetry/after", 1, TS)
        await eventually(running.engine, "SELECT name FROM telemetry", [("after",)])
    assert noticed <= 1.5 * 2 + 0.5, f"noticed after {noticed:.2f}s"


async def test_a_new_schema_with_the_same_client_id_gets_the_retained_state_again(
    broker, database, schema_name
):
    with publisher(broker.url) as pub:
        pub.publish("flespi/state/gw/devices/5/telemetry/fuel", 40, TS, retain=True)
    first = settings_for(broker.url, database.url, schema_name, client_id="same-id")
    async with running_mirror(first) as running:
        await eventually(running.engine, "SELECT name FROM telemetry", [("fuel",)])
    # The broker keeps the session of "same-id"; a new schema must still get the state.
    second = settings_for(broker.url, database.url, schema_name + "_b", client_id="same-id")
    async with running_mirror(second) as running:
        assert running.mirror.source.session_present is True
        await eventually(running.engine, "SELECT name FROM telemetry", [("fuel",)])
        await eventually(
            running.engine,
            "SELECT name FROM sync_state WHERE name = 'retained_state'",
            [("retained_state",)],
        )
    # The third start on that schema resumes without a replay (the marker is there).
    async with running_mirror(second) as running:
        await asyncio.sleep(0.3)
        assert running.mirror.source.retained_requested is False


async def test_large_messages_held_behind_a_lock_are_bounded_by_bytes_not_count(
    broker, database, schema_name
):
    """100 x 900 KB while a table lock holds the batch: with only the message bound (20,000)
    all 90 MB would be read into memory; the byte bound stops reading at 8 MiB."""
    bound = 8 * 1024 * 1024
    settings = settings_for(
        broker.url, database.url, schema_name, max_unacked_bytes=bound, max_batch_bytes=bound // 2
    )
    value = "x" * 900_000
    async with running_mirror(settings) as running:
        locker = await asyncpg.connect(**asyncpg_connect_kwargs(database.url))
        try:
            tr = locker.transaction()
            await tr.start()
            await locker.execute(f'LOCK TABLE "{schema_name}".telemetry IN ACCESS EXCLUSIVE MODE')
            with publisher(broker.url) as pub:
                for i in range(100):
                    pub.publish(f"flespi/state/gw/devices/{i}/telemetry/blob", value, TS)
            source = running.mirror.source
            most_bytes, most_messages = 0, 0
            for _ in range(60):  # 3 s with the lock held
                most_bytes = max(most_bytes, source.unacked_bytes)
                most_messages = max(most_messages, source.unacked)
                await asyncio.sleep(0.05)
            await tr.commit()
        finally:
            await locker.close()
        await eventually(running.engine, "SELECT count(*) FROM telemetry", [(100,)], timeout=60)
    assert 0 < most_bytes <= bound + 1_000_000, most_bytes  # the bound plus the packet crossing it
    assert most_messages < 20, f"{most_messages} messages held: not bounded by bytes"
