"""Compaction: the maintainer that packs past hours of message history (see history.py).

One pass: move the horizon up to the hour that ``--compact-after`` makes due, then pack the
recent tier's rows before it, oldest hour first, in steps of at most ``step_rows`` rows, each
step its own transaction. Nothing here can stall ingestion: a step takes no lock a writer of
current messages needs (only writers of late rows for the same day bucket wait, for one step),
and moving the horizon waits at most ``LOCK_TIMEOUT`` for writers in flight, then gives up until
the next pass. A step that fails (the database away, a privilege missing) rolls back whole: its
rows stay in the recent tier, where every reader still finds them, and the next pass tries again.

One maintainer at a time across workers and replicas: a step runs only when it gets the
compaction lock (``pg_try_advisory_xact_lock``); another process then skips the step.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mirror.ops import metrics
from mirror.ops.failures import sqlstate
from mirror.store import partitions
from mirror.store.history import (
    HORIZON,
    LOCK_BUCKET,
    TIERS,
    Tier,
    compaction_step,
    hour_start,
    lock_bucket,
    oldest_recent_before,
)
from mirror.store.schema import metadata

log = logging.getLogger(__name__)

STEP_ROWS = 20_000
LOCK_TIMEOUT = "2s"  # moving the horizon waits this long for writers in flight, at most
_LOCK_NOT_AVAILABLE = "55P03"
_STEPS = {tier.name: compaction_step(tier) for tier in TIERS}
_OLDEST = {tier.name: oldest_recent_before(tier) for tier in TIERS}
_TRY_MAINTAINER = text(
    "SELECT pg_try_advisory_xact_lock(hashtext('flespi-mirror:compaction:' || current_schema()))"
)
_HORIZON = text(
    f"SELECT extract(epoch FROM (value ->> 'horizon')::timestamptz) FROM sync_state "
    f"WHERE name = '{HORIZON}'"
)
_MOVE_HORIZON = text(
    f"""
    UPDATE sync_state SET value = jsonb_build_object('horizon', to_timestamp(:horizon)),
                          updated_at = now()
    WHERE name = '{HORIZON}'
      AND (value ->> 'horizon')::timestamptz < to_timestamp(:horizon)
    """
)
_ADD_HORIZON = text(
    "INSERT INTO sync_state (name, value, updated_at) VALUES "
    f"('{HORIZON}', jsonb_build_object('horizon', '-infinity'::timestamptz), now()) "
    "ON CONFLICT (name) DO NOTHING"
)


@dataclass
class CompactionReport:
    moved: dict[str, int] = field(default_factory=dict)  # rows moved, by tier (view) name
    days: set[tuple[str, dt.date]] = field(default_factory=set)  # (recent table, day) touched
    steps: int = 0
    horizon: float | None = None  # Unix time; None: never moved
    busy: bool = False  # another maintainer held the lock
    caught_up: bool = False  # nothing due is left in the recent tier
    backlog: float = 0.0  # seconds the oldest due message is past due (0: caught up)
    truncated: list[str] = field(default_factory=list)  # emptied day partitions reset


async def read_horizon(engine: AsyncEngine) -> float | None:
    async with engine.connect() as conn:
        value = (await conn.execute(_HORIZON)).scalar()
    return None if value is None else float(value)


async def move_horizon(engine: AsyncEngine, to: float) -> float | None:
    """Move the horizon up to ``to`` (a whole hour), waiting for writers in flight at most
    ``LOCK_TIMEOUT`` (a writer stuck in a long transaction must not make every other writer
    queue behind this update); returns the horizon after the attempt."""
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            await conn.execute(_ADD_HORIZON)
            await conn.execute(_MOVE_HORIZON, {"horizon": to})
    except DBAPIError as exc:
        if sqlstate(exc) != _LOCK_NOT_AVAILABLE:
            raise
        log.info("writers held the horizon for %s; it moves on the next pass", LOCK_TIMEOUT)
    return await read_horizon(engine)


async def _step(conn: AsyncConnection, tier: Tier, hour: float, limit: int) -> int | None:
    """One step in the open transaction; None when another maintainer holds the lock."""
    if not (await conn.execute(_TRY_MAINTAINER)).scalar():
        return None
    await conn.execute(LOCK_BUCKET, {"b": lock_bucket(hour)})
    when = dt.datetime.fromtimestamp(hour, dt.UTC)
    moved = (await conn.execute(_STEPS[tier.name], {"hour": when, "limit": limit})).scalar()
    return int(moved or 0)


async def _ensure_partition(engine: AsyncEngine, tier: Tier, day: dt.date) -> None:
    """The packed table's partition for the day (else its rows wait in the default partition
    until the partition maintenance moves them). Never waits long for readers."""
    try:
        await partitions.ensure_day(engine, metadata.tables[tier.hours], day)
    except Exception as exc:  # the default partition takes the rows; maintenance retries
        log.debug("no partition for %s on %s yet: %s", tier.hours, day, exc)


async def compact(
    engine: AsyncEngine,
    *,
    after_hours: float,
    now: float | None = None,
    step_rows: int = STEP_ROWS,
    budget: float = 30.0,
    pause: Callable[[float], Awaitable[None]] | None = None,
) -> CompactionReport:
    """One pass: move the horizon, then pack due rows until caught up or ``budget`` seconds
    are spent. ``pause(seconds)`` is awaited when given, before the horizon moves (with 0) and
    between steps (with the last step's duration): the daemon's pacing, so that ingestion keeps
    the database."""
    report = CompactionReport()
    now = time.time() if now is None else now
    due = hour_start(now - after_hours * 3600.0)
    if pause is not None:
        await pause(0.0)
    report.horizon = await move_horizon(engine, due)
    horizon = report.horizon if report.horizon is not None else float("-inf")
    started = time.monotonic()
    took: float | None = None  # the last step's duration; None before the first step
    for tier in TIERS:
        made: set[dt.date] = set()
        while time.monotonic() - started < budget:
            if pause is not None and took is not None:
                await pause(took)
            async with engine.connect() as conn:
                oldest = (await conn.execute(_OLDEST[tier.name], {"horizon": horizon})).scalar()
            if oldest is None:
                break
            hour = hour_start(float(oldest))
            report.backlog = max(report.backlog, horizon - hour - 3600.0)
            day = dt.datetime.fromtimestamp(hour, dt.UTC).date()
            if day not in made:
                await _ensure_partition(engine, tier, day)
                made.add(day)
                report.days.add((tier.recent, day))
            step_started = time.monotonic()
            async with engine.begin() as conn:
                moved = await _step(conn, tier, hour, step_rows)
            if moved is None:
                report.busy = True
                return report
            report.steps += 1
            report.moved[tier.name] = report.moved.get(tier.name, 0) + moved
            metrics.COMPACTED.labels(tier.name).inc(moved)
            took = time.monotonic() - step_started
        else:
            return report
    report.caught_up = True
    report.backlog = 0.0
    if report.horizon is not None:
        for tier in TIERS:
            report.truncated += await truncate_emptied_days(engine, tier, report.horizon)
    return report


_EMPTIED_CANDIDATES = text(
    """
    SELECT c.relname FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = CAST(:parent AS regclass) AND c.relkind = 'r'
      AND pg_total_relation_size(c.oid) > 131072
    """
)


async def truncate_emptied_days(engine: AsyncEngine, tier: Tier, horizon: float) -> list[str]:
    """Empty the recent tier's day partitions that compaction emptied, indexes included.

    A vacuum frees an emptied partition's table pages for reuse, but its indexes keep their
    size until the day is dropped by retention: a day's worth of index pages, more than the
    packed rows of that day take. A past day (over before the horizon) gets no new rows but
    late ones; so when it holds no row, it is truncated, under a lock (waited for one second
    at most) that keeps any writer out while it is checked and emptied."""
    truncated: list[str] = []
    async with engine.connect() as conn:
        names = [n for (n,) in await conn.execute(_EMPTIED_CANDIDATES, {"parent": tier.recent})]
    for name in names:
        day = partitions.day_of(tier.recent, name)
        if day is None or partitions.day_end(day) > horizon:
            continue
        try:
            async with engine.begin() as conn:
                await conn.execute(text("SET LOCAL lock_timeout = '1s'"))
                await conn.execute(text(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE'))
                empty = (await conn.execute(text(f'SELECT NOT EXISTS (SELECT FROM "{name}")')))
                if empty.scalar():
                    await conn.execute(text(f'TRUNCATE "{name}"'))
                    truncated.append(name)
        except DBAPIError as exc:  # busy (readers hold it) or not ours to truncate: next pass
            log.debug("not truncating %s now: %s", name, exc)
    return truncated


async def vacuum_days(engine: AsyncEngine, days: set[tuple[str, dt.date]]) -> None:
    """Reclaim the space compaction freed in the recent tier's day partitions now, so new rows
    reuse it (autovacuum would, later). A role that does not own the tables gets PostgreSQL's
    warning instead, and autovacuum does it."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table, day in sorted(days):
            name = partitions.partition_name(table, day)
            exists = (await conn.execute(text("SELECT to_regclass(:n)"), {"n": name})).scalar()
            await conn.execute(
                text(f'VACUUM (SKIP_LOCKED) "{name if exists else table + "_default"}"')
            )
