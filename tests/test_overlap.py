"""Two batches in writing at once (pipeline.WRITES_IN_FLIGHT, store.Turn), against a real
PostgreSQL: the later one keeps its place behind the earlier at each statement, and the
acknowledgements go out in arrival order, each after its batch's commit."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from mirror import pipeline
from mirror.ops.config import asyncpg_connect_kwargs
from mirror.pipeline import Mirror
from mirror.session.source import Batch, Received
from mirror.store.writer import Turn
from tests.helpers import query, settings_for

TS = 1_765_000_000.0


@pytest.fixture(autouse=True)
def two_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon writes one batch at a time for now (pipeline.WRITES_IN_FLIGHT: an
    intermittent stall under two); the ordering these tests check is Turn's, kept for two."""
    monkeypatch.setattr(pipeline, "WRITES_IN_FLIGHT", 2)


def batch(topics: list[tuple[str, bytes]], acks: list[str], name: str) -> Batch:
    received = [
        Received(topic, payload, {"timestamp": repr(TS + n)}, time.time(), False, 1, None, n + 1,
                 len(payload), 0)
        for n, (topic, payload) in enumerate(topics)
    ]  # fmt: skip

    def ack(b: Batch) -> int:
        acks.append(name)
        return len(b)

    return Batch(received, sum(m.size for m in received), ack)


async def ungranted(locker: asyncpg.Connection, schema: str, table: str) -> int:
    sql = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass"
    return int(await locker.fetchval(sql, f'"{schema}".{table}'))


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


async def test_the_later_write_waits_at_the_statement_the_earlier_holds(
    broker: Any, database: Any, schema_name: str, engine: AsyncEngine
) -> None:
    """Both batches write one telemetry key. While a lock keeps the first at its telemetry
    statement, the second must not issue its own (it would race the first for the key's row):
    one backend waits on the lock, not two. Then both commit, acked in order."""
    mirror = Mirror(settings_for(broker.url, database.url, schema_name), engine)
    key = "flespi/state/gw/devices/5/telemetry/speed"
    acks: list[str] = []
    first = mirror.prepare(batch([(key, b"1")], acks, "first"))
    second = mirror.prepare(batch([(key, b"2"), (key.replace("5", "6"), b"3")], acks, "second"))
    locker = await asyncpg.connect(**asyncpg_connect_kwargs(database.url))
    try:
        tr = locker.transaction()
        await tr.start()
        await locker.execute(f'LOCK TABLE "{schema_name}".telemetry IN ACCESS EXCLUSIVE MODE')
        turn_a = Turn()
        turn_b = Turn(turn_a)
        a = asyncio.create_task(mirror.write(first, turn_a, mirror._stores[0]))
        b = asyncio.create_task(mirror.write(second, turn_b, mirror._stores[1]))
        await until(lambda: blocked(locker, schema_name, "telemetry"))
        await asyncio.sleep(0.5)  # time enough for the second to reach the lock too, were it free
        assert await ungranted(locker, schema_name, "telemetry") == 1
        assert not a.done() and not b.done() and acks == []
        await tr.rollback()
        await asyncio.gather(a, b)
    finally:
        await locker.close()
    assert acks == ["first", "second"]
    assert await query(engine, "SELECT device_id, value::text FROM telemetry ORDER BY 1") == [
        (5, "2"),
        (6, "3"),
    ]


async def blocked(locker: asyncpg.Connection, schema: str, table: str) -> bool:
    """Some backend waits for a lock on ``table``."""
    return await ungranted(locker, schema, table) >= 1


async def test_a_later_batch_committed_first_is_acknowledged_after_the_earlier(
    broker: Any, database: Any, schema_name: str, engine: AsyncEngine
) -> None:
    """The first batch (device messages) waits on a lock; the second (telemetry only, nothing
    in common) commits at once, but its acknowledgement waits for the first batch's."""
    mirror = Mirror(settings_for(broker.url, database.url, schema_name), engine)
    acks: list[str] = []
    message = b'{"ident":"1","timestamp":1765000000,"server.timestamp":1765000001}'
    first = mirror.prepare(batch([("flespi/message/gw/devices/9", message)], acks, "first"))
    second = mirror.prepare(
        batch([("flespi/state/gw/devices/9/telemetry/speed", b"7")], acks, "second")
    )
    locker = await asyncpg.connect(**asyncpg_connect_kwargs(database.url))
    try:
        tr = locker.transaction()
        await tr.start()
        await locker.execute(
            f'LOCK TABLE "{schema_name}".device_messages_recent IN ACCESS EXCLUSIVE MODE'
        )
        turn_a = Turn()
        a = asyncio.create_task(mirror.write(first, turn_a, mirror._stores[0]))
        b = asyncio.create_task(mirror.write(second, Turn(turn_a), mirror._stores[1]))

        async def second_committed() -> bool:
            return await locker.fetchval(
                f'SELECT count(*) FROM "{schema_name}".telemetry'
            ) == 1  # fmt: skip

        await until(second_committed)
        await asyncio.sleep(0.3)
        assert acks == [], "the later batch was acknowledged before the earlier committed"
        assert not a.done()
        await tr.rollback()
        await asyncio.gather(a, b)
    finally:
        await locker.close()
    assert acks == ["first", "second"]


async def test_a_deletion_in_the_later_batch_waits_for_the_earlier_to_commit(
    broker: Any, database: Any, schema_name: str, engine: AsyncEngine
) -> None:
    """The earlier batch inserts a new key and is held (by a lock) before it commits; the later
    batch deletes that key. Its DELETE must not run beside the uncommitted insert (it would not
    see the row, and the insert would commit after the deletion): the key stays deleted."""
    mirror = Mirror(settings_for(broker.url, database.url, schema_name), engine)
    acks: list[str] = []
    key = "flespi/state/gw/devices/11/telemetry/speed"
    message = b'{"ident":"1","timestamp":1765000000,"server.timestamp":1765000001}'
    first = mirror.prepare(
        batch([(key, b"5"), ("flespi/message/gw/devices/11", message)], acks, "first")
    )
    later = batch([(key, b"")], acks, "second")
    later.messages[0].properties["timestamp"] = repr(TS + 10)  # the deletion is newer
    second = mirror.prepare(later)
    locker = await asyncpg.connect(**asyncpg_connect_kwargs(database.url))
    try:
        tr = locker.transaction()
        await tr.start()
        # held after its telemetry statement: at the summaries its device message keeps
        await locker.execute(
            f'LOCK TABLE "{schema_name}".device_latest_messages IN ACCESS EXCLUSIVE MODE'
        )
        turn_a = Turn()
        a = asyncio.create_task(mirror.write(first, turn_a, mirror._stores[0]))
        b = asyncio.create_task(mirror.write(second, Turn(turn_a), mirror._stores[1]))
        await until(lambda: blocked(locker, schema_name, "device_latest_messages"))
        await asyncio.sleep(0.5)
        assert not b.done(), "the deletion committed while the insert before it was open"
        await tr.rollback()
        await asyncio.gather(a, b)
    finally:
        await locker.close()
    assert acks == ["first", "second"]
    assert await query(engine, "SELECT value FROM telemetry WHERE device_id = 11") == []
