"""Write-path fault scenarios: how refused rows and oversized or slow batches are handled.

``isolation``: throughput of the store when one row in 1,000 is refused for its content,
against the same store with no refused row, and against the old isolation (a savepoint per row,
kept here as the baseline) in the same run.

``batch-limits``: the heavy cases of the issue: a 20,000-record backlog under
``statement_timeout`` 10 ms, and one batch over 1 GB (1,150 x 950 KB device messages), which
makes PostgreSQL close the connection ("invalid message length"). Lost rows, attempts, seconds
and peak RSS of this process.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import psutil
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.services import services
from mirror.decode.records import DeviceMessage, TelemetryUpdate
from mirror.store.batch import DeadLetter, WritePlan
from mirror.store.database import create_engine, migrate
from mirror.store.statements import STATEMENTS, dead_letter_params
from mirror.store.writer import (
    DATABASE_ERRORS,
    DatabaseUnavailable,
    Store,
    WriteResult,
    _refusal,
    is_retryable,
)

TS = 1_731_990_000.0
MiB = 1024 * 1024


class SavepointPerRowStore(Store):
    """The isolation this project shipped before (baseline): on a refused batch, every record
    again in its own savepoint."""

    async def write(self, plan: WritePlan, *, then: Any = ()) -> WriteResult:
        try:
            async with self.engine.begin() as conn:
                return await self._write_all(conn, plan)
        except DATABASE_ERRORS as exc:
            if is_retryable(exc):
                raise
        result = WriteResult()
        refused: list[DeadLetter] = []
        async with self.engine.begin() as conn:
            for record in plan.records():
                single = WritePlan()
                single.add(record)
                try:
                    async with conn.begin_nested():
                        partial = await self._write_all(conn, single)
                except DATABASE_ERRORS as exc:
                    refused.append(_refusal(plan, record, exc))
                    continue
                result.rows.update(partial.rows)
            if refused:
                params = dead_letter_params(refused, self.max_payload_bytes)
                await conn.execute(STATEMENTS["dead_letters.append"], params)
        result.dead_letters["database_rejected"] += len(refused)
        return result


def telemetry_plan(round_: int, size: int, bad: bool) -> WritePlan:
    plan = WritePlan()
    for i in range(size):
        value = "{not json" if bad and i == size // 2 else str(round_ * size + i)
        plan.add(TelemetryUpdate(i % 100, f"p{i:05d}", value, TS + round_, TS + round_))
    return plan


async def _rate(store: Store, rounds: int, size: int, bad: bool) -> float:
    started = time.perf_counter()
    for round_ in range(rounds):
        await store.write(telemetry_plan(round_, size, bad))
    return rounds * size / (time.perf_counter() - started)


async def _migrated(url: str) -> tuple[AsyncEngine, str]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url, schema)
    await migrate(engine, schema)
    return engine, schema


async def _isolation(url: str, rounds: int, size: int) -> dict[str, Any]:
    engine, _ = await _migrated(url)
    try:
        halving = Store(engine)
        rates = {
            "clean": await _rate(halving, rounds, size, bad=False),
            "one_in_1000_halving": await _rate(halving, rounds, size, bad=True),
            # A few rounds: at about 1% of the clean rate, 30 would take minutes.
            "one_in_1000_savepoint_per_row": await _rate(
                SavepointPerRowStore(engine), max(1, rounds // 6), size, bad=True
            ),
        }
    finally:
        await engine.dispose()
    halving_ratio = rates["one_in_1000_halving"] / rates["clean"]
    baseline_ratio = rates["one_in_1000_savepoint_per_row"] / rates["clean"]
    return {
        "rows_per_second": rates,
        "halving_vs_clean": halving_ratio,
        "savepoint_per_row_vs_clean": baseline_ratio,
        "halving_vs_savepoint_per_row": halving_ratio / baseline_ratio,
        "targets": {"halving >= 10 x savepoint per row": halving_ratio >= 10 * baseline_ratio},
    }


def isolation(opts: Any) -> dict[str, Any]:
    with services() as s:
        return asyncio.run(_isolation(s.database_url, rounds=30, size=1000))


class PeakRss:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, me.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def _until_written(store: Store, plan: WritePlan, limit: int = 30) -> tuple[int, WriteResult]:
    """Retry as the pipeline does (without its backoff); return (attempts, result)."""
    for attempt in range(1, limit + 1):
        try:
            return attempt, await store.write(plan)
        except DatabaseUnavailable:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"not written after {limit} attempts")


async def _statement_timeout(url: str, records: int) -> dict[str, Any]:
    engine, schema = await _migrated(url)
    role = f"bench_{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        for sql in (
            f"CREATE ROLE {role} LOGIN",
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
            f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}",
            f"ALTER ROLE {role} SET statement_timeout = '10ms'",
        ):
            await conn.exec_driver_sql(sql)
    as_role = make_url(url).set(username=role, password=None)
    limited = create_engine(as_role.render_as_string(hide_password=False), schema)
    plan = telemetry_plan(0, records, bad=False)
    started = time.perf_counter()
    try:
        attempts, result = await _until_written(Store(limited), plan)
    finally:
        await limited.dispose()
    seconds = time.perf_counter() - started
    async with engine.connect() as conn:
        stored = (await conn.exec_driver_sql("SELECT count(*) FROM telemetry")).scalar_one()
    await engine.dispose()
    return {
        "records": records,
        "stored": stored,
        "lost": records - stored,
        "attempts": attempts,
        "splits": result.splits,
        "seconds": seconds,
        "dead_letters": sum(result.dead_letters.values()),
    }


async def _over_1gb(url: str, messages: int, payload_bytes: int) -> dict[str, Any]:
    engine, _ = await _migrated(url)
    filler = "x" * (payload_bytes - 64)
    plan = WritePlan()
    for i in range(messages):
        payload = f'{{"timestamp": {TS + i}, "blob": "{filler}"}}'
        plan.add(DeviceMessage(1, TS + i, None, None, payload, i.to_bytes(16, "big"), TS))
    store = Store(engine)
    started = time.perf_counter()
    try:
        with PeakRss() as rss:
            attempts, result = await _until_written(store, plan)
    finally:
        async with engine.connect() as conn:
            stored = (
                await conn.exec_driver_sql("SELECT count(*) FROM device_messages")
            ).scalar_one()
        await engine.dispose()
    return {
        "messages": messages,
        "batch_mb": messages * payload_bytes / MiB,
        "stored": stored,
        "lost": messages - stored,
        "attempts": attempts,
        "part_limit_after": store.part_limit,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": rss.peak / MiB,
        "dead_letters": sum(result.dead_letters.values()),
    }


def batch_limits(opts: Any) -> dict[str, Any]:
    with services() as s:
        timeout = asyncio.run(_statement_timeout(s.database_url, 20_000))
        big = asyncio.run(_over_1gb(s.database_url, 1150, 950 * 1024))
    return {
        "statement_timeout_10ms": timeout,
        "batch_over_1gb": big,
        "targets": {
            "nothing lost under statement_timeout": timeout["lost"] == 0,
            "nothing lost past 1 GB": big["lost"] == 0,
        },
    }
