"""When and how the mirror repairs itself after an absence: gap backfill, then reconcile.

The daemon calls :func:`plan_repair` once it knows whether the broker kept its session. A new
session (``session present`` false) while the database already holds data means the broker
may have dropped what was published meanwhile: the gap runs from the newest stored message
(less an overlap for devices that report late) to the connect time. The plan is saved in
``sync_state`` before any work, so a daemon stopped halfway resumes it on its next start even
though the broker then has a session again; it is removed once backfill and reconcile are done.

The ``backfill`` and ``reconcile`` commands run the same pieces by hand, with a progress bar on
a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tqdm import tqdm

from mirror.backfill import Backfill, BackfillJob, BackfillReport, iso_time
from mirror.reconcile import Reconcile, ReconcileReport
from mirror.rest import RestClient

log = logging.getLogger(__name__)

PENDING = "repair:pending"
DEFAULT_OVERLAP = 3600.0  # seconds before the newest stored message that are fetched again


@dataclass(frozen=True)
class RepairPlan:
    begin: float
    end: float

    @property
    def job(self) -> BackfillJob:
        return BackfillJob(f"gap:{self.begin:.6f}:{self.end:.6f}", self.begin, self.end)


# The newest device message stored (kept per device with every write: no scan of history).
NEWEST_MESSAGE = text("SELECT extract(epoch FROM max(ts)) FROM device_latest_messages")


async def plan_repair(
    engine: AsyncEngine, session_present: bool, overlap: float = DEFAULT_OVERLAP
) -> RepairPlan | None:
    """The repair to run now: a pending one, or a new one after a lost session, or none."""
    async with engine.begin() as conn:
        pending = (
            await conn.execute(text("SELECT value FROM sync_state WHERE name = :n"), {"n": PENDING})
        ).scalar()
        if pending is not None:
            return RepairPlan(float(pending["begin"]), float(pending["end"]))
        if session_present:
            return None
        newest = (
            await conn.execute(NEWEST_MESSAGE)
        ).scalar()
        held = (await conn.execute(text("SELECT EXISTS (SELECT 1 FROM objects)"))).scalar()
        if newest is None and not held:
            return None  # a first start on an empty database: nothing to repair
        now = time.time()
        plan = RepairPlan(min(now, float(newest or now)) - overlap, now)
        await conn.execute(
            text(
                "INSERT INTO sync_state (name, value, updated_at) "
                "VALUES (:n, CAST(:v AS jsonb), now()) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
            ),
            {"n": PENDING, "v": json.dumps({"begin": plan.begin, "end": plan.end})},
        )
    return plan


async def repair(rest: RestClient, engine: AsyncEngine, plan: RepairPlan) -> bool:
    """Backfill the gap, then reconcile state; True (and the plan forgotten) when both are done."""
    log.info(
        "the broker did not keep our session: backfilling %s .. %s and reconciling state",
        iso_time(plan.begin), iso_time(plan.end),
    )
    report = await Backfill(rest, engine, plan.job).run()
    reconciled = await Reconcile(rest, engine).run()
    if report.failed or reconciled.skipped:
        log.warning(
            "repair incomplete (%d streams failed, %d tables not reconciled); resumed on the "
            "next start",
            len(report.failed),
            len(reconciled.skipped),
        )
        return False
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM sync_state WHERE name = :n"), {"n": PENDING})
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
) -> BackfillReport:
    job = BackfillJob.for_window(begin, end, devices)
    if not intervals:
        job = BackfillJob(job.name, job.begin, job.end, job.devices, intervals=False)
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
    rest: RestClient, engine: AsyncEngine, *, max_delete_fraction: float = 0.5
) -> ReconcileReport:
    with tqdm(
        total=4, unit="table", desc="reconcile", disable=not sys.stderr.isatty()
    ) as bar:

        def progress(table: str) -> None:
            bar.set_postfix(table=table, refresh=False)
            bar.update(1)

        runner = Reconcile(rest, engine, max_delete_fraction=max_delete_fraction, progress=progress)
        return await runner.run()


__all__ = [
    "RepairPlan",
    "backfill_command",
    "parse_time",
    "plan_repair",
    "reconcile_command",
    "repair",
]
