"""End to end, real Mosquitto → the daemon → real PostgreSQL: what real flespi accounts send
(issue 8): subaccounts, calculator device state, big objects, platform logs, other message
families, device time, ties, telemetry expiry, deleted devices."""

from __future__ import annotations

import pytest

from mirror.records import Inbound
from mirror.topics import decode
from tests.helpers import Publisher, query, running_mirror, settings_for, settle

TS = 1_731_990_000.0


@pytest.fixture
def settings(broker, database, schema_name):
    return settings_for(broker.url, database.url, schema_name)


def test_a_message_without_cid_belongs_to_the_sessions_account():
    bare = Inbound("flespi/state/gw/devices/5/telemetry/x", b"1", {}, TS)
    own = Inbound("flespi/state/gw/devices/5/telemetry/x", b"1", {"cid": "42"}, TS)
    assert decode(bare, default_cid=7).cid == 7  # type: ignore[union-attr]
    assert decode(own, default_cid=7).cid == 42  # type: ignore[union-attr]
    assert decode(Inbound("nowhere", b"", {"cid": "42"}, TS)).cid == 42  # dead letters too


async def test_every_table_records_the_account_of_each_message(broker, settings):
    async with running_mirror(settings) as running:
        master, sub = Publisher(broker.url, cid=100), Publisher(broker.url, cid=200)
        try:
            master.publish("flespi/state/gw/devices/1/telemetry/speed", 10, TS, retain=True)
            sub.publish("flespi/state/gw/devices/2/telemetry/speed", 20, TS, retain=True)
            sub.publish("flespi/state/gw/devices/2", {"id": 2, "name": "sub"}, TS, retain=True)
            sub.publish("flespi/state/gw/devices/2/connected", True, TS, retain=True)
            sub.publish("flespi/message/gw/devices/2", {"timestamp": TS, "x": 1}, TS)
            sub.publish("flespi/interval/gw/calcs/9/devices/2/created", {"id": 1, "begin": TS}, TS)
            sub.publish("flespi/message/gw/devices/bad", {"timestamp": TS}, TS)
        finally:
            master.close()
            sub.close()
        await settle(running)
        engine = running.engine
        assert await query(engine, "SELECT device_id, cid FROM telemetry ORDER BY 1") == [
            (1, 100),
            (2, 200),
        ]
        for table in ("objects", "object_properties", "device_messages", "intervals"):
            assert await query(engine, f"SELECT DISTINCT cid FROM {table}") == [(200,)], table
        assert await query(engine, "SELECT device_id, cid FROM devices") == [(2, 200)]
        assert await query(engine, "SELECT cid FROM dead_letters") == [(200,)]
