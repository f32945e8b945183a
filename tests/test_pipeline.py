"""End to end: real Mosquitto → the daemon → real PostgreSQL, one topic family at a time."""

from __future__ import annotations

import pytest

from tests.helpers import eventually, publisher, query, running_mirror, settings_for, settle


@pytest.fixture
def settings(broker, database, schema_name):
    return settings_for(broker.url, database.url, schema_name)


async def test_telemetry_lands_in_telemetry_table(broker, settings):
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(
                "flespi/state/gw/devices/42/telemetry/battery.level", 87, ts=1_700_000_000.5
            )
        await eventually(
            running.engine,
            "SELECT device_id, name, value::text, extract(epoch FROM ts) FROM telemetry",
            [(42, "battery.level", "87", pytest.approx(1_700_000_000.5))],
        )


async def test_every_family_reaches_its_table(broker, settings):
    ts = 1_731_990_000.0
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/7/telemetry/position.speed", 54.5, ts, retain=True)
            pub.publish(
                "flespi/state/gw/devices/7/settings/report", {"interval": 30}, ts, retain=True
            )
            pub.publish("flespi/state/gw/plugins/3/devices/7", {"enabled": True}, ts, retain=True)
            pub.publish(
                "flespi/state/gw/devices/7",
                {"id": 7, "name": "truck", "configuration": {"ident": "350"}, "device_type_id": 12},
                ts,
                retain=True,
            )
            pub.publish("flespi/state/gw/devices/7/connected", True, ts + 1, retain=True)
            pub.publish(
                "flespi/interval/gw/calcs/9/devices/7/created",
                {"id": 1, "begin": ts - 60, "end": ts, "duration": 60, "mileage": 1.25},
                ts,
            )
            message = {"ident": "350", "timestamp": ts, "server.timestamp": ts + 0.5, "x": 1}
            pub.publish("flespi/message/gw/devices/7", message, ts + 1)
            pub.publish("flespi/message/gw/channels/4/350", message, ts + 1)
            pub.publish(
                "flespi/message/gw/modems/2/37060000001", {"text": "hi", "timestamp": ts}, ts
            )
        await settle(running)
        engine = running.engine
        assert await query(engine, "SELECT device_id, name, value::text FROM telemetry") == [
            (7, "position.speed", "54.5")
        ]
        assert await query(
            engine, "SELECT device_id, name, value->>'interval' FROM device_settings"
        ) == [(7, "report", "30")]
        assert await query(
            engine, "SELECT plugin_id, device_id, config::text FROM plugin_device_configs"
        ) == [(3, 7, '{"enabled": true}')]
        assert await query(
            engine, "SELECT device_id, name, ident, device_type_id, connected FROM devices"
        ) == [(7, "truck", "350", 12, True)]
        assert await query(
            engine,
            "SELECT calc_id, device_id, interval_key, duration, data->>'mileage',"
            ' extract(epoch FROM "end") FROM intervals',
        ) == [(9, 7, "id:1", 60.0, "1.25", ts)]
        assert await query(
            engine,
            "SELECT device_id, ident, extract(epoch FROM ts), extract(epoch FROM server_ts)"
            " FROM device_messages",
        ) == [(7, "350", ts, ts + 0.5)]
        assert await query(engine, "SELECT channel_id, ident FROM channel_messages") == [(4, "350")]
        assert await query(
            engine, "SELECT modem_id, phone, payload->>'text' FROM modem_messages"
        ) == [(2, "37060000001", "hi")]
        assert await query(engine, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_older_telemetry_never_overwrites_newer_across_batches(broker, settings):
    topic = "flespi/state/gw/devices/1/telemetry/battery.level"
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(topic, 90, 1_731_990_100.0)
            await settle(running)
            pub.publish(topic, 10, 1_731_990_050.0)  # older, arrives later: a separate batch
            await settle(running)
        assert await query(running.engine, "SELECT value::text FROM telemetry") == [("90",)]
        assert running.mirror.committed_batches >= 2


async def test_older_telemetry_never_overwrites_newer_within_one_batch(
    broker, database, schema_name
):
    settings = settings_for(broker.url, database.url, schema_name, flush_interval=1.0)
    topic = "flespi/state/gw/devices/1/telemetry/battery.level"
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for value, ts in [(50, 1_731_990_050.0), (90, 1_731_990_100.0), (10, 1_731_990_010.0)]:
                pub.publish(topic, value, ts)
        await settle(running, quiet=1.2)
        assert await query(running.engine, "SELECT value::text FROM telemetry") == [("90",)]
        assert running.mirror.committed_batches == 1


async def test_zero_length_payloads_delete_rows_of_every_state_family(broker, settings):
    ts = 1_731_990_000.0
    topics = {
        "flespi/state/gw/devices/1/telemetry/din": 3,
        "flespi/state/gw/devices/1/settings/report": {"interval": 30},
        "flespi/state/gw/plugins/5/devices/1": {"a": 1},
        "flespi/state/gw/devices/1": {"id": 1, "name": "a"},
        "flespi/state/gw/devices/1/connected": True,
    }
    tables = [
        "telemetry",
        "device_settings",
        "plugin_device_configs",
        "objects",
        "object_properties",
    ]
    count_all = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in tables)
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for topic, value in topics.items():
                pub.publish(topic, value, ts, retain=True)
            await eventually(running.engine, count_all, [(t, 1) for t in tables])
            for topic in topics:
                pub.publish(topic, b"", ts + 10, retain=True)
            await eventually(running.engine, count_all, [(t, 0) for t in tables])
            # An older update arriving after the deletion must not bring the rows back.
            for topic, value in topics.items():
                pub.publish(topic, value, ts + 5)
            await settle(running)
        assert [tuple(r) for r in await query(running.engine, count_all)] == [
            (t, 0) for t in tables
        ]
        # A newer update does bring it back.
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/1/telemetry/din", 4, ts + 20)
        await eventually(running.engine, "SELECT value::text FROM telemetry", [("4",)])


async def test_deleted_property_removes_the_object_and_its_properties(broker, settings):
    ts = 1_731_990_000.0
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/2", {"id": 2, "name": "b"}, ts)
            pub.publish("flespi/state/gw/devices/2/connected", True, ts + 1)
            pub.publish("flespi/state/gw/devices/3", {"id": 3, "name": "c"}, ts)
            await eventually(running.engine, "SELECT id FROM objects ORDER BY id", [(2,), (3,)])
            pub.publish("flespi/state/gw/devices/2/deleted", True, ts + 2)
            await eventually(running.engine, "SELECT id FROM objects ORDER BY id", [(3,)])
            pub.publish("flespi/state/gw/devices/2/name", "zombie", ts + 1.5)  # older than deletion
            await settle(running)
        assert await query(running.engine, "SELECT id FROM objects ORDER BY id") == [(3,)]
        assert await query(running.engine, "SELECT count(*) FROM object_properties") == [(0,)]


async def test_interval_deleted_event_removes_the_interval(broker, settings):
    ts = 1_731_990_000.0
    interval = {"id": 5, "begin": ts - 10, "end": ts, "duration": 10}
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish("flespi/interval/gw/calcs/1/devices/2/created", interval, ts)
            pub.publish("flespi/interval/gw/calcs/1/devices/2/created", {**interval, "id": 6}, ts)
            await eventually(
                running.engine, "SELECT interval_id FROM intervals ORDER BY 1", [(5,), (6,)]
            )
            pub.publish("flespi/interval/gw/calcs/1/devices/2/deleted", interval, ts + 5)
            await eventually(running.engine, "SELECT interval_id FROM intervals", [(6,)])
            pub.publish("flespi/interval/gw/calcs/1/devices/2/updated", interval, ts + 1)  # older
            await settle(running)
        assert await query(running.engine, "SELECT interval_id FROM intervals") == [(6,)]


async def test_property_updates_merge_into_props_without_losing_others(broker, settings):
    ts = 1_731_990_000.0
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(
                "flespi/state/gw/devices/8",
                {"id": 8, "name": "old", "configuration": {"ident": "1"}, "connected": False},
                ts,
            )
            pub.publish("flespi/state/gw/devices/8/name", "new", ts + 1)
            pub.publish("flespi/state/gw/devices/8/connections/77", {"ident": "1"}, ts + 1)
            pub.publish("flespi/state/gw/devices/8/connected", True, ts - 5)  # older than object
            await settle(running)
            (props,) = (await query(running.engine, "SELECT props FROM objects"))[0]
            assert props == {
                "id": 8,
                "name": "new",
                "configuration": {"ident": "1"},
                "connected": False,
                "connections": {"77": {"ident": "1"}},
            }
            # A newer whole object replaces what it carries, keeps properties it does not carry.
            pub.publish(
                "flespi/state/gw/devices/8", {"id": 8, "name": "newest", "connected": True}, ts + 2
            )
            pub.publish("flespi/state/gw/devices/8/connections/77", b"", ts + 3)
            await settle(running)
        (props,) = (await query(running.engine, "SELECT props FROM objects"))[0]
        assert props == {"id": 8, "name": "newest", "connected": True}


async def test_bad_input_goes_to_dead_letters_and_the_stream_goes_on(broker, settings):
    bad = [
        ("flespi/state/gw/devices/1/telemetry/x", b"{not json", "malformed_json"),
        ("flespi/state/gw/devices/1/telemetry/x", b"\xff\xfe", "invalid_utf8"),
        ("flespi/state/gw/devices/1/telemetry/x", b"NaN", "non_finite_number"),
        ("flespi/state/gw/devices/1/telemetry/x", b"[" * 200 + b"]" * 200, "too_deeply_nested"),
        ("flespi/state/gw/devices/1/telemetry/x", b'"\\u0000"', "unsupported_unicode"),
        ("flespi/state/gw/devices/abc/telemetry/x", b"1", "invalid_id"),
        ("flespi/state/gw/devices/1", b"[1]", "wrong_shape"),
        ("flespi/message/gw", b"1", "unknown_topic"),  # too short for any message family
        ("flespi/state/gw/devices/1/telemetry/big", b"1" * 5000, "payload_too_large"),
    ]
    settings = settings.__class__(**{**settings.__dict__, "max_payload_bytes": 4096})
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for topic, payload, _ in bad:
                pub.publish(topic, payload, 1_731_990_000.0)
            pub.publish(
                "flespi/state/gw/devices/1/telemetry/x",
                b"1",
                1_731_990_000.0,
                properties={"timestamp": "soon"},
            )
            pub.publish("flespi/state/gw/devices/1/telemetry/ok", 1, 1_731_990_000.0)
        await settle(running)
        rows = await query(
            running.engine, "SELECT reason, topic, payload_size FROM dead_letters ORDER BY id"
        )
        assert [r[0] for r in rows] == [reason for *_, reason in bad] + ["invalid_timestamp"]
        assert rows[-2][2] == 5000
        assert await query(running.engine, "SELECT name FROM telemetry") == [("ok",)]
        (stored,) = (
            await query(
                running.engine, "SELECT payload FROM dead_letters WHERE reason = 'invalid_utf8'"
            )
        )[0]
        assert bytes(stored) == b"\xff\xfe"
