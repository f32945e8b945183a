"""Message history in two tiers (history.py, compaction.py) against a real PostgreSQL: packed
hours read back exactly as the rows they were, each message once across the tiers whatever
arrives late or while an hour is being packed, and a failed or interrupted step loses nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror.decode.records import Inbound
from mirror.decode.topics import decode
from mirror.ops import metrics
from mirror.store import compaction, partitions
from mirror.store.batch import coalesce
from mirror.store.history import CHANNEL_MESSAGES, DEVICE_MESSAGES, hour_start
from mirror.store.schema import metadata
from mirror.store.writer import Store
from tests.helpers import eventually, publisher, query, running_mirror, settings_for

NOW = hour_start(time.time()) + 1800.0  # half past this hour
START = NOW - 6 * 3600.0  # six hours of history before it
COLUMNS = {
    "device_messages": "device_id, ts, digest, server_ts, ident, payload, received_at, cid",
    "channel_messages": "channel_id, ident, ts, digest, server_ts, payload, received_at, cid",
}


def message(device: int, ts: float, **extra: Any) -> Inbound:
    payload = {
        "ident": f"35{device:013d}",
        "timestamp": ts,
        "server.timestamp": round(ts + 1.25, 6),
        "position.latitude": 54.6 + device / 100 + ts % 1000 / 1e5,
        "position.longitude": 25.2 + device / 100,
        "position.speed": ts % 90,
        "position.valid": True,
        **extra,
    }
    return Inbound(
        f"flespi/message/gw/devices/{device}",
        json.dumps(payload).encode(),
        {"timestamp": str(ts), "cid": "7"},
        ts + 2.5,
    )


def channel_copy(m: Inbound) -> Inbound:
    ident = json.loads(m.payload)["ident"]
    return Inbound(f"flespi/message/gw/channels/44/{ident}", m.payload, m.properties, m.received_at)


def history(devices: Sequence[int] = (1, 2, 3), every: float = 60.0) -> list[Inbound]:
    count = int((NOW - START) / every)
    return [message(d, START + i * every + d / 10) for i in range(count) for d in devices]


async def write(store: Store, messages: Sequence[Inbound]) -> Any:
    return await store.write(coalesce((m, decode(m, 1 << 20, 7)) for m in messages))


async def rows(engine: AsyncEngine, view: str = "device_messages") -> list[Any]:
    return await query(engine, f"SELECT {COLUMNS[view]} FROM {view} ORDER BY 1, 2, 3, 4")


async def counts(engine: AsyncEngine, tier: Any = DEVICE_MESSAGES) -> tuple[int, int]:
    (recent,) = (await query(engine, f"SELECT count(*) FROM {tier.recent}"))[0]
    (packed,) = (await query(engine, f"SELECT coalesce(sum(messages), 0) FROM {tier.hours}"))[0]
    return recent, packed


async def test_packed_hours_read_back_exactly_as_the_rows_they_were(engine):
    store = Store(engine)
    messages = history()
    await write(store, messages + [channel_copy(m) for m in messages])
    before = {view: await rows(engine, view) for view in COLUMNS}
    report = await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert report.caught_up
    # Every hour that ended an hour ago is packed; the last one and a half stay recent.
    recent, packed = await counts(engine)
    assert packed > 0 and recent > 0 and recent + packed == len(messages)
    assert recent == sum(1 for m in messages if float(m.properties["timestamp"]) >= NOW - 5400)
    assert await query(engine, "SELECT count(*) FROM device_message_hours") == [(5 * 3,)]
    assert sum(await counts(engine, CHANNEL_MESSAGES)) == len(messages)
    for view, expected in before.items():
        assert await rows(engine, view) == expected, view


async def test_a_time_window_reads_both_tiers_and_only_its_own_hours(engine):
    messages = history()
    await write(Store(engine), messages + [channel_copy(m) for m in messages])
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    since, until = NOW - 3 * 3600 - 600, NOW - 1800  # packed and recent hours, edges mid-hour
    for view, columns in COLUMNS.items():
        expected = await query(
            engine,
            f"SELECT {columns} FROM {view} "
            "WHERE ts >= to_timestamp(:a) AND ts < to_timestamp(:b) ORDER BY 1, 2, 3, 4",
            a=since,
            b=until,
        )
        got = await query(
            engine,
            f"SELECT {columns} FROM {view}(to_timestamp(:a), to_timestamp(:b)) ORDER BY 1, 2, 3, 4",
            a=since,
            b=until,
        )
        assert got == expected and len(got) == 3 * 160, view
    window = "SELECT device_id, ts FROM device_messages(to_timestamp(:a), to_timestamp(:b))"
    # The window reaches the packed table's index on hour: only its hours are read.
    plan = await explain(
        engine, "ANALYZE, COSTS OFF", window + " WHERE device_id = 2", since, until
    )
    conditions = [line for line in plan.splitlines() if "Index Cond" in line]
    assert any("hour >" in line and "hour <" in line for line in conditions), plan


async def explain(engine: AsyncEngine, options: str, sql: str, a: float, b: float) -> str:
    return "\n".join(r[0] for r in await query(engine, f"EXPLAIN ({options}) {sql}", a=a, b=b))


async def test_a_window_unpacks_only_the_columns_read_and_tests_only_its_edge_hours(engine):
    """The fleet's commonest question, one parameter over a time, reads the offsets and the
    payloads of its packed hours and nothing else; only the two hours at the window's edges
    have their messages compared with the window (migration 0012)."""
    await write(Store(engine), history())
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    since, until = NOW - 5 * 3600 - 600, NOW - 1800
    sql = (
        "SELECT ts, payload -> 'position.speed' FROM device_messages(to_timestamp(:a), "
        "to_timestamp(:b)) WHERE device_id = 2 ORDER BY ts"
    )
    plan = await explain(engine, "VERBOSE, COSTS OFF", sql, since, until)
    unpacked = [line for line in plan.splitlines() if "Function Call:" in line]
    assert unpacked and all(
        "unnest(h" in line
        and "ts_offsets" in line
        and "jsonb_array_elements" in line
        and not any(array in line for array in ("idents", "server_ts", "received_at", "cids"))
        for line in unpacked
    ), plan
    # Messages compared with the window: only in the scan of the hours at its edges; the hours
    # wholly inside it are unpacked without a test.
    lines = plan.splitlines()
    scans = [i for i, line in enumerate(lines) if "Function Scan on m" in line]
    filtered = [any("Filter:" in line for line in lines[i + 1 : i + 4]) for i in scans]
    assert sorted(filtered) == [False, True], plan
    speeds = await query(engine, sql, a=since, b=until)
    expected = [
        json.loads(m.payload)["position.speed"]
        for m in history((2,))
        if since <= float(m.properties["timestamp"]) < until
    ]
    assert [speed for _ts, speed in speeds] == expected


async def test_a_redelivered_message_of_a_packed_hour_is_stored_once(engine):
    store = Store(engine)
    messages = history()
    await write(store, messages)
    before = await rows(engine)
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    result = await write(store, messages)  # the broker, or a backfill, sends it all again
    assert result.rows[("device_messages", "append")] == 0
    assert result.rows[("device_messages", "duplicate")] == len(messages)
    assert await rows(engine) == before


async def test_a_late_message_for_a_packed_hour_joins_it_on_the_next_pass(engine):
    store = Store(engine)
    await write(store, history())
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    late = [message(2, START + 30.5), message(9, START + 31.5)]  # a packed hour; a new device
    await write(store, late)
    assert await counts(engine) == (90 * 3 + 2, 270 * 3)
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert await counts(engine) == (90 * 3, 270 * 3 + 2)
    (first_hour,) = await query(
        engine,
        "SELECT messages, ts_offsets = (SELECT array_agg(o ORDER BY o) FROM unnest(ts_offsets) o)"
        " FROM device_message_hours WHERE device_id = 2 AND hour = to_timestamp(:h)",
        h=hour_start(START),
    )
    assert first_hour == (31, True)  # merged in ts order
    assert len(await rows(engine)) == 3 * 360 + 2


async def test_a_message_for_an_hour_being_packed_waits_and_is_stored_once(engine):
    store = Store(engine)
    messages = history(devices=(1,))
    await write(store, messages)
    hour = hour_start(START)
    await compaction.move_horizon(engine, hour_start(NOW - 3600))
    redelivered = messages[0]
    new = message(1, START + 45.0)
    async with engine.connect() as step:  # a compaction step, open: packed, not committed
        transaction = await step.begin()
        moved = await compaction._step(step, DEVICE_MESSAGES, hour, 100)
        assert moved == 30  # the first hour is half an hour of messages
        writer = asyncio.create_task(write(store, [redelivered, new]))
        await asyncio.sleep(0.5)
        assert not writer.done(), "a late row must wait for the step that packs its hour"
        await transaction.commit()
    result = await asyncio.wait_for(writer, 10)
    assert result.rows[("device_messages", "append")] == 1  # the new one; the other is packed
    assert await counts(engine) == (len(messages) - 30 + 1, 30)
    assert len(await rows(engine)) == len(messages) + 1


async def test_a_step_that_dies_midway_leaves_every_message_where_it_was(engine):
    store = Store(engine)
    messages = history()
    await write(store, messages)
    before = await rows(engine)
    await compaction.move_horizon(engine, hour_start(NOW - 3600))
    async with engine.connect() as step:
        transaction = await step.begin()
        await compaction._step(step, DEVICE_MESSAGES, hour_start(START), 100)
        pid = (await step.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with engine.connect() as killer:  # the server loses the step's backend
            await killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(Exception):  # noqa: B017 - the connection is gone
            await transaction.commit()
    assert await counts(engine) == (len(messages), 0)
    report = await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert report.caught_up
    assert await rows(engine) == before


async def test_the_horizon_waits_for_writers_in_flight_and_never_queues_them_long(engine):
    await write(Store(engine), history(devices=(1,)))
    async with engine.connect() as writer:  # a writer between its horizon read and commit
        transaction = await writer.begin()
        await writer.execute(
            text("SELECT 1 FROM sync_state WHERE name = 'history:horizon' FOR SHARE")
        )
        started = time.monotonic()
        horizon = await compaction.move_horizon(engine, hour_start(NOW - 3600))
        assert horizon is not None and horizon < hour_start(START)  # not moved
        assert time.monotonic() - started < 5
        await transaction.commit()
    assert await compaction.move_horizon(engine, hour_start(NOW - 3600)) == hour_start(NOW - 3600)


async def test_retention_drops_packed_days_like_recent_ones(engine):
    store = Store(engine)
    old = dt.datetime.fromtimestamp(START, dt.UTC).date() - dt.timedelta(days=40)
    ts = dt.datetime(old.year, old.month, old.day, 12, tzinfo=dt.UTC).timestamp()
    await write(store, [message(1, ts), message(1, ts + 60)])
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert await counts(engine) == (0, 2)
    name = partitions.partition_name("device_message_hours", old)
    assert await query(engine, "SELECT to_regclass(:n) IS NOT NULL", n=name) == [(True,)]
    report = await partitions.maintain(engine, retention_days=30)
    assert name in report.dropped
    assert await counts(engine) == (0, 0)


async def test_one_maintainer_compacts_at_a_time(engine):
    await write(Store(engine), history(devices=(1,)))
    async with engine.connect() as other:  # another worker's step holds the lock
        transaction = await other.begin()
        await other.execute(
            text(
                "SELECT pg_advisory_xact_lock(hashtext('flespi-mirror:compaction:' || "
                "current_schema()))"
            )
        )
        report = await compaction.compact(engine, after_hours=1.0, now=NOW)
        assert report.busy and report.steps == 0
        await transaction.rollback()
    assert (await compaction.compact(engine, after_hours=1.0, now=NOW)).caught_up


@pytest.mark.slow
async def test_the_daemon_packs_past_hours_and_a_missing_privilege_holds_nothing_back(
    broker: Any, database: Any, engine: AsyncEngine, schema_name: str
) -> None:
    """A least-privilege writer that may not write the packed table: compaction fails, counted
    and retried; the live stream keeps landing; after the GRANT the past hours are packed."""
    role = f"writer_{schema_name}"
    await admin(
        engine,
        f"CREATE ROLE {role} LOGIN",
        f"GRANT USAGE ON SCHEMA {schema_name} TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema_name} TO {role}",
        f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema_name} TO {role}",
        f"REVOKE INSERT ON device_message_hours FROM {role}",
    )
    writer_url = "postgresql://" + role + "@" + database.url.split("@", 1)[1]
    settings = settings_for(
        broker.url, writer_url, schema_name, migrate=False, compaction_interval=0.2,
        compact_after=1.0,
    )  # fmt: skip
    errors_before = metrics.COMPACTION_ERRORS._value.get()
    past = history(devices=(1, 2), every=600.0)  # six hours, one message in ten minutes
    async with running_mirror(settings) as running:
        with publisher(broker.url) as pub:
            for m in past:
                pub.publish(m.topic, json.loads(m.payload), float(m.properties["timestamp"]))
            await eventually(running.engine, "SELECT count(*) FROM device_messages", [(72,)])
            await eventually_true(lambda: metrics.COMPACTION_ERRORS._value.get() > errors_before)
            assert await counts(engine) == (72, 0)  # nothing moved, nothing lost
            now = message(3, time.time())
            pub.publish(now.topic, json.loads(now.payload), float(now.properties["timestamp"]))
            await eventually(running.engine, "SELECT count(*) FROM device_messages", [(73,)])
            await admin(engine, f"GRANT INSERT ON device_message_hours TO {role}")
            packed = [m for m in past if float(m.properties["timestamp"]) < hour_start(NOW) - 3600]
            await eventually(
                running.engine,
                "SELECT sum(messages) FROM device_message_hours",
                [(len(packed),)],
                timeout=20,
            )
    assert await counts(engine) == (73 - len(packed), len(packed))
    await admin(engine, f"REASSIGN OWNED BY {role} TO CURRENT_USER", f"DROP OWNED BY {role}",
                f"DROP ROLE {role}")  # fmt: skip


async def admin(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def eventually_true(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


async def test_a_past_day_emptied_by_compaction_gives_its_index_space_back(engine):
    store = Store(engine)
    # two days back, 00:00 UTC: a day over before the horizon whatever the hour of this run
    yesterday = hour_start(NOW) - 2 * 86400 - (hour_start(NOW) % 86400)
    messages = [message(d, yesterday + 3600 + i * 60.0) for i in range(600) for d in (1, 2)]
    day = dt.datetime.fromtimestamp(yesterday, dt.UTC).date()
    await partitions.ensure_day(engine, metadata.tables["device_messages_recent"], day)
    await write(store, messages)
    name = partitions.partition_name("device_messages_recent", day)
    size = "SELECT pg_total_relation_size(CAST(:n AS regclass))"
    ((before,),) = await query(engine, size, n=name)
    report = await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert name in report.truncated
    ((after,),) = await query(engine, size, n=name)
    assert after < before / 4, (before, after)
    late = message(1, yesterday + 7200 + 30)  # a late message for the emptied day
    await write(store, [late])
    assert len(await rows(engine)) == len(messages) + 1
    await compaction.compact(engine, after_hours=1.0, now=NOW)
    assert await counts(engine) == (0, len(messages) + 1)


async def test_compaction_waits_while_a_backlog_drains(
    broker: Any, database: Any, engine: AsyncEngine, schema_name: str
) -> None:
    """While full batches wait to be written, the daemon's compaction does not take a step (up
    to compaction_defer): ingestion has the database. Once the backlog is written, it packs."""
    await write(Store(engine), history(devices=(1,), every=600.0))
    settings = settings_for(
        broker.url, database.url, schema_name, batch_size=10, compaction_interval=0.2,
        compaction_defer=600.0, compact_after=1.0,
    )  # fmt: skip
    async with running_mirror(settings) as running:
        async with engine.connect() as blocker:  # the backlog's batches cannot be written
            await blocker.execute(text("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE"))
            with publisher(broker.url) as pub:
                for n in range(200):
                    pub.publish(f"flespi/state/gw/devices/9/telemetry/p{n}", n, time.time())
            await eventually_true(lambda: running.mirror.draining())
            await asyncio.sleep(3.0)  # compaction would have packed within about a second
            assert (await counts(engine))[1] == 0
            await blocker.rollback()
        await eventually(running.engine, "SELECT count(*) FROM telemetry", [(200,)])
        due = [m for m in history(devices=(1,), every=600.0)
               if float(m.properties["timestamp"]) < hour_start(NOW) - 3600]  # fmt: skip
        await eventually(
            running.engine, "SELECT sum(messages) FROM device_message_hours", [(len(due),)],
            timeout=20,
        )  # fmt: skip
