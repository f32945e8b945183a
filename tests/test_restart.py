"""At least once, nothing lost: kill the daemon mid-stream, start it again, count everything."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import pytest

from mirror.store.database import create_engine
from tests.helpers import (
    KilledDaemon,
    Publisher,
    daemon_process,
    publish_pairs,
    query,
    stop_process,
    wait_for_log,
)


async def wait_for_counts(engine, expected_messages: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (n,) = (await query(engine, "SELECT count(*) FROM device_messages"))[0]
        if n >= expected_messages:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"only {n} of {expected_messages} device messages mirrored")


async def check_mirror(database_url: str, schema: str, messages: int, last: dict[int, int]) -> None:
    engine = create_engine(database_url, schema)
    try:
        await wait_for_counts(engine, messages, timeout=60)
        rows = await query(engine, "SELECT payload->>'seq' FROM device_messages")
        seqs = sorted(int(r[0]) for r in rows)
        assert seqs == list(range(messages)), "lost or duplicated device messages"
        rows = await query(engine, "SELECT device_id, value::text FROM telemetry")
        state = {d: int(v) for d, v in rows}
        assert state == last, "telemetry is not the last value published per key"
        assert await query(engine, "SELECT count(*) FROM dead_letters") == [(0,)]
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_nothing_and_stores_history_once(
    broker, database, schema_name, tmp_path
):
    daemon = KilledDaemon(broker.url, database.url, schema_name, tmp_path / "daemon.log")
    messages = 1500
    done = threading.Event()
    result: dict[str, dict[int, int]] = {}
    thread = threading.Thread(
        target=lambda: result.update(last=publish_pairs(broker.url, messages, done, 0.002))
    )
    thread.start()
    try:
        await daemon.kill_while(
            lambda: not done.is_set(), at_least=3, rng=random.Random(7), pause=(0.3, 1.2)
        )
        thread.join()
        await check_mirror(database.url, schema_name, messages, result["last"])
    finally:
        daemon.stop()
    assert daemon.kills >= 3


async def test_sigterm_commits_what_is_in_hand_and_exits_zero(
    broker, database, schema_name, tmp_path
):
    log = tmp_path / "daemon.log"
    proc = daemon_process(broker.url, database.url, schema_name, log_path=log)
    wait_for_log(log, "subscribed to")
    done = threading.Event()
    result: dict[str, dict[int, int]] = {}
    thread = threading.Thread(
        target=lambda: result.update(last=publish_pairs(broker.url, 400, done, 0))
    )
    thread.start()
    await asyncio.sleep(0.3)  # mid-stream
    started = time.monotonic()
    code = stop_process(proc, signal.SIGTERM, timeout=30)
    assert code == 0
    assert time.monotonic() - started < 20
    assert "stopped after committing" in log.read_text()
    thread.join()
    # What was not taken before the stop waits in the persistent session for the next start.
    proc = daemon_process(broker.url, database.url, schema_name, log_path=log)
    try:
        wait_for_log(log, "subscribed to", count=2)
        await check_mirror(database.url, schema_name, 400, result["last"])
    finally:
        assert stop_process(proc) == 0


def test_sigterm_during_start_up_exits_zero(broker, database, schema_name, tmp_path):
    proc = daemon_process(broker.url, database.url, schema_name, log_path=tmp_path / "d.log")
    time.sleep(0.3)  # importing, connecting: before the event loop owns the signals
    assert stop_process(proc, signal.SIGTERM) == 0


async def test_a_drained_backlog_leaves_nothing_to_redeliver(broker, database, schema_name):
    """Messages read in the same socket read as the CONNACK must be acked on that connection
    (they once carried the previous connection's epoch, and their acks were dropped)."""
    from tests.helpers import running_mirror, settings_for, settle

    settings = settings_for(broker.url, database.url, schema_name)
    async with running_mirror(settings):
        pass  # creates the persistent session and its subscriptions
    pub = Publisher(broker.url)
    for i in range(300):
        pub.publish(
            "flespi/message/gw/devices/1", {"timestamp": 1_731_990_000 + i}, 1_731_990_000.0
        )
    pub.close()
    async with running_mirror(settings) as running:  # a backlog waits at connect
        await settle(running)
        assert running.mirror.committed_messages == 300
    async with running_mirror(settings) as running:
        await asyncio.sleep(1.0)
        assert running.mirror.committed_messages == 0, "the broker redelivered acked messages"
