"""History tables are partitioned by day; partitions are made ahead and dropped by retention."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from mirror.decode.records import (
    Inbound,
)
from mirror.decode.topics import (
    decode,
)
from mirror.store.batch import coalesce
from mirror.store.database import create_engine, migrate
from mirror.store.partitions import maintain, prune_tombstones
from mirror.store.schema import HISTORY_TABLES
from mirror.store.writer import Store
from tests.helpers import query

DAY = dt.timedelta(days=1)
TODAY = dt.date(2026, 3, 10)


def epoch(day: dt.date, hour: int = 12) -> float:
    return dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.UTC).timestamp()


async def write_messages(store: Store, *days: dt.date) -> None:
    messages = [
        Inbound(
            f"flespi/message/gw/devices/{i}",
            f'{{"timestamp": {epoch(day)}, "n": {i}}}'.encode(),
            {},
            epoch(day),
        )
        for i, day in enumerate(days)
    ]
    await store.write(coalesce((m, decode(m)) for m in messages))


async def homes(engine) -> list[tuple[str, int]]:
    rows = await query(
        engine,
        "SELECT tableoid::regclass::text, count(*) FROM device_messages_recent "
        "GROUP BY 1 ORDER BY 1",
    )
    return [(name.split(".")[-1], n) for name, n in rows]


@pytest.fixture
async def engine(database, schema_name):
    engine = create_engine(database.url, schema_name)
    await migrate(engine, schema_name)
    yield engine
    await engine.dispose()


async def test_partitions_exist_from_yesterday_to_a_week_ahead(engine):
    report = await maintain(engine, today=TODAY, days_ahead=7)
    assert len(report.created) == len(HISTORY_TABLES) * 9
    await write_messages(Store(engine), TODAY, TODAY + 7 * DAY, TODAY - 1 * DAY)
    assert await homes(engine) == [
        ("device_messages_recent_p20260309", 1),
        ("device_messages_recent_p20260310", 1),
        ("device_messages_recent_p20260317", 1),
    ]
    again = await maintain(engine, today=TODAY, days_ahead=7)
    assert again.created == []


async def test_rows_outside_the_prepared_days_wait_in_default_then_move(engine):
    await maintain(engine, today=TODAY, days_ahead=2)
    await write_messages(Store(engine), TODAY + 5 * DAY, TODAY - 30 * DAY)
    assert await homes(engine) == [("device_messages_recent_default", 2)]
    report = await maintain(engine, today=TODAY + 4 * DAY, days_ahead=2)
    assert report.moved_rows == 2  # the back-dated row gets its own day too (issue 8 item 7)
    assert await homes(engine) == [
        ("device_messages_recent_p20260208", 1),
        ("device_messages_recent_p20260315", 1),
    ]


async def test_retention_drops_whole_days_and_old_default_rows(engine):
    await maintain(engine, today=TODAY, days_ahead=3)
    await write_messages(Store(engine), TODAY - 1 * DAY, TODAY, TODAY + 2 * DAY, TODAY - 60 * DAY)
    report = await maintain(engine, today=TODAY + 3 * DAY, days_ahead=3, retention_days=3)
    # Kept: days ending after TODAY (3 days before "now"); TODAY-1 ended at TODAY 00:00: dropped.
    assert "device_messages_recent_p20260309" in report.dropped
    assert "device_messages_recent_p20260310" not in report.dropped
    assert report.expired_default_rows == 1
    assert await homes(engine) == [
        ("device_messages_recent_p20260310", 1),
        ("device_messages_recent_p20260312", 1),
    ]


async def test_without_retention_nothing_is_dropped(engine):
    await maintain(engine, today=TODAY, days_ahead=1)
    report = await maintain(engine, today=TODAY + 100 * DAY, days_ahead=1, retention_days=0)
    assert report.dropped == []


async def test_tombstones_older_than_the_horizon_are_pruned(engine):
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO telemetry_tombstones (device_id, name, ts) VALUES "
            "(1, 'old', now() - interval '20 days'), (1, 'recent', now() - interval '2 days')"
        )
        await conn.exec_driver_sql(
            "INSERT INTO objects_tombstones (api, origin, id, ts) VALUES "
            "('gw', 'devices', 1, now() - interval '30 days')"
        )
    assert await prune_tombstones(engine, keep_days=0) == 0  # 0 keeps them forever
    assert await prune_tombstones(engine, keep_days=14) == 2
    assert await query(engine, "SELECT name FROM telemetry_tombstones") == [("recent",)]
    assert await query(engine, "SELECT count(*) FROM objects_tombstones") == [(0,)]


async def test_partitions_and_foreign_tables_an_operator_made_never_break_maintenance(engine):
    """A foreign table cannot be a partition of a table with a primary key, so the operator's
    foreign archive sits beside the tables and an ordinary archive table (a name that needs
    quoting) is attached for an old day; both carry the partition suffix."""
    suffix = uuid.uuid4().hex[:12]  # wrappers and servers belong to the whole database
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'CREATE FOREIGN DATA WRAPPER "fdw {suffix}"')
        await conn.exec_driver_sql(
            f'CREATE SERVER "archive {suffix}" FOREIGN DATA WRAPPER "fdw {suffix}"'
        )
        await conn.exec_driver_sql(
            f'CREATE FOREIGN TABLE "Device Messages_p20260201" (device_id bigint) '
            f'SERVER "archive {suffix}"'
        )
        await conn.exec_driver_sql(
            'CREATE TABLE "Archive; device_messages_recent_p20260202" '
            "(LIKE device_messages_recent INCLUDING ALL)"
        )
        await conn.exec_driver_sql(
            "ALTER TABLE device_messages_recent ATTACH PARTITION "
            '"Archive; device_messages_recent_p20260202" '
            "FOR VALUES FROM ('2026-02-02 00:00:00+00') TO ('2026-02-03 00:00:00+00')"
        )
        await conn.exec_driver_sql(
            'CREATE TABLE "Archive; device_messages_recent_p20260311" '
            "(LIKE device_messages_recent INCLUDING ALL)"
        )
        await conn.exec_driver_sql(
            "ALTER TABLE device_messages_recent ATTACH PARTITION "
            '"Archive; device_messages_recent_p20260311" '
            "FOR VALUES FROM ('2026-03-11 00:00:00+00') TO ('2026-03-12 00:00:00+00')"
        )
    try:
        await maintain(engine, today=TODAY - 30 * DAY, days_ahead=1)
        report = await maintain(engine, today=TODAY, days_ahead=3, retention_days=7)
        assert "device_messages_recent_p20260208" in report.dropped  # ours, past retention
        assert not any("Archive" in name for name in report.dropped)  # the operator's stays
        assert (
            "device_messages_recent_p20260311" not in report.created
        )  # the operator covers the day
        assert "device_messages_recent_p20260312" in report.created
        names = {r[0] for r in await query(engine, "SELECT relname FROM pg_class")}
        assert {"Archive; device_messages_recent_p20260202", "Device Messages_p20260201"} <= names
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql('DROP FOREIGN TABLE "Device Messages_p20260201"')
            await conn.exec_driver_sql(f'DROP SERVER "archive {suffix}"')
            await conn.exec_driver_sql(f'DROP FOREIGN DATA WRAPPER "fdw {suffix}"')
