"""When and how the mirror repairs itself after an absence: gap backfill, then reconcile.

The daemon calls :func:`plan_repair` once it knows whether the broker kept its session. A new
session (``session present`` false) while the database already holds data means the broker
may have dropped what was published meanwhile: the gap runs from the newest stored message
(less an overlap for devices that report late) to the connect time. The plan is saved in
``sync_state`` before any work, so a daemon stopped halfway resumes it on its next start even
though the broker then has a session again; it is removed once backfill and reconcile are done.

A session the broker kept may have lost messages too: flespi deletes a session's undelivered
messages past about 1 GB unacknowledged and disconnects it. The daemon notes such a disconnect
(pipeline.py: after a hold of ``--stall-after`` seconds or more, or with a reason code of an
overloaded broker) and records the window from the start of the hold (less the overlap) to the
reconnect with :func:`record_gap`, merged into the pending plan. One process repairs at a time
(:func:`elected`, a PostgreSQL advisory lock), whatever the number of workers and replicas.

The ``backfill`` and ``reconcile`` commands run the same pieces by hand, with a progress bar on
a terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tqdm import tqdm

from mirror.repair.backfill import Backfill, BackfillJob, BackfillReport, iso_time
from mirror.repair.reconcile import Reconcile, ReconcileReport
from mirror.repair.rest import RestClient

log = logging.getLogger(__name__)

PENDING = "repair:pending"
DEFAULT_OVERLAP = 3600.0  # seconds before the newest stored message that are fetched again


@dataclass(frozen=True)
class RepairPlan:
    begin: float
    end: float

    def job(self, accounts: Sequence[int] = ()) -> BackfillJob:
        selection = ":cid=" + ",".join(str(a) for a in sorted(accounts)) if accounts else ""
        name = f"gap:{self.begin:.6f}:{self.end:.6f}{selection}"
        return BackfillJob(name, self.begin, self.end, accounts=tuple(sorted(accounts)))


# The newest device message stored (kept per device with every write: no scan of history).
NEWEST_MESSAGE = text("SELECT extract(epoch FROM max(ts)) FROM device_latest_messages")


async def plan_repair(
    engine: AsyncEngine, session_present: bool, overlap: float = DEFAULT_OVERLAP
) -> RepairPlan | None:
    """The repair to run now: a pending one (widened by a lost session's window), or none."""
    if not session_present:
        async with engine.connect() as conn:
            newest = (await conn.execute(NEWEST_MESSAGE)).scalar()
            held = (await conn.execute(text("SELECT EXISTS (SELECT 1 FROM objects)"))).scalar()
        if newest is not None or held:  # not a first start on an empty database
            now = time.time()
            return await record_gap(engine, min(now, float(newest or now)) - overlap, now)
    return await pending_plan(engine)


async def pending_plan(engine: AsyncEngine) -> RepairPlan | None:
    async with engine.connect() as conn:
        pending = (
            await conn.execute(text("SELECT value FROM sync_state WHERE name = :n"), {"n": PENDING})
        ).scalar()
    return None if pending is None else RepairPlan(float(pending["begin"]), float(pending["end"]))


_RECORD_GAP = text(
    """
    INSERT INTO sync_state AS s (name, value, updated_at)
    VALUES (:n, jsonb_build_object('begin', CAST(:b AS float8), 'end', CAST(:e AS float8)), now())
    ON CONFLICT (name) DO UPDATE
    SET value = jsonb_build_object(
            'begin', least(CAST(s.value ->> 'begin' AS float8), CAST(:b AS float8)),
            'end', greatest(CAST(s.value ->> 'end' AS float8), CAST(:e AS float8))),
        updated_at = now()
    RETURNING value
    """
)


async def record_gap(engine: AsyncEngine, begin: float, end: float) -> RepairPlan:
    """Add a window that may have lost messages to the pending plan (their union: the plan is
    one window); saved before any work, so a stop halfway resumes it on the next start."""
    async with engine.begin() as conn:
        value = (await conn.execute(_RECORD_GAP, {"n": PENDING, "b": begin, "e": end})).scalar_one()
    return RepairPlan(float(value["begin"]), float(value["end"]))


@contextlib.asynccontextmanager
async def elected(engine: AsyncEngine, role: str = "repair") -> AsyncIterator[bool]:
    """Whether this process holds the ``role`` for the schema (a session advisory lock, held
    on a connection of its own until the block ends; freed by PostgreSQL if we die)."""
    key = f"flespi-mirror:{role}"
    async with engine.connect() as conn:
        won = bool(
            await conn.scalar(
                text("SELECT pg_try_advisory_lock(hashtext(:k || ':' || current_schema()))"),
                {"k": key},
            )
        )
        await conn.commit()
        try:
            yield won
        finally:
            if won:
                await conn.execute(
                    text("SELECT pg_advisory_unlock(hashtext(:k || ':' || current_schema()))"),
                    {"k": key},
                )
                await conn.commit()


async def repair(
    rest: RestClient,
    engine: AsyncEngine,
    plan: RepairPlan,
    *,
    why: str = "lost session",
    accounts: Sequence[int] = (),
) -> bool:
    """Backfill the gap, then reconcile state; True (and the plan forgotten, unless a newer gap
    widened it meanwhile) when both are done."""
    log.info(
        "repairing %s .. %s (%s): backfilling history and reconciling state",
        iso_time(plan.begin), iso_time(plan.end), why,
    )
    report = await Backfill(rest, engine, plan.job(accounts)).run()
    reconciled = await Reconcile(rest, engine, accounts=accounts).run()
    if report.failed or reconciled.skipped:
        log.warning(
            "repair incomplete (%d streams failed, %d tables not reconciled); retried later",
            len(report.failed),
            len(reconciled.skipped),
        )
        return False
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "DELETE FROM sync_state WHERE name = :n"
                " AND CAST(value ->> 'begin' AS float8) >= :b"
                " AND CAST(value ->> 'end' AS float8) <= :e"
            ),
            {"n": PENDING, "b": plan.begin, "e": plan.end},
        )
    log.info("repair of %s .. %s done", iso_time(plan.begin), iso_time(plan.end))
    return True


# ------------------------------------------------------------------------------------------------
# The commands


def parse_time(value: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC when it names no zone)."""
    try:
        return float(value)
    except ValueError:
        pass
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


async def backfill_command(
    rest: RestClient,
    engine: AsyncEngine,
    begin: float,
    end: float | None,
    devices: Sequence[int],
    *,
    intervals: bool = True,
    page_size: int = 1000,
    accounts: Sequence[int] = (),
) -> BackfillReport:
    job = BackfillJob.for_window(begin, end, devices, accounts=accounts)
    if not intervals:
        job = dataclasses.replace(job, intervals=False)
    with tqdm(
        unit="stream", desc="backfill", disable=not sys.stderr.isatty(), dynamic_ncols=True
    ) as bar:
        fetched = 0
        runner: Backfill

        def progress(streams: int, messages: int) -> None:
            nonlocal fetched
            fetched += messages
            bar.total = runner.total_streams
            bar.update(streams)
            if messages:
                bar.set_postfix(messages=fetched, refresh=False)

        runner = Backfill(rest, engine, job, page_size=page_size, progress=progress)
        return await runner.run()


async def reconcile_command(
    rest: RestClient,
    engine: AsyncEngine,
    *,
    max_delete_fraction: float = 0.5,
    accounts: Sequence[int] = (),
) -> ReconcileReport:
    with tqdm(
        total=4, unit="table", desc="reconcile", disable=not sys.stderr.isatty()
    ) as bar:

        def progress(table: str) -> None:
            bar.set_postfix(table=table, refresh=False)
            bar.update(1)

        runner = Reconcile(
            rest,
            engine,
            max_delete_fraction=max_delete_fraction,
            accounts=accounts,
            progress=progress,
        )
        return await runner.run()


__all__ = [
    "RepairPlan",
    "backfill_command",
    "elected",
    "parse_time",
    "pending_plan",
    "plan_repair",
    "reconcile_command",
    "record_gap",
    "repair",
]
