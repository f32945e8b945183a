"""Upkeep of the schema: day partitions of the history tables made ahead and dropped by
retention, and old tombstones pruned.

The history tables (``schema.HISTORY_TABLES``) are partitioned by range of ``ts`` (the packed
``*_hours`` tables by ``hour``; PostgreSQL declarative partitioning, created by the migration
with a DEFAULT partition).
The daemon keeps one partition per UTC day from yesterday to ``days_ahead`` days ahead, so a
query over a time range touches only its days and a day of history is dropped in one statement.
Rows outside the prepared days (a device replaying last month's buffer, a GPS week rollover to
1999, a clock in the future) land in the default partition; the next maintenance makes their
days' partitions and moves them there, so retention drops them like any other day.

Partition names and bounds are derived from dates computed here, never from message content.
Every identifier is quoted, and retention drops only the partitions this module made (ordinary
tables named ``<table>_pYYYYMMDD``): a partition an operator attached (an archive, a table
with a name that needs quoting) is left alone, and its days are not made again.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mirror.store.schema import HISTORY_TABLES, metadata, partition_key

log = logging.getLogger(__name__)

DAY = dt.timedelta(days=1)
_DAY_SUFFIX = re.compile(r"_p(\d{8})$")
# One maintainer at a time, across every process and replica sharing the database.
_LOCK_KEY = "flespi-mirror:partitions"


@dataclass
class PartitionReport:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    moved_rows: int = 0
    expired_default_rows: int = 0


def partition_name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def day_of(table: str, partition: str) -> dt.date | None:
    """The day of one of ``table``'s day partitions by its name; None for any other name."""
    if not partition.startswith(table + "_p"):
        return None
    match = _DAY_SUFFIX.search(partition)
    if match is None or partition != partition_name(table, _parse_day(match.group(1))):
        return None
    return _parse_day(match.group(1))


def _parse_day(digits: str) -> dt.date:
    return dt.datetime.strptime(digits, "%Y%m%d").date()


def day_end(day: dt.date) -> float:
    """The Unix time the UTC day ends."""
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() + 86400.0


def _bound(day: dt.date) -> str:
    return f"{day.isoformat()} 00:00:00+00"


def _quote(conn: AsyncConnection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


@dataclass(frozen=True)
class _Partition:
    name: str
    ours: bool  # made by this module: an ordinary table named as partition_name() names it


async def _existing_days(conn: AsyncConnection, table: str) -> dict[dt.date, _Partition]:
    rows = await conn.execute(
        text(
            """
            SELECT c.relname, c.relkind::text FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            JOIN pg_class p ON p.oid = i.inhparent
            JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE p.relname = :table AND n.nspname = current_schema()
            """
        ),
        {"table": table},
    )
    days = {}
    for name, kind in rows:
        match = _DAY_SUFFIX.search(name)
        if match:
            day = dt.datetime.strptime(match.group(1), "%Y%m%d").date()
            days[day] = _Partition(name, kind == "r" and name == partition_name(table, day))
    return days


async def _default_days(
    conn: AsyncConnection, table: Table, since: dt.date | None
) -> list[dt.date]:
    """The UTC days of the rows in the default partition (from ``since``, when given)."""
    key = partition_key(table)
    query = f"SELECT DISTINCT ({key} AT TIME ZONE 'UTC')::date FROM {table.name}_default"
    params: dict[str, object] = {}
    if since is not None:
        query += f" WHERE {key} >= :since"
        params["since"] = dt.datetime.fromisoformat(_bound(since))
    rows = await conn.execute(text(query), params)
    return sorted(day for (day,) in rows)


async def create_day(conn: AsyncConnection, table: Table, day: dt.date) -> int:
    """Create the day's partition, moving its rows out of the default partition first."""
    lo, hi = _bound(day), _bound(day + DAY)
    params = {"lo": dt.datetime.fromisoformat(lo), "hi": dt.datetime.fromisoformat(hi)}
    parent, default = _quote(conn, table.name), _quote(conn, f"{table.name}_default")
    key = partition_key(table)
    await conn.execute(
        text(
            f"CREATE TEMP TABLE moving ON COMMIT DROP AS "
            f"SELECT * FROM {default} WHERE {key} >= :lo AND {key} < :hi"
        ),
        params,
    )
    moved = (
        await conn.execute(
            text(f"DELETE FROM {default} WHERE {key} >= :lo AND {key} < :hi"), params
        )
    ).rowcount
    options = table.info.get("partition_options")
    await conn.execute(
        text(
            f"CREATE TABLE {_quote(conn, partition_name(table.name, day))} PARTITION OF {parent} "
            f"FOR VALUES FROM ('{lo}') TO ('{hi}')" + (f" WITH ({options})" if options else "")
        )
    )
    if moved:
        await conn.execute(text(f"INSERT INTO {parent} SELECT * FROM moving"))
    await conn.execute(text("DROP TABLE moving"))
    return max(moved, 0)


async def ensure_day(engine: AsyncEngine, table: Table, day: dt.date) -> bool:
    """Make the day's partition of ``table`` unless it exists; True when it was made. Waits at
    most a second for the locks (readers of the table), so that it never queues writers."""
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL lock_timeout = '1s'"))
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": _LOCK_KEY})
        if day in await _existing_days(conn, table.name):
            return False
        await create_day(conn, table, day)
    return True


async def maintain(
    engine: AsyncEngine,
    *,
    today: dt.date | None = None,
    days_ahead: int = 7,
    retention_days: int = 0,
) -> PartitionReport:
    """Make sure day partitions exist from yesterday to ``days_ahead``; drop expired ones.

    ``retention_days`` 0 keeps history forever; N drops every day that ended more than N days
    ago, and deletes rows that old from the default partition.
    """
    today = today or dt.datetime.now(dt.UTC).date()
    report = PartitionReport()
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": _LOCK_KEY})
        for history in HISTORY_TABLES:
            table = history.name
            existing = await _existing_days(conn, table)
            made = set(existing)
            for offset in range(-1, days_ahead + 1):
                day = today + offset * DAY
                if day not in made:
                    report.moved_rows += await create_day(conn, history, day)
                    report.created.append(partition_name(table, day))
                    made.add(day)
            # Back-dated (or far-ahead) device time: its days get partitions too, so the rows
            # leave the default partition and retention drops them a day at a time.
            since = today - retention_days * DAY if retention_days > 0 else None
            for day in await _default_days(conn, history, since):
                if day not in made:
                    report.moved_rows += await create_day(conn, history, day)
                    report.created.append(partition_name(table, day))
                    made.add(day)
            if retention_days > 0:
                cutoff = today - retention_days * DAY  # days ending on or before this are gone
                for day, partition in sorted(existing.items()):
                    if day + DAY <= cutoff and partition.ours:
                        await conn.execute(text(f"DROP TABLE {_quote(conn, partition.name)}"))
                        report.dropped.append(partition.name)
                key = partition_key(history)
                expired = await conn.execute(
                    text(
                        f"DELETE FROM {_quote(conn, table + '_default')} WHERE {key} < :cutoff"
                    ),
                    {"cutoff": dt.datetime.fromisoformat(_bound(cutoff))},
                )
                report.expired_default_rows += max(expired.rowcount, 0)
        if retention_days > 0:  # the summaries of the days dropped go with them
            bound = dt.datetime.fromisoformat(_bound(today - retention_days * DAY))
            await conn.execute(text("DELETE FROM device_hours WHERE hour < :b"), {"b": bound})
            await conn.execute(text("DELETE FROM device_days WHERE day < :b"), {"b": bound.date()})
    if report.created or report.dropped:
        log.info(
            "partitions: created %d, dropped %d (%d rows moved out of default)",
            len(report.created),
            len(report.dropped),
            report.moved_rows,
        )
    return report


async def prune_tombstones(engine: AsyncEngine, keep_days: int) -> int:
    """Forget deletions older than ``keep_days``; return how many were forgotten.

    A tombstone stops an update older than the deletion from bringing a row back. Such an
    update can only come from a late redelivery, which a broker keeps for at most the session
    expiry (flespi: up to 10 days), or from a reordering between shared-subscription members
    (seconds). Past that, the tombstone protects nothing and only takes space.
    """
    if keep_days <= 0:
        return 0
    removed = 0
    async with engine.begin() as conn:
        for table in metadata.sorted_tables:
            if table.name.endswith("_tombstones"):
                result = await conn.execute(
                    text(
                        f"DELETE FROM {_quote(conn, table.name)} "
                        "WHERE ts < now() - make_interval(days => :d)"
                    ),
                    {"d": keep_days},
                )
                removed += max(result.rowcount, 0)
    if removed:
        log.info("pruned %d tombstones older than %d days", removed, keep_days)
    return removed


async def expire_telemetry(engine: AsyncEngine) -> int:
    """Delete telemetry values past their MQTT message expiry, as flespi drops them; return
    how many. The views already leave them out; this keeps the table itself current."""
    async with engine.begin() as conn:
        result = await conn.execute(
            text("DELETE FROM telemetry WHERE expires_at IS NOT NULL AND expires_at <= now()")
        )
    return max(result.rowcount, 0)
