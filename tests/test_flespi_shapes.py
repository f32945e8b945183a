"""End to end, real Mosquitto → the daemon → real PostgreSQL: what real flespi accounts send
(issue 8): subaccounts, calculator device state, big objects, platform logs, other message
families, device time, ties, telemetry expiry, deleted devices."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from mirror.decode.records import Inbound, PlatformLog, Rejection
from mirror.decode.topics import decode
from tests.helpers import Publisher, publisher, query, running_mirror, settings_for, settle

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


CALC_DEVICE = "flespi/state/gw/calcs/9/devices/{device}/{field}"


async def test_calculator_device_state_has_its_own_row_per_device(broker, settings):
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for device in (1, 2):
                last = {"begin": TS - 60, "end": TS, "timestamp": TS}
                pub.publish(CALC_DEVICE.format(device=device, field="last"), last, TS, retain=True)
                pub.publish(CALC_DEVICE.format(device=device, field="synced"), True, TS)
            pub.publish(CALC_DEVICE.format(device=1, field="active"), None, TS, retain=True)
            pub.publish(CALC_DEVICE.format(device=2, field="synced"), False, TS - 10)  # older
            pub.publish(CALC_DEVICE.format(device=2, field="last"), b"", TS + 1)  # cleared
        await settle(running)
        assert await query(
            running.engine,
            "SELECT device_id, last->>'end', active::text, synced::text, cid"
            " FROM calculator_devices ORDER BY device_id",
        ) == [(1, str(TS), "null", "true", 123), (2, None, None, "true", 123)]
        assert await query(running.engine, "SELECT count(*) FROM objects") == [(0,)]


async def test_activation_events_set_the_active_state_not_the_interval(broker, settings):
    interval = "flespi/interval/gw/calcs/9/devices/1/{event}"
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(interval.format(event="created"), {"id": 5, "begin": TS}, TS)
            pub.publish(interval.format(event="activated"), {"id": 5, "begin": TS}, TS + 1)
        await settle(running)
        engine = running.engine
        assert await query(engine, "SELECT event FROM intervals") == [("created",)]
        assert await query(engine, "SELECT active->>'id' FROM calculator_devices") == [("5",)]
        with publisher(broker.url) as pub:
            pub.publish(interval.format(event="deactivated"), {}, TS + 2)
        await settle(running)
        assert await query(engine, "SELECT active::text FROM calculator_devices") == [("null",)]
        assert await query(engine, "SELECT event FROM intervals") == [("created",)]


async def test_the_last_intervals_active_property_is_kept_with_it(broker, settings):
    """flespi's KB: ``.../last`` may carry a user property ``active``; it follows ``last``
    (an older ``last`` does not change it), and is NULL when flespi did not send it."""
    last = {"begin": TS - 60, "end": TS, "timestamp": TS}
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for device, active in ((1, "true"), (2, "false")):
                topic = CALC_DEVICE.format(device=device, field="last")
                pub.publish(topic, last, TS, retain=True, properties={"active": active})
            pub.publish(CALC_DEVICE.format(device=3, field="last"), last, TS, retain=True)
            older = CALC_DEVICE.format(device=1, field="last")
            pub.publish(older, last, TS - 5, retain=True, properties={"active": "false"})
        await settle(running)
        assert await query(
            running.engine, "SELECT device_id, last_active FROM calculator_devices ORDER BY 1"
        ) == [(1, True), (2, False), (3, None)]


async def test_a_finished_event_is_the_intervals_last_update(broker, settings):
    """``finished``, a legacy event name flespi's UI still handles, updates the interval."""
    interval = "flespi/interval/gw/calcs/9/devices/1/{event}"
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(interval.format(event="created"), {"id": 5, "begin": TS}, TS)
            done = {"id": 5, "begin": TS, "end": TS + 60, "duration": 60}
            pub.publish(interval.format(event="finished"), done, TS + 60)
        await settle(running)
        engine = running.engine
        assert await query(engine, 'SELECT event, "end", duration FROM intervals') == [
            ("updated", datetime.fromtimestamp(TS + 60, UTC), 60.0)
        ]
        assert await query(engine, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_one_property_update_patches_props_and_a_later_deletion_removes_it(broker, settings):
    device = "flespi/state/gw/devices/3"
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish(device, {"id": 3, "name": "a", "connected": False}, TS, retain=True)
            for conn in range(50):
                pub.publish(f"{device}/connections/{conn}", {"ident": "x"}, TS + 1, retain=True)
        await settle(running)
        with publisher(broker.url) as pub:
            pub.publish(f"{device}/connected", True, TS + 2, retain=True)
            pub.publish(f"{device}/connections/7", b"", TS + 2, retain=True)
            pub.publish(f"{device}/name", b"", TS + 2, retain=True)  # issue 9 item 4
        await settle(running)
        engine = running.engine
        props = await query(
            engine,
            "SELECT props->'connected', props ? 'name', props->'connections' ? '7',"
            " jsonb_array_length(jsonb_path_query_array(props->'connections', '$.keyvalue()'))"
            " FROM objects",
        )
        assert props == [(True, False, False, 49)]
        assert await query(engine, "SELECT name, connected FROM devices") == [(None, True)]


async def test_a_deleted_device_leaves_the_views_with_its_state(broker, settings):
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for device in (1, 2):
                base = f"flespi/state/gw/devices/{device}"
                pub.publish(base, {"id": device, "name": f"d{device}"}, TS, retain=True)
                pub.publish(f"{base}/telemetry/position.latitude", 54.0, TS, retain=True)
                pub.publish(f"{base}/telemetry/position.longitude", 25.0, TS, retain=True)
                pub.publish(f"{base}/settings/report", {"interval": 5}, TS, retain=True)
                pub.publish(f"flespi/message/gw/devices/{device}", {"timestamp": TS}, TS)
            pub.publish("flespi/state/gw/devices/1", b"", TS + 5, retain=True)
            pub.publish("flespi/state/gw/devices/1/connected", True, TS + 6, retain=True)
        await settle(running)
        engine = running.engine
        assert await query(engine, "SELECT device_id FROM devices") == [(2,)]
        assert await query(engine, "SELECT device_id FROM device_positions") == [(2,)]
        assert await query(engine, "SELECT DISTINCT device_id FROM telemetry") == [(2,)]
        assert await query(engine, "SELECT device_id FROM device_settings") == [(2,)]
        assert await query(engine, "SELECT device_id FROM device_messages ORDER BY 1") == [
            (1,),
            (2,),
        ]


def test_log_topics_split_api_origin_and_event():
    record = decode(
        Inbound(
            "flespi/log/gw/devices/5/commands-queue/7/executed",
            b'{"timestamp": 1731990000.5, "event_code": 306, "origin_type": 11}',
            {"cid": "9"},
            TS,
        )
    )
    assert isinstance(record, PlatformLog)
    assert (record.api, record.origin, record.event_type, record.ts, record.event_code) == (
        "gw",
        "devices/5/commands-queue/7",
        "executed",
        1731990000.5,
        306,
    )


async def test_platform_logs_and_other_messages_are_stored_once_not_dead_lettered(
    broker, database, schema_name
):
    settings = settings_for(
        broker.url,
        database.url,
        schema_name,
        topics=("flespi/message/#", "flespi/log/#"),
    )
    log_record = {"timestamp": TS, "event_code": 1, "origin_type": 11, "new": {"id": 5}}
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for _ in range(2):  # a redelivery is stored once
                pub.publish("flespi/log/gw/devices/5/created", log_record, TS)
            pub.publish("flespi/log/platform/customer/logged_in", {"timestamp": TS + 1}, TS)
            pub.publish("flespi/message/gw/chats/3", {"text": "hi", "timestamp": TS}, TS)
            pub.publish("flespi/message/storage/abques/4/q", [1, 2], TS + 2)
        await settle(running)
        engine = running.engine
        assert await query(
            engine, "SELECT api, origin, event_type, event_code, cid FROM platform_logs ORDER BY ts"
        ) == [
            ("gw", "devices/5", "created", 1, 123),
            ("platform", "customer", "logged_in", None, 123),
        ]
        assert await query(
            engine,
            "SELECT topic, extract(epoch FROM ts), payload::text FROM other_messages ORDER BY ts",
        ) == [
            ("flespi/message/gw/chats/3", TS, '{"text": "hi", "timestamp": 1731990000.0}'),
            ("flespi/message/storage/abques/4/q", TS + 2, "[1, 2]"),
        ]
        assert await query(engine, "SELECT count(*) FROM dead_letters") == [(0,)]


def test_the_logs_switch_subscribes_to_platform_logs_but_never_snapshots_them():
    from mirror.ops.config import Settings

    settings = Settings(logs=True)
    assert "flespi/log/#" in settings.subscriptions
    assert "flespi/log/#" not in settings.snapshot_topics
    assert "flespi/log/#" not in Settings().subscriptions


def test_device_time_from_1970_to_a_day_ahead_is_accepted():
    rollover = 1_731_990_000.0 - 1024 * 7 * 86_400  # GPS week rollover: 2004
    for stamp, ok in ((rollover, True), (935_280_000.0, True), (0.0, True), (-1.0, False),
                      (TS + 86_000, True), (TS + 90_000, False)):  # fmt: skip
        message = Inbound(
            "flespi/message/gw/devices/5", f'{{"timestamp": {stamp}}}'.encode(), {}, TS
        )
        assert isinstance(decode(message), Rejection) != ok, stamp


async def test_back_dated_history_gets_its_own_day_partitions_and_retention(database, schema_name):
    import datetime as dt

    from mirror.store.batch import coalesce
    from mirror.store.database import create_engine, migrate
    from mirror.store.partitions import maintain
    from mirror.store.writer import Store

    engine = create_engine(database.url, schema_name)
    try:
        await migrate(engine, schema_name)
        today = dt.date(2026, 3, 10)
        await maintain(engine, today=today, days_ahead=1)
        stamps = (935_280_000.5, dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC).timestamp())
        messages = [
            Inbound("flespi/message/gw/devices/5", f'{{"timestamp": {s}}}'.encode(), {}, stamps[1])
            for s in stamps
        ]
        await Store(engine).write(coalesce((m, decode(m)) for m in messages))
        report = await maintain(engine, today=today, days_ahead=1)
        assert {"device_messages_recent_p19990822", "device_messages_recent_p20260301"} <= set(
            report.created
        )
        homes = await query(
            engine, "SELECT tableoid::regclass::text FROM device_messages_recent ORDER BY ts"
        )
        assert [h.split(".")[-1] for (h,) in homes] == [
            "device_messages_recent_p19990822",
            "device_messages_recent_p20260301",
        ]
        report = await maintain(engine, today=today, days_ahead=1, retention_days=30)
        assert "device_messages_recent_p19990822" in report.dropped
        assert "device_messages_recent_p20260301" not in report.dropped
    finally:
        await engine.dispose()


def test_lag_counts_neither_snapshots_nor_device_time():
    from mirror.decode.topics import lag_reference

    live = Inbound("flespi/state/gw/devices/5/telemetry/x", b"1", {"timestamp": "100.5"}, TS)
    retained = Inbound(live.topic, b"1", {"timestamp": "100.5"}, TS, retain=True)
    backlog = Inbound(
        "flespi/message/gw/devices/5",
        b'{"timestamp": 935280000, "server.timestamp": 1731989999.5}',
        {"timestamp": "935280000"},
        TS,
    )
    assert lag_reference(live, decode(live)) == 100.5
    assert lag_reference(retained, decode(retained)) is None
    assert lag_reference(backlog, decode(backlog)) == 1731989999.5


async def test_expired_telemetry_leaves_the_views_and_the_table(broker, settings):
    from mirror.store.partitions import expire_telemetry

    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/1/telemetry/position.latitude", 54.0, TS,
                        retain=True, expiry=1)  # fmt: skip
            pub.publish("flespi/state/gw/devices/1/telemetry/position.longitude", 25.0, TS,
                        retain=True, expiry=1)  # fmt: skip
            pub.publish("flespi/state/gw/devices/1/telemetry/battery.level", 80, TS, retain=True,
                        expiry=3600)  # fmt: skip
            pub.publish("flespi/state/gw/devices/1/telemetry/ident", "x", TS, retain=True)
        await settle(running)
        engine = running.engine
        rows = await query(
            engine,
            "SELECT name, extract(epoch FROM expires_at - received_at) FROM telemetry ORDER BY 1",
        )
        assert [(n, None if s is None else round(float(s))) for n, s in rows] == [
            ("battery.level", 3600),
            ("ident", None),
            ("position.latitude", 1),
            ("position.longitude", 1),
        ]
        assert await query(engine, "SELECT device_id FROM device_positions") == [(1,)]
        await asyncio.sleep(1.5)
        assert await expire_telemetry(engine) == 2
        assert await query(engine, "SELECT device_id FROM device_positions") == []
        assert await query(engine, "SELECT name FROM telemetry ORDER BY 1") == [
            ("battery.level",),
            ("ident",),
        ]


def test_cid_subscribes_each_filter_once_per_account_under_flespis_prefix():
    from mirror.ops.config import ConfigError, Settings

    settings = Settings(cids=("7", "42"), logs=True, share_group="g")
    assert settings.subscriptions == tuple(
        f"$share/g/$filter/cid={cid}/{topic}"
        for cid in (7, 42)
        for topic in ("flespi/state/#", "flespi/message/#", "flespi/interval/#", "flespi/log/#")
    )
    # The retained snapshot asks for state only, of those accounts only.
    assert settings.snapshot_topics == (
        "$filter/cid=7/flespi/state/#",
        "$filter/cid=42/flespi/state/#",
    )
    # A $filter/ written in --topic by hand is state or not by the topic behind it.
    by_hand = Settings(topics=("$filter/cid=7/flespi/state/#", "$filter/cid=7/flespi/message/#"))
    assert by_hand.snapshot_topics == ("$filter/cid=7/flespi/state/#",)
    for bad in ("0", "-3", "abc", "\uff11"):  # a fullwidth digit one is not a number here
        with pytest.raises(ConfigError, match="positive number"):
            Settings(cids=(bad,))
    with pytest.raises(ConfigError, match=r"own \$filter"):
        Settings(cids=("7",), topics=("$filter/cid=8/flespi/state/#",))
